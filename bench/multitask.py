"""Several tasks on one engine: multi-LoRA throughput overhead and resident memory.

    .venv/bin/python -m bench.multitask --registry var/recipe/registry --tasks 3 --tickets 600 --out var/bench/multitask.json

N tasks with N distinct adapters (the registry's current BANKING77 adapter, plus N-1 copies
of it with seeded noise on the LoRA B matrices: distinct content ids, same shapes, same cost)
share one StudentEngine (services/student/shared_engine.py):

- pass "one task": the registry's adapter classifies all T tickets (one submission: the
  engine sees T requests, packed as its scheduler allows);
- pass "N tasks": the same T tickets dealt round-robin to the N tasks, submitted at once, so
  engine steps mix N adapters. Same requests in flight, only the adapter mix differs.

Passes alternate (one, N, one, N, ... --repeats) with the prefix cache reset before each; the
best of each is reported, and overhead = 1 - N-task rate / one-task rate (issue 13: <= 15% on
CPU). Task 1's labels in the mixed pass are checked against the one-task pass (mixed batches
must not change answers). Memory: resident set of the whole process tree (this process + the
vLLM engine core) with N adapters loaded, against N x that of a subprocess serving 1 task
(N single-task processes). Timings are only worth the load: run it on an idle machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from bench import _common as c


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.multitask", description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", required=True, help="registry whose current adapter serves BANKING77")
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--tickets", type=int, default=600)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--memory-only", action="store_true", help="start, load --tasks adapters, print RSS JSON")
    p.add_argument("--out", help="write the JSON report here (default: print it)")
    return p.parse_args(argv)


def tree_rss_mib() -> float:
    """Resident memory of this process and its children (vLLM's engine core), MiB."""
    import psutil

    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def perturbed_copies(adapter_dir: Path, n: int, out: Path) -> list[Path]:
    """n copies of an adapter with seeded noise on lora_B: new content ids, same cost."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    copies = []
    for i in range(n):
        folder = out / f"copy-{i}"
        shutil.copytree(adapter_dir, folder)
        gen = torch.Generator().manual_seed(i + 1)
        noisy = {k: (v + 0.01 * v.std() * torch.randn(v.shape, generator=gen, dtype=v.dtype)) if "lora_B" in k
                 else v for k, v in weights.items()}
        save_file(noisy, str(folder / "adapter_model.safetensors"))
        copies.append(folder)
    return copies


async def started(args: argparse.Namespace, work: Path) -> tuple[Any, list[Any]]:
    """(engine context, one warmed classifier per task with its own adapter)."""
    from schemas.task import TaskSpec
    from services.student.engine import EngineConfig
    from services.student.model_store import ensure_student_model
    from services.student.registry import AdapterRef, AdapterRegistry
    from services.student.shared_engine import StudentEngine

    settings = c.base_settings()
    ensure_student_model(settings.model_path)
    task = TaskSpec.from_file(settings.task_path)
    live = AdapterRegistry(Path(args.registry)).current()
    if live is None:
        raise SystemExit(f"{args.registry}: no current adapter")
    refs = [live] + [AdapterRef.from_dir(p) for p in perturbed_copies(live.path, args.tasks - 1, work)]
    config = EngineConfig.from_settings(settings)
    config = type(config)(**{**config.__dict__, "max_loras": max(2, args.tasks)})
    context = StudentEngine.started(config)
    engine = await context.__aenter__()
    classifiers = []
    for ref in refs:
        classifier = engine.classifier(task)
        await classifier.use_adapter(ref)
        classifiers.append(classifier)
    return context, classifiers


async def timed(calls: list[Any], n: int) -> float:
    started_at = time.perf_counter()
    await asyncio.gather(*calls)
    return n / (time.perf_counter() - started_at)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        context, classifiers = await started(args, Path(tmp))
        try:
            rss = tree_rss_mib()
            if args.memory_only:
                return {"tasks": args.tasks, "rss_mib": rss}
            texts = c.model_texts(c.texts(args.tickets))
            warm = c.model_texts(c.texts(64, split="train"))
            await asyncio.gather(*(k.classify(warm) for k in classifiers))
            shares = [texts[i::len(classifiers)] for i in range(len(classifiers))]
            one, many, agree = [], [], None
            for _ in range(args.repeats):
                await c.reset_prefix_cache(classifiers[0])
                alone: list[Any] = []

                async def one_pass() -> None:
                    alone.extend(await classifiers[0].classify(texts))
                one.append(await timed([one_pass()], len(texts)))
                await c.reset_prefix_cache(classifiers[0])
                mixed: dict[int, Any] = {}

                async def share_pass(i: int) -> None:
                    mixed[i] = await classifiers[i].classify(shares[i])
                many.append(await timed([share_pass(i) for i in range(len(classifiers))], len(texts)))
                first = [p.fields["intent"].label for p in mixed[0]]
                agree = sum(a == b for a, b in zip(first, [p.fields["intent"].label for p in alone[::len(classifiers)]]))
                agree /= max(1, len(first))
            rss_n = tree_rss_mib()
        finally:
            await context.__aexit__(None, None, None)
    single = json.loads(subprocess.run(
        [sys.executable, "-m", "bench.multitask", "--registry", args.registry, "--tasks", "1", "--memory-only"],
        check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])["rss_mib"]
    best_one, best_many = max(one), max(many)
    return {
        "tasks": args.tasks, "tickets": args.tickets, "repeats": args.repeats,
        "one_task_tickets_per_s": round(best_one, 2), "n_tasks_tickets_per_s": round(best_many, 2),
        "all_runs": {"one": [round(x, 2) for x in one], "n": [round(x, 2) for x in many]},
        "overhead": round(1 - best_many / best_one, 3),
        "task1_labels_unchanged_in_mixed_batches": round(agree or 0.0, 4),
        "rss_mib": {"n_task_process": round(max(rss, rss_n)), "single_task_process": round(single),
                    "n_single_task_processes": round(args.tasks * single),
                    "per_extra_adapter": round((max(rss, rss_n) - single) / max(1, args.tasks - 1), 1)},
        "machine": c.machine(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    c.setup()
    report = asyncio.run(run(args))
    if args.memory_only:
        print(json.dumps(report))
        return 0
    c.say(f"{args.tasks} tasks on one engine vs one task, {args.tickets} tickets (best of {args.repeats}):")
    c.say(f"  one task      {report['one_task_tickets_per_s']:7.2f} tickets/s")
    c.say(f"  {args.tasks} tasks       {report['n_tasks_tickets_per_s']:7.2f} tickets/s   overhead "
          f"{report['overhead']:.1%} (target <= 15%)")
    c.say(f"  task 1 labels unchanged in mixed batches: {report['task1_labels_unchanged_in_mixed_batches']:.1%}")
    m = report["rss_mib"]
    c.say(f"  memory: {args.tasks}-task process {m['n_task_process']} MiB vs {args.tasks} single-task processes "
          f"{m['n_single_task_processes']} MiB ({m['single_task_process']} each; "
          f"+{m['per_extra_adapter']} MiB per extra adapter)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    else:
        print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
