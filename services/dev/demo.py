"""The demo's stages, on the embedded defaults (Tansu + teacher stand-in + real vLLM student).

1. zero-shot: stream BANKING77 test tickets through the base student (+ malformed messages).
2. flywheel: bootstrap teacher labels on the train split -> distil -> promote -> the running
   service hot-swaps -> stream fresh test tickets -> re-distil on the escalations -> again.
Test tickets are never used for training; each stage streams a fresh slice of the test split.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.dev.demo_stream import StreamReport, say, stream_tickets
from services.settings import Settings


@dataclass
class DemoOptions:
    tickets: int = 300
    bootstrap: int = 8000  # a seeded uniform sample of BANKING77 train, labelled by the teacher
    live: int = 0  # instead of a bootstrap: train-split tickets streamed as live traffic per round
    # Budget per distillation: the recipe below ends sooner (8 min of training with bf16 autocast,
    # ~12.6 with the frozen pass in fp32 on AVX2); 11 cut AVX2's first distil to 2 of 3 epochs.
    train_minutes: float = 15.0
    # Distillation #1, from scratch. None: 3 after the bootstrap (the demo's time); on a cold start
    # the product's default (trainer.train: 4; its first log is small, ~3,400 training rows).
    epochs: float | None = None
    epochs_warm: float = 2.0  # distillation #2 starts from #1's weights (warm start)
    eval_limit: int = 0  # held-out rows per gate evaluation (0 = the whole slice)
    teacher_latency_ms: float = 400.0  # the stand-in's answer delay while tickets stream
    flywheel: bool = True
    malformed: int = 5
    workdir: Path = Path("var/demo")
    rounds: int = 2  # distil -> stream rounds of the flywheel
    task: str = "banking77"  # or "tickets": category + priority + entities (services/dev/demo_data.py)


DEMO_ENTRIES = {"registry", "data", "distill", "demo-report.json", "tickets"}  # what a demo writes


async def run_demo(base: Settings, options: DemoOptions) -> dict[str, Any]:
    import shutil

    from schemas.task import TaskSpec
    from services.stream.app import TriageService
    from services.dev.broker import EmbeddedBroker
    from services.dev.demo_data import DATASETS
    from services.stream.kafka_io import create_topics, plan_topics
    from services.student.model_store import ensure_student_model
    from services.dev.standin import load_gold, run_standin

    workdir = options.workdir.resolve()
    if workdir.is_dir() and not {p.name for p in workdir.iterdir()} <= DEMO_ENTRIES:
        # each demo starts from an empty log and registry, but `--workdir .` (or ~) must not
        # wipe a folder that is not a previous demo's
        raise ValueError(f"{workdir} is not empty and not a demo workdir: pick another --workdir")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    started = time.monotonic()
    say("student model (SmolLM2-135M-Instruct, converted once from the packaged GGUF)")
    model_path = ensure_student_model(base.model_path)
    data = DATASETS[options.task](workdir / "tickets")
    task = TaskSpec.from_file(data.task_path)
    if options.task != "banking77":
        say(f"task {task.name}: {', '.join(f'{f.name} ({f.type})' for f in task.fields)}")
    stages: list[StreamReport] = []
    extra: dict[str, Any] = {}
    async with AsyncExitStack() as stack:
        broker = stack.enter_context(EmbeddedBroker())
        say(f"embedded Tansu broker on {broker.bootstrap_servers}")
        gold = load_gold(data.gold_paths)
        standin = await stack.enter_async_context(run_standin(gold=gold, entity_rules=data.entity_rules,
                                                              latency_ms=0))
        say(f"gold-label teacher STAND-IN at {standin.base_url}: {data.blurb}, "
            f"priced per token like an LLM API; while tickets stream it waits "
            f"{options.teacher_latency_ms:.0f} ms per answer, as an LLM API would")
        settings = base.model_copy(update={
            "bootstrap_servers": broker.bootstrap_servers,
            "session_timeout_ms": 3000,
            "heartbeat_interval_ms": 500,
            "model_path": model_path,
            "task_path": data.task_path,
            "registry_dir": workdir / "registry",
            "data_dir": workdir / "data",
            "teacher_base_url": base.teacher_base_url or standin.base_url,
            "teacher_model": base.teacher_model if base.teacher_base_url else standin.model,  # named, never a default
            "registry_poll_s": 1.0,
            "metrics_port": 0 if base.metrics_port == 9464 else base.metrics_port,
        })
        await create_topics(settings.bootstrap_servers, plan_topics(settings))
        say("starting the service (vLLM engine start takes ~1 min on 2 CPU cores)")
        t0 = time.monotonic()
        service = TriageService(settings)
        await stack.enter_async_context(service.running())
        extra["service_start_s"] = round(time.monotonic() - t0, 1)
        engine = service.pipeline.classifier.config  # the figures below are this number format's
        extra["engine"] = {"dtype": engine.dtype, "why": engine.dtype_why, "cores": os.cpu_count()}

        async def stage(name: str, start: int, live: bool = False) -> StreamReport:
            if live:  # cold start: the train split plays the desk's first days of traffic
                rows = data.train[start : start + options.live]
                say(f"stage '{name}': {len(rows)} {data.name} train tickets as live traffic (the "
                    f"teacher answers what the student cannot; a share is held out to evaluate)")
            else:
                rows = data.test[start : start + options.tickets]
                say(f"stage '{name}': {len(rows)} fresh {data.name} test tickets (never trained on) "
                    f"+ {options.malformed} malformed messages")
            standin.set_faults(latency_ms=options.teacher_latency_ms)
            teacher_before = _teacher_stats(service)
            report = await stream_tickets(
                name=name, bootstrap=settings.bootstrap_servers,
                tickets_topic=settings.tickets_topic, results_topic=settings.results_topic,
                dead_letter_topic=settings.dead_letter_topic, rows=rows, id_prefix=f"{name}",
                task=task, malformed=0 if live else options.malformed, progress=sys.stderr.isatty(),
            )
            await service.worker.idle()  # audits too: their teacher calls belong to this stage
            standin.set_faults(latency_ms=0)
            teacher_after = _teacher_stats(service)
            summary = {**service.pipeline.summary(), **service.worker.summary()}
            report.extra.update({
                "teacher_calls": teacher_after["calls"] - teacher_before["calls"],
                "teacher_cost_usd": round(teacher_after["cost_usd"] - teacher_before["cost_usd"], 6),
                "audited_accuracy": _round(summary["audited_accuracy"]),
                "audited_samples": summary["audited_samples"],
                "threshold": ({k: round(v, 4) for k, v in summary["threshold"].items() if k != "*"}
                              if isinstance(summary["threshold"], dict) else round(summary["threshold"], 4)),
            })
            print(report.render(), flush=True)
            stages.append(report)
            return report

        await stage("zero-shot", 0)
        if options.flywheel:
            from services.dev.demo_flywheel import flywheel

            extra.update(await flywheel(service, settings, options, stage, data))
    extra["total_minutes"] = round((time.monotonic() - started) / 60, 1)
    result = {"stages": [s.as_dict() for s in stages], **extra}
    (workdir / "demo-report.json").write_text(json.dumps(result, indent=1, default=str))
    print_summary(stages, options, extra)
    print(f"\nfull report: {workdir / 'demo-report.json'} ({extra['total_minutes']} min in all)")
    return result


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) and value == value else None


def _teacher_stats(service: Any) -> dict[str, Any]:
    teacher = service.worker.teacher if service.worker else None
    stats = teacher.stats() if teacher is not None and hasattr(teacher, "stats") else {}
    return {"calls": stats.get("calls", 0), "cost_usd": stats.get("cost_usd", 0.0)}


COLUMNS = (  # header, width, cell
    ("stage", 14, lambda d: d["stage"]),
    ("answered", 9, lambda d: f"{d['results']}"),
    ("dead-letter", 12, lambda d: f"{d['dead_lettered']}"),
    ("student acc", 12, lambda d: f"{d['student_accuracy']:.1%}"),
    ("escalated", 10, lambda d: f"{d['escalation_rate']:.1%}"),
    ("wrong when student answers", 27, lambda d: "-" if d["error_of_student_answered"] is None
     else f"{d['error_of_student_answered']:.1%} of {d['student_answered']}"),
    ("teacher calls", 14, lambda d: f"{d['teacher_calls']}"),
    ("$ per 1k", 9, lambda d: f"{d['cost_per_1k_usd']:.3f}"),
    ("tickets/s", 10, lambda d: f"{d['throughput_per_s']}"),
    ("student p50/p99 ms", 19, lambda d: "-" if not d["student_answered"]
     else f"{d['service_p50_ms']:.0f}/{d['service_p99_ms']:.0f}"),
    ("queued p50 s", 13, lambda d: "-" if not d["student_answered"] else f"{d['queueing_p50_ms'] / 1000:.1f}"),
)


def print_summary(stages: list[StreamReport], options: DemoOptions, extra: dict[str, Any]) -> None:
    """The table a support lead reads: who answered, how often the student was wrong when it
    answered alone, what the teacher cost per 1,000 tickets, how fast."""
    rows = [s.as_dict() for s in stages]
    calls = sum(d["teacher_calls"] for d in rows)
    per_call = sum(d["teacher_cost_usd"] for d in rows) / calls if calls else 0.0
    for d in rows:
        d["cost_per_1k_usd"] = 1000 * d["teacher_cost_usd"] / max(1, d["results"])
    live = (f"; live-N: {options.live} train tickets as the desk's live traffic, no labelled history"
            if options.live else "")
    print(f"\n== summary: {options.tickets} fresh test tickets per stage{live}; the student's answers "
          f"are scored against BANKING77's gold labels (the loop itself never sees them)")
    if "engine" in extra:
        e = extra["engine"]
        print(f"   student engine: {e['dtype']} ({e['why']}), {e['cores']} cores")
    print("".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w, _) in enumerate(COLUMNS)))
    for d in rows:
        print("".join(f"{f(d):<{w}}" if i == 0 else f"{f(d):>{w}}" for i, (_, w, f) in enumerate(COLUMNS)))
    print(f"{'all-teacher':<14}{'':>9}{'':>12}{'':>12}{'100.0%':>10}{'':>27}{'1 per ticket':>14}"
          f"{1000 * per_call:>9.3f}")
    print("  escalated: sent to the teacher (slow, paid); wrong when student answers: the student's "
          "error on the tickets it answered alone (target ≤ 3%); teacher calls include the "
          "evaluation sample's audits of confident answers (5% of tickets); student latency = "
          "consume → publish of the tickets the student answered alone (escalations never hold "
          "them: the teacher works off its own topic); "
          f"queued = waiting in Kafka behind the burst of {options.tickets}; teacher priced per "
          "token at the settings' rates")
    if len(rows) > 1 and calls:
        last = rows[-1]
        cut = 1 - last["teacher_calls"] / max(1, last["results"])
        print(f"\nteacher calls cut by {cut:.0%} ({last['results']} tickets, {last['teacher_calls']} "
              f"teacher calls); cost per 1k tickets ${1000 * per_call:.3f} → ${last['cost_per_1k_usd']:.3f}")
