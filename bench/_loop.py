"""The whole loop in one process, for the benches that follow it over time (bench.drift,
bench.fallible_teacher): embedded Tansu, the stand-in teacher over HTTP, the service with the
real vLLM student, a bootstrap, and distils that hot-swap the running service (`triage demo`
wires the same for users).
"""

from __future__ import annotations

import shutil
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from bench._common import say, served_dtype, write_json

SUMMARY_KEYS = ("data_version", "promoted", "reason", "threshold", "train_minutes", "total_minutes")


def fresh_workdir(path: str | Path, owned: set[str]) -> Path:
    """An empty `path`: removed first when it holds only this bench's own files (`owned`)."""
    workdir = Path(path).resolve()
    if workdir.is_dir() and not {p.name for p in workdir.iterdir()} <= owned:
        raise SystemExit(f"{workdir} is not empty and not this bench's folder: pick another --workdir")
    shutil.rmtree(workdir, ignore_errors=True)  # each run starts from an empty log and registry
    workdir.mkdir(parents=True)
    return workdir


@dataclass
class Loop:
    service: Any
    settings: Any
    standin: Any
    config: Any  # trainer.distill.DistillConfig

    @property
    def worker(self) -> Any:
        return self.service.worker

    @property
    def pipeline(self) -> Any:
        return self.service.pipeline

    async def bootstrap(self, texts: Sequence[str], report: dict[str, Any]) -> None:
        from services.teacher.bootstrap import run_bootstrap

        boot = await run_bootstrap(teacher=self.worker.teacher, log=self.worker.training_log, texts=texts,
                                   concurrency=16, progress=False)
        report["bootstrap"] = boot.summary()

    async def distil(self, name: str, **train_args: Any) -> dict[str, Any]:
        """One `triage distill` cycle on the log as it is; a promotion is waited for until the
        running service answers with it. Returns the summary's main keys, with `name`."""
        from services.dev.demo_flywheel import _wait_for_swap
        from trainer.distill import run_distill_async

        self.config.train_args = train_args
        say(f"{name}: training log v{self.worker.training_log.version()}")
        summary = await run_distill_async(self.config, classifier=self.pipeline.classifier)
        say(f"  {'PROMOTED' if summary['promoted'] else 'REJECTED'}: {summary['reason']} "
            f"({summary['total_minutes']} min)")
        if summary["promoted"]:
            await _wait_for_swap(self.service, summary["current_id"])
        return {"name": name, **{k: summary.get(k) for k in SUMMARY_KEYS}}


async def start_loop(stack: AsyncExitStack, workdir: Path, data: Any, report: dict[str, Any], *,
                     train_minutes: float, standin: dict[str, Any] | None = None,
                     settings: dict[str, Any] | None = None, epsilon: float = 0.03) -> Loop:
    """Broker, stand-in (`standin`: its options), topics and the running service (`settings`:
    overrides), all closed with `stack`; `report["dtype"]` says what the student serves in."""
    from services.dev.broker import EmbeddedBroker
    from services.dev.standin import load_gold, run_standin
    from services.settings import Settings
    from services.stream.app import TriageService
    from services.stream.kafka_io import create_topics, plan_topics
    from services.student.model_store import ensure_student_model
    from trainer.distill import DistillConfig

    broker = stack.enter_context(EmbeddedBroker())
    server = await stack.enter_async_context(run_standin(gold=load_gold(data.gold_paths), latency_ms=0,
                                                         **(standin or {})))
    say(server.banner)
    defaults = Settings(_env_file=None)
    s = defaults.model_copy(update={
        "bootstrap_servers": broker.bootstrap_servers, "session_timeout_ms": 3000,
        "heartbeat_interval_ms": 500, "model_path": ensure_student_model(defaults.model_path),
        "task_path": data.task_path, "registry_dir": workdir / "registry", "data_dir": workdir / "data",
        "teacher_base_url": server.base_url, "teacher_model": server.model, "registry_poll_s": 1.0,
        "metrics_port": 0, **(settings or {}),
    })
    report["dtype"] = served_dtype(s)
    await create_topics(s.bootstrap_servers, plan_topics(s))
    say("starting the service (real vLLM student)")
    service = TriageService(s)
    await stack.enter_async_context(service.running())
    config = DistillConfig(registry_dir=s.registry_dir, log_path=s.training_log_path, model_path=s.model_path,
                           task_path=s.task_path, work_dir=workdir / "distill", max_minutes=train_minutes,
                           report_tsv="none", heldout_fraction=s.heldout_fraction,
                           heldout_cold_rows_until=s.heldout_cold_rows_until, epsilon=epsilon)
    return Loop(service, s, server, config)


def add_sizes(parser: Any, full: Mapping[str, Any], quick: Mapping[str, Any],
              notes: Mapping[str, str] | None = None) -> None:
    """`--quick` and one option per size; `apply_sizes` fills in what was not given."""
    parser.add_argument("--quick", action="store_true", help="small sizes, to check that it works")
    for name, value in full.items():
        note = (notes or {}).get(name)
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None,
                            help=f"default {value} (quick: {quick[name]})" + (f"; {note}" if note else ""))


def apply_sizes(args: Any, full: Mapping[str, Any], quick: Mapping[str, Any]) -> None:
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def finish(report: dict[str, Any], out: str | None) -> int:
    """The run's last line (minutes, dtype, cores) and its JSON at `out`, if asked."""
    say(f"{report['minutes']} min in all, dtype {report['dtype']}, {report['machine']['cpus']} cores")
    if out:
        write_json(out, report)
    return 0
