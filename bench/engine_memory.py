"""Does the engine's memory level off under fresh traffic? (issue 27: the soak's RSS growth)

Runs the real student (the current adapter of --registry) on --tickets BANKING77 train
texts it has not seen, in batches of 1..48 (seeded), and every 250 tickets reads the
anonymous memory (RssAnon) of each engine process. The soak found the vLLM worker's growing
by ~1.1 GiB over an hour: nearly every engine step has a batch shape not seen before, and
oneDNN compiles and keeps a matmul kernel per shape, up to 1,024 in vLLM's copy and 1,024
in PyTorch's (which runs the LoRA deltas). `--kernel-cache` sets both bounds
(Settings.cpu_kernel_cache_entries); 1024 is oneDNN's own default.

    .venv/bin/python -m bench.engine_memory --tickets 9000 --kernel-cache 1024
    .venv/bin/python -m bench.engine_memory --tickets 9000            # the service default

Reports, per engine process, its anonymous memory after warm-up, at each third of the run
and at the end, and the growth over the last two thirds (what a soak after warm-up sees).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as c  # noqa: E402

MiB = 1024 * 1024


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tickets", type=int, default=9000)
    p.add_argument("--registry", default="var/demo/registry", help="serve its current adapter")
    p.add_argument("--kernel-cache", type=int, default=None,
                   help="oneDNN kernels kept per copy (default: the service's setting)")
    p.add_argument("--every", type=int, default=250, help="sample every N tickets")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def engine_anon() -> dict[int, int]:
    """RssAnon bytes of each process below this one (the engine core and its worker)."""
    import psutil

    out = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            with open(f"/proc/{proc.pid}/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        out[proc.pid] = int(line.split()[1]) * 1024
        except OSError:
            continue
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {} if args.kernel_cache is None else {"cpu_kernel_cache_entries": args.kernel_cache}
    settings = c.base_settings(**overrides)
    raw = c.texts(args.tickets, split="train")
    rng = random.Random(1)
    samples: list[dict[str, Any]] = []
    async with c.engine(settings, args.registry) as classifier:
        await classifier.classify(c.texts(64, split="test"))  # warm-up: not the texts measured
        started, done, since = time.perf_counter(), 0, 0
        samples.append({"tickets": 0, "s": 0.0, "anon": engine_anon()})
        while done < len(raw):
            size = rng.randint(1, 48)
            await classifier.classify(raw[done:done + size])
            done, since = done + min(size, len(raw) - done), since + size
            if since >= args.every or done == len(raw):
                since = 0
                samples.append({"tickets": done, "s": round(time.perf_counter() - started, 1),
                                "anon": engine_anon()})
                worker = max(samples[-1]["anon"].values(), default=0)
                c.say(f"{done:6d} tickets {samples[-1]['s']:7.1f} s  largest engine process "
                      f"{worker / MiB:7.0f} MiB anonymous")
        seconds = time.perf_counter() - started
    return summarise(samples, len(raw), seconds, settings)


def summarise(samples: list[dict[str, Any]], tickets: int, seconds: float, settings: Any) -> dict[str, Any]:
    def at(fraction: float) -> dict[str, Any]:
        return min(samples, key=lambda s: abs(s["tickets"] - fraction * tickets))

    points = [at(0.0), at(1 / 3), at(2 / 3), at(1.0)]
    procs = []
    for pid in samples[0]["anon"]:
        mib = [round(p["anon"].get(pid, 0) / MiB) for p in points]
        growth = (mib[3] / mib[1] - 1) if mib[1] else None
        procs.append({"pid": pid, "anon_mib": mib,
                      "growth_last_two_thirds": None if growth is None else round(growth, 4)})
    return {"bench": "engine_memory", "tickets": tickets, "tickets_per_s": round(tickets / seconds, 1),
            "kernel_cache_entries": settings.cpu_kernel_cache_entries,
            "dtype": c.served_dtype(settings), "machine": c.machine(),
            "at_tickets": [p["tickets"] for p in points], "processes": procs, "samples": samples}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    c.setup()
    os.environ.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)  # the setting decides, not a stray
    os.environ.pop("LRU_CACHE_CAPACITY", None)
    report = asyncio.run(run(args))
    c.say("")
    c.say(f"kernel cache {report['kernel_cache_entries']} per oneDNN, dtype {report['dtype']}, "
          f"{report['tickets_per_s']} tickets/s, flags {' '.join(report['machine']['cpu_flags'])}")
    for proc in report["processes"]:
        growth = proc["growth_last_two_thirds"]
        c.say(f"engine process {proc['pid']}: anonymous MiB at {report['at_tickets']} tickets: "
              f"{proc['anon_mib']}  (last two thirds {'' if growth is None else f'{growth:+.1%}'})")
    c.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
