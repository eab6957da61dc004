"""Several tasks on one engine (multi-LoRA): throughput overhead and resident memory.

    .venv/bin/python -m bench.multitask --registry var/recipe/registry --tasks 3 --tickets 600 --max-batch 128 --json var/bench/multitask.json

N tasks = N copies of the BANKING77 TaskSpec (same prompts), each with its own adapter: task 1
the registry's current adapter, tasks 2..N copies of it with seeded noise on the LoRA B
matrices (distinct content ids, so vLLM loads N distinct LoRAs of the same shape and cost).
They share one StudentEngine (services/student/shared_engine.py; max_loras = 2 per task, as
SwarmService sets it, unless TRIAGE_MAX_LORAS). The T test tickets are dealt round-robin into
N streams; each stream is submitted as the service's consumer does, `classify()` on batches of
--max-batch, one batch in flight per stream, the N streams concurrently:

- pass A "one task": every stream on task 1 (one adapter);
- pass B "N tasks": stream i on task i, so engine steps mix N adapters.
Same batches, same concurrency; only the adapter mix differs. All N adapters and both passes
are warmed on train tickets first; passes alternate A B A B (--repeats), best of each reported.
Before every pass vLLM's prefix cache is reset (no free hits on the tickets) and then each
adapter classifies one train ticket: the prompt prefix shared by all tickets (~770 tokens for
BANKING77's label list) is cached per LoRA, and a running service has it cached for every
task; without this (--cold-prefix) B recomputes it N times per pass, A once, which at a few
hundred tickets costs more than the multi-LoRA kernels do.

Figures:
- tickets/s of A and of B (T / wall time of the pass); overhead = 1 - B/A (target <= 15% on CPU);
- task 1's labels in B vs A on stream 1 (adapter 1 in both passes): identical share (worst
  B pass vs the first A pass) and the largest probability difference: mixed batches must not
  change answers; and task 2 vs task 1 on the same tickets (max |dp| > 0: distinct LoRAs served);
- memory: resident set (RSS; USS = its private pages) of the whole process tree (this process
  + vLLM's engine core and worker), measured in a fresh subprocess (`--memory-only --tasks K`)
  after its engine is up with K adapters loaded and warmed: K = N ("N-task process") and K = 1
  (one single-task process, max_loras 2; "N single-task processes" = N x that); per extra
  task = (RSS_N - RSS_1) / (N - 1): its adapter + its 2 LoRA slots + its prefix-cache blocks.

Timings swing with machine load (2x on a shared 2-core box): final figures on an idle machine
only. Engine settings: the service's (TRIAGE_* environment variables).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

if __package__ in (None, ""):  # run as a script (`python bench/multitask.py`): find the repo's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as c  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_OVERHEAD = 0.15
WARM_TICKETS = 16  # per task, train split


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.multitask", description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", required=True, help="adapter registry whose current adapter serves BANKING77")
    p.add_argument("--tasks", type=int, default=3, help="N tasks (adapters) on the engine (default 3)")
    p.add_argument("--tickets", type=int, default=600, help="BANKING77 test tickets (default 600)")
    p.add_argument("--max-batch", type=int, default=128, help="tickets per classify() call (default 128)")
    p.add_argument("--repeats", type=int, default=2, help="A B pairs (default 2); best of each reported")
    p.add_argument("--memory-only", action="store_true",
                   help="start, load and warm --tasks adapters, print the process tree's memory as JSON")
    p.add_argument("--no-memory", action="store_true", help="skip the two memory subprocesses")
    p.add_argument("--cold-prefix", action="store_true",
                   help="don't re-cache each adapter's prompt prefix after the reset (B pays N prefixes)")
    p.add_argument("--json", "--out", dest="json", help="also write the JSON report here")
    args = p.parse_args(argv)
    if min(args.tasks, args.max_batch, args.repeats) < 1 or args.tickets < args.tasks:
        p.error("need --tasks, --max-batch, --repeats >= 1 and --tickets >= --tasks")
    return args


def tree_memory_mib() -> dict[str, float]:
    """RSS / USS / PSS of this process + its descendants (vLLM's engine core), MiB."""
    import psutil

    me = psutil.Process()
    total = {"rss": 0, "uss": 0, "pss": 0}
    for proc in [me, *me.children(recursive=True)]:
        try:
            info = proc.memory_full_info()
        except psutil.Error:
            continue
        for key in total:
            total[key] += getattr(info, key, 0)
    return {key: round(value / 2**20, 1) for key, value in total.items()}


def noisy_copies(adapter_dir: Path, n: int, out: Path) -> list[Path]:
    """n copies of an adapter folder (same config + metadata), seeded noise on lora_B."""
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    copies = []
    for i in range(n):
        folder = out / f"task-{i + 2}"
        shutil.copytree(adapter_dir, folder)
        gen = torch.Generator().manual_seed(1000 + i)
        noisy = {k: v + (0.01 * v.float().std() * torch.randn(v.shape, generator=gen)).to(v.dtype)
                 if "lora_B" in k else v for k, v in weights.items()}
        save_file(noisy, str(folder / "adapter_model.safetensors"))
        copies.append(folder)
    return copies


@asynccontextmanager
async def tasks_on_one_engine(registry: str, n: int) -> AsyncIterator[tuple[list[Any], dict[str, Any]]]:
    """N classifiers on one StudentEngine, each with its own adapter loaded (use_adapter)."""
    from schemas.task import TaskSpec
    from services.student.engine import EngineConfig
    from services.student.model_store import ensure_student_model
    from services.student.registry import AdapterRef, AdapterRegistry
    from services.student.shared_engine import StudentEngine

    settings = c.base_settings()
    ensure_student_model(settings.model_path)
    task = TaskSpec.from_file(settings.task_path)
    live = AdapterRegistry(Path(registry)).current()
    if live is None:
        raise SystemExit(f"{registry}: no current adapter")
    config = EngineConfig.from_settings(settings)
    if settings.max_loras is None:
        config = replace(config, max_loras=2 * n)  # as SwarmService: live + a swap per task
    with tempfile.TemporaryDirectory(prefix="bench-multitask-") as tmp:
        refs = [live] + [AdapterRef.from_dir(p) for p in noisy_copies(live.path, n - 1, Path(tmp))]
        assert len({r.adapter_id for r in refs}) == n, "adapter copies must have distinct content ids"
        async with StudentEngine.started(config) as engine:
            classifiers = [engine.classifier(task) for _ in refs]
            for classifier, ref in zip(classifiers, refs):
                await classifier.use_adapter(ref)
            yield classifiers, {"adapters": [r.adapter_id for r in refs], "max_loras": config.max_loras,
                                "max_cpu_loras": max(config.max_cpu_loras or 0, config.max_loras),
                                "dtype": config.dtype, "max_num_seqs": config.max_num_seqs}


async def run_streams(classifiers: Sequence[Any], streams: Sequence[list[str]], max_batch: int
                      ) -> tuple[float, list[list[Any]]]:
    """Stream i on classifiers[i]: batches of max_batch, one in flight per stream, streams
    concurrent. (seconds, predictions per stream)."""
    async def stream(classifier: Any, texts: list[str]) -> list[Any]:
        out: list[Any] = []
        for i in range(0, len(texts), max_batch):
            out.extend(await classifier.classify(texts[i : i + max_batch]))
        return out

    started = time.perf_counter()
    results = await asyncio.gather(*(stream(k, s) for k, s in zip(classifiers, streams)))
    return time.perf_counter() - started, list(results)


def labels(predictions: Sequence[Any], name: str) -> list[str | None]:
    return [p.fields[name].label if hasattr(p, "fields") else None for p in predictions]


def compare(ref: Sequence[Any], other: Sequence[Any], name: str) -> tuple[int, float]:
    """(identical labels, max |probability difference|) of two prediction lists."""
    same = sum(a == b and a is not None for a, b in zip(labels(ref, name), labels(other, name)))
    diffs = [abs(x - y) for a, b in zip(ref, other) if hasattr(a, "distribution") and hasattr(b, "distribution")
             for x, y in zip(a.distribution[name], b.distribution[name])]
    return same, max(diffs, default=float("nan"))


async def memory_only(args: argparse.Namespace) -> dict[str, Any]:
    warm = c.model_texts(c.texts(WARM_TICKETS, split="train"))
    async with tasks_on_one_engine(args.registry, args.tasks) as (classifiers, info):
        await asyncio.gather(*(k.classify(warm) for k in classifiers))
        return {"tasks": args.tasks, "max_loras": info["max_loras"], **tree_memory_mib()}


def memory_of(args: argparse.Namespace, tasks: int) -> dict[str, Any]:
    """`--memory-only --tasks K` in a fresh process: its tree's memory, nothing else running."""
    cmd = [sys.executable, "-m", "bench.multitask", "--registry", args.registry, "--tasks", str(tasks), "--memory-only"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


async def timing(args: argparse.Namespace) -> dict[str, Any]:
    n = args.tasks
    texts = c.model_texts(c.texts(args.tickets))
    streams = [texts[i::n] for i in range(n)]  # round-robin: same batches in both passes
    warm = c.model_texts(c.texts(WARM_TICKETS * n, split="train"))
    warm_streams = [warm[i::n] for i in range(n)]
    prime = c.model_texts(c.texts(1, offset=WARM_TICKETS * n, split="train"))
    report: dict[str, Any] = {"bench": "multitask", "tasks": n, "tickets": len(texts), "max_batch": args.max_batch,
                              "repeats": args.repeats}
    c.say(f"starting one engine with {n} adapters ...")
    started = time.perf_counter()
    async with tasks_on_one_engine(args.registry, n) as (classifiers, info):
        report["engine"] = info
        field = next(iter(classifiers[0].codes))
        passes = {"A": [classifiers[0]] * n, "B": list(classifiers)}
        for who in passes.values():  # warm-up: every adapter, both mixes, not timed
            await run_streams(who, warm_streams, args.max_batch)
        report["engine_start_and_warmup_s"] = round(time.perf_counter() - started, 1)
        c.say(f"engine up and warm in {report['engine_start_and_warmup_s']} s ({info['adapters']})")
        rates: dict[str, list[float]] = {"A": [], "B": []}
        first: dict[str, list[list[Any]]] = {}
        checks = []
        for r in range(args.repeats):
            for name, who in passes.items():
                await c.reset_prefix_cache(classifiers[0])  # one engine: resets every adapter's
                if not args.cold_prefix:  # re-cache each adapter's prompt prefix, as a running service has it
                    await asyncio.gather(*(k.classify(prime) for k in classifiers))
                seconds, out = await run_streams(who, streams, args.max_batch)
                rates[name].append(round(len(texts) / seconds, 2))
                c.say(f"pass {name} #{r + 1}: {len(texts)} tickets in {seconds:.1f} s = {rates[name][-1]} tickets/s")
                first.setdefault(name, out)
                if name == "B":
                    checks.append(compare(first["A"][0], out[0], field))
                    if n > 1:  # adapter 2 vs adapter 1 on the same tickets: really distinct LoRAs?
                        report["task2_vs_task1_max_prob_diff"] = compare(first["A"][1], out[1], field)[1]
    best_a, best_b = max(rates["A"]), max(rates["B"])
    same = min(s for s, _ in checks)
    report.update({
        "one_task_tickets_per_s": best_a, "n_tasks_tickets_per_s": best_b, "runs": rates,
        "median_tickets_per_s": {k: statistics.median(v) for k, v in rates.items()}, "cold_prefix": args.cold_prefix,
        "overhead": round(1 - best_b / best_a, 3), "target_overhead": TARGET_OVERHEAD,
        "task1_compared": len(streams[0]), "task1_identical_labels": same,
        "task1_identical_share": round(same / len(streams[0]), 4),
        "task1_max_prob_diff": max(d for _, d in checks),
    })
    return report


def print_table(report: dict[str, Any]) -> None:
    n, runs = report["tasks"], report["runs"]
    c.say(f"\n{n} tasks on one engine vs one task: {report['tickets']} tickets, batches of "
          f"{report['max_batch']}, {n} streams, best of {report['repeats']}")
    c.say(f"  {'pass':<34}{'tickets/s':>10}   runs")
    c.say(f"  {'A  one task (1 adapter)':<34}{report['one_task_tickets_per_s']:>10.2f}   {runs['A']}")
    c.say(f"  {f'B  {n} tasks ({n} adapters, mixed)':<34}{report['n_tasks_tickets_per_s']:>10.2f}   {runs['B']}")
    ok = "met" if report["overhead"] <= TARGET_OVERHEAD else "NOT met"
    c.say(f"  overhead 1 - B/A: {report['overhead']:.1%} (target <= {TARGET_OVERHEAD:.0%}: {ok})")
    c.say(f"  task 1 labels, B vs A: {report['task1_identical_labels']}/{report['task1_compared']} identical "
          f"({report['task1_identical_share']:.1%}), max |dp| {report['task1_max_prob_diff']:.2g}")
    if "task2_vs_task1_max_prob_diff" in report:
        c.say(f"  adapters distinct: task 2 vs task 1 on the same tickets, max |dp| "
              f"{report['task2_vs_task1_max_prob_diff']:.2g} (> 0 expected)")
    m = report.get("memory")
    if not m:
        return
    c.say(f"  {'memory (process tree)':<34}{'RSS MiB':>10}{'USS MiB':>10}")
    for label, rss, uss in [(f"{n}-task process", m["n_task"]["rss"], m["n_task"]["uss"]),
                            ("1-task process", m["one_task"]["rss"], m["one_task"]["uss"]),
                            (f"{n} single-task processes", m["n_single_rss"], m["n_single_uss"])]:
        c.say(f"  {label:<34}{rss:>10.0f}{uss:>10.0f}")
    if n > 1:
        c.say(f"  {'per extra task (adapter)':<34}{m['per_extra_adapter_rss']:>10.1f}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    c.setup()
    if args.memory_only:
        print(json.dumps(asyncio.run(memory_only(args))), flush=True)
        return 0
    report = asyncio.run(timing(args))
    if not args.no_memory:  # after the timing engine is gone: one engine at a time
        c.say("memory: a fresh 1-task process, then a fresh N-task process ...")
        one, many = memory_of(args, 1), memory_of(args, args.tasks)
        extra = (many["rss"] - one["rss"]) / (args.tasks - 1) if args.tasks > 1 else None
        report["memory"] = {"one_task": one, "n_task": many, "n_single_rss": round(args.tasks * one["rss"], 1),
                            "n_single_uss": round(args.tasks * one["uss"], 1),
                            "per_extra_adapter_rss": None if extra is None else round(extra, 1)}
    report["machine"] = c.machine()
    print_table(report)
    if args.json:
        c.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
