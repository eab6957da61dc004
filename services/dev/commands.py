"""Dev-only `triage` subcommands: broker, standin, produce, demo. Registered by services.cli
when this package is installed; nothing in the product imports it."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path


def dataset_path(split: str) -> Path:
    """A BANKING77 split's TSV (the dataset the embedded defaults ship with)."""
    from services.dev.datasets import BANKING77_SPLITS, banking77_dir

    if split not in BANKING77_SPLITS:
        raise SystemExit(f"unknown split {split!r}; expected one of {BANKING77_SPLITS} (or pass --tsv)")
    return banking77_dir() / f"{split}.tsv"


def cmd_broker(args: argparse.Namespace) -> int:
    from services.dev.broker import EmbeddedBroker

    stopping = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)

    def on_signal(signum: int, _frame: object) -> None:
        for sig in stopping:  # a second signal must not interrupt the cleanup below
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt  # unwinds into EmbeddedBroker.__exit__: the Tansu child stops too

    for sig in stopping:  # supervisors stop with SIGTERM, terminals with Ctrl-C or hang-up
        signal.signal(sig, on_signal)
    try:
        with EmbeddedBroker(port=args.port) as broker:
            print(f"embedded Tansu broker on {broker.bootstrap_servers} (memory only, pid "
                  f"{broker.pid}); Ctrl-C stops it", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except RuntimeError as exc:  # port in use, Tansu died at start
        print(f"triage broker: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_standin(args: argparse.Namespace) -> int:
    from services.dev.standin import main as standin_main

    standin_main(args.rest)
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from services.settings import Settings
    from services.stream.kafka_io import produce, ticket_message
    from services.teacher.corpus import read_texts

    settings = Settings()
    if settings.embedded_broker:
        print("set TRIAGE_BOOTSTRAP_SERVERS", file=sys.stderr)
        return 2
    texts = read_texts(args.tsv or dataset_path(args.split))[args.offset : args.offset + args.limit]
    messages = [ticket_message(f"{args.id_prefix}-{args.offset + i}", t) for i, t in enumerate(texts)]
    asyncio.run(produce(settings.bootstrap_servers, settings.tickets_topic, messages))
    print(f"produced {len(messages)} tickets to {settings.tickets_topic}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from services.dev.demo import DemoOptions, run_demo
    from services.settings import Settings

    options = DemoOptions(
        tickets=args.tickets, bootstrap=args.bootstrap, train_minutes=args.train_minutes,
        epochs=args.epochs, eval_limit=args.eval_limit, teacher_latency_ms=args.teacher_latency_ms,
        flywheel=not args.no_flywheel, malformed=args.malformed, workdir=Path(args.workdir),
        task=args.task, rounds=args.rounds, live=args.live,
    )
    report = asyncio.run(run_demo(Settings(), options))
    if args.json:  # whole (a truncated report is not JSON); no stray blank line without it
        print(json.dumps(report, indent=1, default=str))
    lost = [s["stage"] for s in report["stages"] if not s["accounted_for"]]
    if lost:  # a stage timed out before every ticket had an outcome: fail loudly
        print(f"demo: tickets not accounted for in stage(s) {', '.join(lost)}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from services.dev.demo import DemoOptions  # light: dataclasses only

    p = sub.add_parser("broker", help="dev: run the embedded Tansu broker in the foreground")
    p.add_argument("--port", type=int, default=9092)
    p.set_defaults(fn=cmd_broker)
    p = sub.add_parser("standin", help="dev: run the gold-label teacher STAND-IN server", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_standin)
    p = sub.add_parser("produce", help="dev: produce BANKING77 (or TSV) tickets to the tickets topic")
    p.add_argument("--split", default="test")
    p.add_argument("--tsv", type=Path)
    p.add_argument("--limit", type=int, default=300)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--id-prefix", default="b77")
    p.set_defaults(fn=cmd_produce)
    p = sub.add_parser("demo", help="dev: the whole loop on the embedded defaults, with a summary")
    p.add_argument("--tickets", type=int, default=300, help="test tickets streamed per stage")
    defaults = DemoOptions()
    p.add_argument("--bootstrap", type=int, default=defaults.bootstrap,
                   help="train texts the teacher labels first (a seeded random sample)")
    p.add_argument("--no-bootstrap", dest="live", type=int, nargs="?", const=4000, default=0,
                   metavar="N", help="cold start: no labelled history; each round first streams N "
                   "(default 4000) train tickets as live traffic, then distils from that log alone")
    p.add_argument("--train-minutes", type=float, default=defaults.train_minutes,
                   help="time budget per distillation")
    p.add_argument("--epochs", type=float, default=defaults.epochs,
                   help="epochs of the first distillation (default: 3 after the bootstrap; with "
                        "--no-bootstrap, triage distill's own default)")
    p.add_argument("--eval-limit", type=int, default=defaults.eval_limit,
                   help="held-out rows per gate evaluation (0 = the whole slice)")
    p.add_argument("--teacher-latency-ms", type=float, default=defaults.teacher_latency_ms,
                   help="the stand-in's answer delay while tickets stream (an LLM API's)")
    p.add_argument("--rounds", type=int, default=defaults.rounds, help="distil -> stream rounds")
    p.add_argument("--malformed", type=int, default=5, help="malformed messages mixed in per stage")
    p.add_argument("--no-flywheel", action="store_true", help="only stream through the base model")
    p.add_argument("--workdir", default="var/demo", help="registry, training log, reports")
    p.add_argument("--task", choices=("banking77", "tickets"), default="banking77",
                   help="tickets: the example task with category + priority + entities (rule-made "
                        "priority and entities on BANKING77 texts)")
    p.add_argument("--json", action="store_true", help="also print the JSON report")
    p.set_defaults(fn=cmd_demo)
