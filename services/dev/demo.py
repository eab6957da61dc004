"""The demo's stages, on the embedded defaults (Tansu + teacher stand-in + real vLLM student).

1. zero-shot: stream BANKING77 test tickets through the base student (+ malformed messages).
2. flywheel: bootstrap teacher labels on the train split -> distil -> promote -> the running
   service hot-swaps -> stream fresh test tickets -> re-distil on the escalations -> again.
Test tickets are never used for training; each stage streams a fresh slice of the test split.
"""

from __future__ import annotations

import json
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
    bootstrap: int = 2000
    train_minutes: float = 6.0
    eval_limit: int = 500  # held-out (BANKING77 dev) rows per gate evaluation
    flywheel: bool = True
    malformed: int = 5
    workdir: Path = Path("var/demo")


DEMO_ENTRIES = {"registry", "data", "distill", "demo-report.json"}  # what a demo writes


async def run_demo(base: Settings, options: DemoOptions) -> dict[str, Any]:
    import shutil

    from schemas.task import TaskSpec
    from services.stream.app import TriageService
    from services.dev.broker import EmbeddedBroker
    from services.stream.kafka_io import all_topics, ensure_topics
    from services.dev.datasets import load_split
    from services.student.model_store import ensure_student_model
    from services.dev.standin import run_standin

    workdir = options.workdir.resolve()
    if workdir.is_dir() and not {p.name for p in workdir.iterdir()} <= DEMO_ENTRIES:
        # each demo starts from an empty log and registry, but `--workdir .` (or ~) must not
        # wipe a folder that is not a previous demo's
        raise ValueError(f"{workdir} is not empty and not a demo workdir: pick another --workdir")
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    say("student model (SmolLM2-135M-Instruct, converted once from the packaged GGUF)")
    model_path = ensure_student_model(base.model_path)
    test_rows = load_split("test")
    field_name = TaskSpec.from_file(base.task_path).fields[0].name
    stages: list[StreamReport] = []
    extra: dict[str, Any] = {}
    async with AsyncExitStack() as stack:
        broker = stack.enter_context(EmbeddedBroker())
        say(f"embedded Tansu broker on {broker.bootstrap_servers}")
        standin = await stack.enter_async_context(run_standin(latency_ms=5))
        say(f"gold-label teacher STAND-IN (answers from BANKING77 labels, not a model) at {standin.base_url}")
        settings = base.model_copy(update={
            "bootstrap_servers": broker.bootstrap_servers,
            "session_timeout_ms": 3000,
            "heartbeat_interval_ms": 500,
            "model_path": model_path,
            "registry_dir": workdir / "registry",
            "data_dir": workdir / "data",
            "teacher_base_url": base.teacher_base_url or standin.base_url,
            "registry_poll_s": 1.0,
            "metrics_port": 0 if base.metrics_port == 9464 else base.metrics_port,
        })
        await ensure_topics(settings.bootstrap_servers, all_topics(settings), settings.topic_partitions)
        say("starting the service (vLLM engine start takes ~1 min on 2 CPU cores)")
        t0 = time.monotonic()
        service = TriageService(settings)
        await stack.enter_async_context(service.running())
        extra["service_start_s"] = round(time.monotonic() - t0, 1)

        async def stage(name: str, start: int) -> StreamReport:
            rows = test_rows[start : start + options.tickets]
            say(f"stage '{name}': streaming {len(rows)} test tickets + {options.malformed} malformed")
            teacher_before = _teacher_stats(service)
            report = await stream_tickets(
                name=name, bootstrap=settings.bootstrap_servers,
                tickets_topic=settings.tickets_topic, results_topic=settings.results_topic,
                dead_letter_topic=settings.dead_letter_topic, rows=rows, id_prefix=f"{name}",
                field_name=field_name, malformed=options.malformed,
            )
            await service.pipeline.wait_for_audits()
            teacher_after = _teacher_stats(service)
            summary = service.pipeline.summary()
            report.extra.update({
                "teacher_calls": teacher_after["calls"] - teacher_before["calls"],
                "teacher_cost_usd": round(teacher_after["cost_usd"] - teacher_before["cost_usd"], 5),
                "audited_accuracy": _round(summary["audited_accuracy"]),
                "audited_samples": summary["audited_samples"],
                "threshold": round(summary["threshold"], 4),
            })
            print(report.render(), flush=True)
            print(f"  teacher calls {report.extra['teacher_calls']} (${report.extra['teacher_cost_usd']}) | "
                  f"audited accuracy {report.extra['audited_accuracy']} (n={summary['audited_samples']}) | "
                  f"threshold {report.extra['threshold']}", flush=True)
            stages.append(report)
            return report

        await stage("zero-shot", 0)
        if options.flywheel:
            from services.dev.demo_flywheel import flywheel

            extra.update(await flywheel(service, settings, options, stage))
    result = {"stages": [s.as_dict() for s in stages], **extra}
    (workdir / "demo-report.json").write_text(json.dumps(result, indent=1, default=str))
    _print_table(stages)
    print(f"\nfull report: {workdir / 'demo-report.json'}")
    return result


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) and value == value else None


def _teacher_stats(service: Any) -> dict[str, Any]:
    teacher = service.pipeline.teacher if service.pipeline else None
    stats = teacher.stats() if teacher is not None and hasattr(teacher, "stats") else {}
    return {"calls": stats.get("calls", 0), "cost_usd": stats.get("cost_usd", 0.0)}


def _print_table(stages: list[StreamReport]) -> None:
    print("\n== summary")
    header = f"{'stage':<16}{'in':>6}{'results':>9}{'dlq':>5}{'tput/s':>8}{'p50 ms':>9}{'p99 ms':>9}" \
             f"{'student acc':>13}{'published acc':>15}{'escalated':>11}{'teacher calls':>15}"
    print(header)
    for s in stages:
        d = s.as_dict()
        print(f"{d['stage']:<16}{d['tickets_in']:>6}{d['results']:>9}{d['dead_lettered']:>5}"
              f"{d['throughput_per_s']:>8}{d['p50_ms']:>9}{d['p99_ms']:>9}"
              f"{d['student_accuracy']:>13.1%}{d['published_accuracy']:>15.1%}"
              f"{d['escalation_rate']:>11.1%}{d['teacher_calls']:>15}")
