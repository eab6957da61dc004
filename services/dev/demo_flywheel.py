"""The demo's flywheel: bootstrap -> distil -> promote -> hot-swap -> stream -> re-distil.
With `--no-bootstrap`, each round first streams train-split tickets as live traffic instead:
the cold start a desk with no labelled history goes through.

Runs inside `triage demo` against the already running service: training happens in a
subprocess (the service keeps its consumer alive), evaluation borrows the service's engine
(one vLLM engine per process), and promotion moves the registry pointer, which the service
follows without a restart.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, Awaitable, Callable

from services.dev.demo_stream import StreamReport, say

BOOTSTRAP_EPOCHS = 3.0  # the bootstrap demo's first distil: its time budget, not the product's 4


async def flywheel(
    service: Any, settings: Any, options: Any, stage: Callable[[str, int], Awaitable[StreamReport]],
    data: Any,
) -> dict[str, Any]:
    from schemas.task import TaskSpec
    from services.teacher.bootstrap import label_coverage, run_bootstrap, sample_texts
    from trainer.distill import DistillConfig, heldout_line, recertified_line, run_distill_async

    pipeline, worker = service.pipeline, service.worker
    out: dict[str, Any] = {"distill": []}
    if not options.live:
        train_texts = data.train_texts
        texts = sample_texts(train_texts, options.bootstrap, seed=0)
        sample = (f"all {len(texts)}" if len(texts) == len(train_texts) else
                  f"a random sample of {len(texts)} of the {len(train_texts)}")
        say(f"bootstrap: the teacher labels {sample} historical ({data.name} train) tickets into the training log")
        boot = await run_bootstrap(teacher=worker.teacher, log=worker.training_log, texts=texts,
                                   concurrency=16, progress=sys.stderr.isatty())
        # off the event loop: the service shares it, and reading the log is a scan
        examples = await asyncio.to_thread(worker.training_log.examples)
        for line in label_coverage(TaskSpec.from_file(settings.task_path), examples):
            print(f"  {line}")
        out.update(bootstrap=boot.summary(), bootstrap_cost_usd=round(boot.cost_usd, 4))
    config = DistillConfig(
        registry_dir=settings.registry_dir, log_path=settings.training_log_path,
        model_path=settings.model_path, task_path=settings.task_path,
        work_dir=options.workdir / "distill", max_minutes=options.train_minutes,
        report_tsv="none",  # no gold anywhere in the loop: the streamed test tickets are the report
        eval_limit=options.eval_limit, heldout_fraction=settings.heldout_fraction,
        heldout_cold_rows_until=settings.heldout_cold_rows_until,
    )
    for round_no in range(1, options.rounds + 1):
        if options.live:
            await stage(f"live-{round_no}", options.live * (round_no - 1), live=True)
            stats = await asyncio.to_thread(worker.training_log.stats)
            print(f"  training log: {stats['examples']} teacher-labelled tickets "
                  f"({', '.join(f'{n} {k}' for k, n in sorted(stats['by_source'].items()))}); "
                  f"sample rows are held out to evaluate, the rest train", flush=True)
        first = options.epochs if options.epochs is not None else (None if options.live else BOOTSTRAP_EPOCHS)
        epochs = first if round_no == 1 else options.epochs_warm
        config.train_args = {"epochs": epochs} if epochs is not None else {}
        version = worker.training_log.version()
        say(f"distil #{round_no}: train a LoRA adapter on training log v{version} (teacher labels "
            f"only), calibrate its escalation threshold and gate it against the live model on the "
            f"log's held-out slice, promote if better")
        summary = await run_distill_async(config, classifier=pipeline.classifier)
        print(f"  {heldout_line(summary['heldout'])}")
        for line in summary["lines"]:
            print(f"  {line}")
        verdict = "PROMOTED" if summary["promoted"] else "REJECTED"
        print(f"  {verdict}: {summary['reason']} (train {summary['train_minutes']} min, "
              f"total {summary['total_minutes']} min)", flush=True)
        if recertified_line(summary):
            print(f"  {recertified_line(summary)}", flush=True)
        out["distill"].append({k: summary[k] for k in (
            "data_version", "heldout", "candidate_id", "live_id", "promoted", "reason", "threshold",
            "candidate", "live", "train_minutes", "total_minutes")})
        if summary["promoted"]:
            await _wait_for_swap(service, summary["current_id"])
            print(f"  service hot-swapped to {summary['current_id']} (no restart)", flush=True)
        await stage(f"distilled-{round_no}", options.tickets * round_no)
    return out


async def _wait_for_swap(service: Any, adapter_id: str, timeout_s: float = 60.0) -> None:
    await service.reload_adapter()  # don't wait for the next registry poll
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        live = service.pipeline.classifier.live_adapter
        if getattr(live, "adapter_id", None) == adapter_id:
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"service did not swap to {adapter_id}")
