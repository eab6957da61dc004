"""`triage` command line: serve, produce, bootstrap, distill, rollback, demo and helpers.

Settings come from the environment (TRIAGE_*); flags override the few that matter per command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

log = logging.getLogger("triage")


def _settings(**overrides):
    from services.settings import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _quiet_logs(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("vllm", "aiokafka", "httpx", "httpx2", "httpcore", "openai", "faststream", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ---- commands ----------------------------------------------------------------------------
def cmd_model(args: argparse.Namespace) -> int:
    from services.model_store import ensure_student_model

    print(ensure_student_model(_settings().model_path))
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    import time

    from services.broker import EmbeddedBroker

    with EmbeddedBroker(port=args.port) as broker:
        print(f"embedded Tansu broker on {broker.bootstrap_servers} (memory only); Ctrl-C stops it")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from services.app import TriageService
    from services.broker import EmbeddedBroker, ensure_topics
    from services.model_store import ensure_student_model

    settings = _settings()
    ensure_student_model(settings.model_path)
    broker = None
    if settings.embedded_broker:  # dev convenience: a private broker for this process
        broker = EmbeddedBroker().start()
        settings = settings.model_copy(
            update={"bootstrap_servers": broker.bootstrap_servers, "session_timeout_ms": 3000}
        )
        print(f"embedded broker: {broker.bootstrap_servers}", flush=True)
    try:
        if args.create_topics or broker is not None:
            asyncio.run(ensure_topics(settings.bootstrap_servers, _topics(settings), settings.topic_partitions))
        asyncio.run(TriageService(settings).app.run())
    finally:
        if broker is not None:
            broker.stop()
    return 0


def _topics(settings) -> list[str]:
    return [settings.tickets_topic, settings.results_topic, settings.dead_letter_topic, settings.control_topic]


def cmd_produce(args: argparse.Namespace) -> int:
    from services.datasets import load_split, load_tsv
    from services.kafka_io import produce, ticket_message

    settings = _settings()
    if settings.embedded_broker:
        print("set TRIAGE_BOOTSTRAP_SERVERS", file=sys.stderr)
        return 2
    rows = (load_tsv(args.tsv) if args.tsv else load_split(args.split))[args.offset : args.offset + args.limit]
    messages = [ticket_message(f"{args.id_prefix}-{args.offset + i}", r.text) for i, r in enumerate(rows)]
    asyncio.run(produce(settings.bootstrap_servers, settings.tickets_topic, messages))
    print(f"produced {len(messages)} tickets to {settings.tickets_topic}")
    return 0


def cmd_bootstrap(args: argparse.Namespace) -> int:
    return asyncio.run(_bootstrap(args))


async def _bootstrap(args: argparse.Namespace) -> int:
    from contextlib import AsyncExitStack

    from schemas.task import TaskSpec
    from services.app import build_teacher
    from services.bootstrap import run_bootstrap
    from services.datasets import load_split, load_tsv
    from services.teacher_standin import run_standin
    from services.training_log import TrainingLog

    settings = _settings()
    rows = (load_tsv(args.tsv) if args.tsv else load_split(args.split))[: args.limit]
    async with AsyncExitStack() as stack:
        if not settings.teacher_base_url:
            standin = await stack.enter_async_context(run_standin())
            print(f"no TRIAGE_TEACHER_BASE_URL: using the gold-label teacher STAND-IN at {standin.base_url}")
            settings = settings.model_copy(update={"teacher_base_url": standin.base_url})
        teacher = build_teacher(settings, TaskSpec.from_file(settings.task_path))
        stack.push_async_callback(teacher.aclose)
        with TrainingLog(settings.training_log_path) as training_log:
            report = await run_bootstrap(
                teacher=teacher, log=training_log, texts=[r.text for r in rows],
                concurrency=args.concurrency, progress=True,
            )
            print(f"training log: {training_log.count()} examples, version {training_log.version()}")
    # (run_bootstrap already printed report.summary(); printing it again duplicated the line)
    return 0 if report.failed == 0 else 1


def cmd_distill(args: argparse.Namespace) -> int:
    from trainer.distill import main as distill_main

    return distill_main(args.rest)


def cmd_rollback(args: argparse.Namespace) -> int:
    from services.registry import AdapterRegistry

    ref = AdapterRegistry(_settings().registry_dir).rollback()
    print(f"current adapter: {ref.adapter_id if ref else 'base model'}")
    return 0


def cmd_standin(args: argparse.Namespace) -> int:
    from services.teacher_standin import main as standin_main

    standin_main(args.rest)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from services.demo_flow import DemoOptions, run_demo

    options = DemoOptions(
        tickets=args.tickets, bootstrap=args.bootstrap, train_minutes=args.train_minutes,
        eval_limit=args.eval_limit,
        flywheel=not args.no_flywheel, malformed=args.malformed, workdir=Path(args.workdir),
    )
    report = asyncio.run(run_demo(_settings(), options))
    if args.json:  # whole (a truncated report is not JSON); no stray blank line without it
        print(json.dumps(report, indent=1, default=str))
    lost = [s["stage"] for s in report["stages"] if not s["accounted_for"]]
    if lost:  # a stage timed out before every ticket had an outcome: fail loudly
        print(f"demo: tickets not accounted for in stage(s) {', '.join(lost)}", file=sys.stderr)
        return 1
    return 0


# ---- parser --------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triage", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("TRIAGE_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("model", help="convert the packaged SmolLM2 GGUF to an HF folder (once)").set_defaults(fn=cmd_model)
    p = sub.add_parser("broker", help="run the embedded Tansu broker in the foreground")
    p.add_argument("--port", type=int, default=9092)
    p.set_defaults(fn=cmd_broker)
    p = sub.add_parser("serve", help="run the service (FastStream consumer + vLLM student)")
    p.add_argument("--create-topics", action="store_true", help="create missing topics first")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("produce", help="produce BANKING77 (or TSV) tickets to the tickets topic")
    p.add_argument("--split", default="test")
    p.add_argument("--tsv", type=Path)
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--id-prefix", default="b77")
    p.set_defaults(fn=cmd_produce)
    p = sub.add_parser("bootstrap", help="label historical tickets with the teacher (resumable)")
    p.add_argument("--split", default="train")
    p.add_argument("--tsv", type=Path)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--concurrency", type=int, default=16)
    p.set_defaults(fn=cmd_bootstrap)
    p = sub.add_parser("distill", help="dataset -> train -> evaluate -> gate -> promote", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_distill)
    sub.add_parser("rollback", help="make the previously promoted adapter current").set_defaults(fn=cmd_rollback)
    p = sub.add_parser("standin", help="run the gold-label teacher STAND-IN server", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_standin)
    p = sub.add_parser("demo", help="the whole loop on the embedded defaults, with a summary")
    p.add_argument("--tickets", type=int, default=300, help="test tickets streamed per stage")
    p.add_argument("--bootstrap", type=int, default=2000, help="train texts labelled by the teacher")
    p.add_argument("--train-minutes", type=float, default=6.0, help="time budget per distillation")
    p.add_argument("--eval-limit", type=int, default=500, help="held-out rows per gate evaluation")
    p.add_argument("--malformed", type=int, default=5, help="malformed messages mixed in per stage")
    p.add_argument("--no-flywheel", action="store_true", help="only stream through the base model")
    p.add_argument("--workdir", default="var/demo", help="registry, training log, reports")
    p.add_argument("--json", action="store_true", help="also print the JSON report")
    p.set_defaults(fn=cmd_demo)
    return parser


FORWARDING = ("distill", "standin")  # their args (--help included) belong to their own parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # argparse.REMAINDER does not capture a leading option (`triage distill --help` or
    # `--max-minutes 5` were rejected as unrecognized): the options before the first
    # positional come back as unknown; they precede REMAINDER's part, so order is kept.
    args, unknown = parser.parse_known_args(argv)
    if args.command in FORWARDING:
        args.rest = unknown + args.rest
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    _quiet_logs(args.log_level.upper())
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
