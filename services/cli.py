"""`triage` command line. Product commands live here; dev tooling (embedded broker, teacher
stand-in, test traffic, demo) is registered by `services.dev.commands` when that package is
installed (production images leave it out).

Settings come from the environment (TRIAGE_*); flags override the few that matter per command.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger("triage")


def settings(**overrides):
    from services.settings import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


# ---- product commands ---------------------------------------------------------------------
def cmd_model(args: argparse.Namespace) -> int:
    from services.student.model_store import ModelPathError, ensure_student_model

    try:
        print(ensure_student_model(settings().model_path))
    except ModelPathError as exc:
        print(f"triage model: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from services.stream.app import TriageService
    from services.stream.kafka_io import create_topics, plan_topics
    from services.student.model_store import ModelPathError, ensure_student_model

    s = settings(role=args.role)
    if s.embedded_broker:
        print("TRIAGE_BOOTSTRAP_SERVERS is not set: point it at Kafka "
              "(for a local broker: `triage broker` in another terminal)", file=sys.stderr)
        return 2
    if s.role != "teacher":  # the teacher worker needs no model
        try:
            ensure_student_model(s.model_path)
        except ModelPathError as exc:
            print(f"triage serve: {exc}", file=sys.stderr)
            return 2
    if s.deployment_path is not None:  # several tasks, one engine
        from services.deployment import Deployment
        from services.stream.swarm import SwarmService, plan_task_topics

        deployment = Deployment.from_file(s.deployment_path)
        if args.create_topics:
            asyncio.run(create_topics(s.bootstrap_servers, plan_task_topics(s, deployment)))
        swarm = SwarmService(s, deployment)
        asyncio.run(swarm.app.run())
        return swarm.exit_code
    if args.create_topics:
        asyncio.run(create_topics(s.bootstrap_servers, plan_topics(s)))
    service = TriageService(s)
    asyncio.run(service.app.run())
    return service.exit_code  # non-zero when the replica stopped because it broke


NO_TEACHER = ("triage bootstrap: no teacher configured: set TRIAGE_TEACHER_BASE_URL (with "
              "TRIAGE_TEACHER_MODEL, TRIAGE_TEACHER_API_KEY) to an OpenAI-compatible endpoint; for the "
              "dev gold-label stand-in run `triage standin` in another terminal, then "
              "TRIAGE_TEACHER_BASE_URL=http://127.0.0.1:8099/v1 TRIAGE_TEACHER_MODEL=gold-label-standin")


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from services.teacher.bootstrap import bootstrap_from_settings

    s = settings()
    if not s.teacher_base_url:  # never a stand-in by itself: its labels would be invented ones
        print(NO_TEACHER, file=sys.stderr)
        return 2
    path = args.tsv or _dev().dataset_path(args.split)  # --split: BANKING77 texts, dev only
    try:
        report = asyncio.run(bootstrap_from_settings(
            s, path, limit=args.limit, seed=args.seed, concurrency=args.concurrency,
            progress=sys.stderr.isatty() and not args.no_progress))
    except KeyboardInterrupt:
        print("bootstrap interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    return 0 if report.failed == 0 else 1


def cmd_feedback(args: argparse.Namespace) -> int:
    """Corrections from a file into the training log, as the feedback topic's consumer stores them."""
    import json

    from schemas.task import TaskSpec
    from services.teacher.feedback import FeedbackDesk, load_feedback_file
    from services.teacher.training_log import TrainingLog

    s = _task_settings(args)
    with TrainingLog(s.training_log_path) as training_log:
        desk = FeedbackDesk(TaskSpec.from_file(s.task_path), training_log, eval_share=s.eval_share)
        try:
            report = load_feedback_file(desk, args.tsv)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"triage feedback: {exc}") from None
    print(json.dumps(report, indent=1))
    return 1 if report["refused"] else 0  # the stored rows stay stored; the refused are listed


def cmd_distill(args: argparse.Namespace) -> int:
    from trainer.distill import main as distill_main

    return distill_main(args.rest)


def cmd_eval(args: argparse.Namespace) -> int:
    from trainer.evaluate import main as evaluate_main

    evaluate_main(args.rest)
    return 0


def _json_threshold(threshold: Any) -> Any:
    """JSON has no infinity: a trust-nothing threshold (math.inf) prints as null, as stored."""
    if isinstance(threshold, dict):
        return {name: _json_threshold(t) for name, t in threshold.items()}
    return None if isinstance(threshold, float) and threshold == float("inf") else threshold


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from services.student.registry import AdapterRegistry
    from trainer.distill import heldout_status

    from services.student.calibration_record import certified_record, record_mismatch
    from services.student.engine import EngineConfig
    from services.stream.drift_log import drift_status

    s = _task_settings(args)
    registry = AdapterRegistry(s.registry_dir)
    ref = registry.current()
    engine = EngineConfig.from_settings(s)  # the dtype a service started here serves in
    refused = record_mismatch(ref, engine)
    try:
        evaluation = heldout_status(s, cold=ref is None or ref.threshold is None or refused is not None,
                                    selecting=ref is not None)
    except (OSError, ValueError) as exc:  # an unreadable task file: the registry part still helps
        evaluation = {"error": str(exc)}
    try:
        quality = _quality(s)
    except Exception as exc:  # a locked or odd log: the rest of status still helps
        quality = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps({
        "registry": str(registry.root),
        "current": ref.adapter_id if ref else None,
        "threshold": _json_threshold(ref.threshold) if ref else None,
        "certified_on": certified_record(ref),
        "serving": {"dtype": engine.dtype, "why": engine.dtype_why},
        "threshold_refused": refused,
        "adapters": [a.adapter_id for a in registry.list()],
        "history": registry.history()[-10:],
        "drift": drift_status(s),  # the service's last windows vs the live adapter's distil
        "evaluation": evaluation,
        "quality": quality,
    }, indent=1))
    return 0


def _quality(s) -> dict[str, Any]:
    """Agreement with people, per scope, with n and Wilson 95% bounds (services/teacher/quality.py)."""
    from schemas.task import TaskSpec
    from services.teacher.quality import quality_from_log

    entity_field = TaskSpec.from_file(s.task_path).entity_field
    return quality_from_log(s.training_log_path, entity_field.name if entity_field else None)


def cmd_promote(args: argparse.Namespace) -> int:
    from services.student.registry import AdapterRegistry

    s = _task_settings(args)
    try:
        ref = AdapterRegistry(s.registry_dir).promote(args.adapter_id, args.reason)
    except KeyError as exc:  # unknown or malformed id: a message, not a traceback
        print(f"triage promote: {exc.args[0]}", file=sys.stderr)
        return 1
    print(f"current adapter: {ref.adapter_id}")
    _tell_replicas(s, args, ref.adapter_id)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from services.student.registry import AdapterRegistry

    s = _task_settings(args)
    ref = AdapterRegistry(s.registry_dir).rollback(args.reason)
    print(f"current adapter: {ref.adapter_id if ref else 'base model'}")
    _tell_replicas(s, args, ref.adapter_id if ref else None)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    import json

    from trainer.retention import describe, gc

    s = _task_settings(args)
    work_dir = Path(args.work_dir or (Path("var/distill") / args.task if args.task else "var/distill"))
    plan, applied = gc(s, work_dir, apply_=args.apply)
    if args.json:
        print(json.dumps({"applied": applied is not None, "work_dir": str(work_dir),
                          "registry": str(s.registry_dir), "plan": plan.as_dict(), "result": applied}, indent=1))
    else:
        print(describe(plan, applied=applied is not None))
        if applied is not None and applied["skipped"]:
            print(f"skipped {len(applied['skipped'])} (in use by now): "
                  + ", ".join(e["path"] for e in applied["skipped"]))
    return 0


def _tell_replicas(s, args: argparse.Namespace, adapter_id: str | None) -> None:
    """The pointer moved: a reload command on the control topic (Kafka configured) swaps the
    running replicas now; a failed send only delays them to their next registry poll."""
    from services.stream.kafka_io import tell_replicas

    sent, line = tell_replicas(s, task=getattr(args, "task", None), adapter_id=adapter_id)
    print(line, file=sys.stdout if sent or s.embedded_broker else sys.stderr)


def _task_settings(args: argparse.Namespace):
    """The settings of `--task NAME` of the deployment (TRIAGE_DEPLOYMENT_PATH), else the process's."""
    from services.deployment import settings_for

    try:
        return settings_for(getattr(args, "task", None))
    except (ValueError, KeyError) as exc:
        raise SystemExit(f"triage {args.command}: {exc}") from None


# ---- parser --------------------------------------------------------------------------------
def _dev():
    """The dev tooling package, or a clear error where it is not installed."""
    if importlib.util.find_spec("services.dev") is None:
        raise SystemExit("this is dev tooling (services/dev), not installed in this image")
    import services.dev.commands as dev  # the composition root may know the dev package

    return dev


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-level", default=os.environ.get("TRIAGE_LOG_LEVEL", "INFO"))
    parser.add_argument("--log-format", default=os.environ.get("TRIAGE_LOG_FORMAT", "auto"),
                        choices=("auto", "json", "text"), help="auto: JSON unless on a terminal")
    parser.add_argument("--verbose", action="store_true", help="show library (vLLM, Kafka) logs")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("model", help="convert the packaged SmolLM2 GGUF to an HF folder (once)").set_defaults(fn=cmd_model)
    p = sub.add_parser("serve", help="run the service (FastStream consumer + vLLM student)")
    p.add_argument("--create-topics", action="store_true",
                   help="create missing topics first (results compacted, control one partition)")
    p.add_argument("--role", choices=("all", "student", "teacher"), default=None,
                   help="student consumer, teacher worker, or both in one process (default TRIAGE_ROLE, all)")
    p.set_defaults(fn=cmd_serve)
    p = sub.add_parser("bootstrap", help="label historical tickets with the teacher (resumable)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--tsv", type=Path, help="tickets to label: TSV or JSONL with a 'text' column")
    source.add_argument("--split", help="dev only: the texts of a BANKING77 split (train, dev, test)")
    p.add_argument("--limit", type=int, default=None,
                   help="label a uniform random sample of N texts (not the first N)")
    p.add_argument("--seed", type=int, default=0, help="the sample's seed (a rerun resumes the same sample)")
    p.add_argument("--concurrency", type=int, default=None, help="default TRIAGE_TEACHER_CONCURRENCY")
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    p.set_defaults(fn=cmd_bootstrap)
    for name, fn, help_text in (
        ("distill", cmd_distill, "training log -> train -> evaluate -> gate -> promote"),
        ("eval", cmd_eval, "evaluate adapters on held-out files (trainer.evaluate)"),
    ):
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(fn=fn)
    task_help = "a task of the deployment (TRIAGE_DEPLOYMENT_PATH); default: the single task"
    p = sub.add_parser("status", help="live adapter, its threshold, registry history")
    p.add_argument("--task", default=None, help=task_help)
    p.set_defaults(fn=cmd_status)
    p = sub.add_parser("promote", help="make an adapter already in the registry current")
    p.add_argument("adapter_id")
    p.add_argument("--reason", default="manual promotion")
    p.add_argument("--task", default=None, help=task_help)
    p.set_defaults(fn=cmd_promote)
    p = sub.add_parser("rollback", help="back to the previously promoted adapter (or the base model)")
    p.add_argument("--reason", default="manual rollback")
    p.add_argument("--task", default=None, help=task_help)
    p.set_defaults(fn=cmd_rollback)
    p = sub.add_parser("feedback", help="load people's corrections (TSV or JSONL) into the training log")
    p.add_argument("--tsv", type=Path, required=True,
                   help="ticket_id and/or text, a column per field (or label), optional author, source, at; "
                        ".jsonl: records as on the feedback topic")
    p.add_argument("--task", default=None, help=task_help)
    p.set_defaults(fn=cmd_feedback)
    p = sub.add_parser("gc", help="retention: old adapters, distil runs, caches (dry run unless --apply)")
    p.add_argument("--apply", action="store_true", help="delete what the dry run lists")
    p.add_argument("--json", action="store_true", help="the plan (and outcome) as JSON")
    p.add_argument("--work-dir", default=None,
                   help="distil work dir, as given to `triage distill` (default var/distill[/<task>])")
    p.add_argument("--task", default=None, help=task_help)
    p.set_defaults(fn=cmd_gc)
    if importlib.util.find_spec("services.dev") is not None:
        _dev().register(sub)
    return parser


FORWARDING = ("distill", "eval", "standin")  # their args (--help included) belong to their own parser


def main(argv: Sequence[str] | None = None) -> int:
    from services.logs import configure_logging

    parser = build_parser()
    # argparse.REMAINDER does not capture a leading option (`triage distill --help`): the
    # options before the first positional come back as unknown; they precede REMAINDER's
    # part, so order is kept.
    args, unknown = parser.parse_known_args(argv)
    if args.command in FORWARDING:
        args.rest = unknown + args.rest
    elif unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    configure_logging(args.log_level, args.log_format, verbose=args.verbose,
                      quiet=args.command == "demo")  # the demo prints its own story
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
