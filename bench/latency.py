"""End-to-end latency under steady load at 50% and 90% of measured capacity.

    .venv/bin/python -m bench.latency                                   # 60 s per load level
    .venv/bin/python -m bench.latency --seconds 15 --capacity-tickets 60 --out var/bench/latency.json

One process: embedded Tansu broker, the real vLLM student, one TriageService (no teacher,
confidence_threshold=0.0: nothing escalates). Phases, in order:
  1. capacity: produce `--capacity-tickets` at once, wait for every result; capacity =
     tickets / (first produce -> last result), as in bench/throughput.py (b);
  2. for each `--levels` fraction (default 0.5, 0.9): produce at a fixed rate
     (fraction x capacity) for `--seconds`, open loop, and wait for every result.
Latency = produce call -> result received by a reader on the results topic (both on this
machine's clock). Every phase uses fresh ticket texts (no prefix-cache replays), is capped
at `--max-tickets`, and waits at most `--drain-s` after its last produce.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script (`python bench/x.py`): find the repo's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as c  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0, help="steady-load duration per level")
    p.add_argument("--levels", default="0.5,0.9", help="comma list of fractions of capacity")
    p.add_argument("--capacity-tickets", type=int, default=300, help="burst size to measure capacity")
    p.add_argument("--max-tickets", type=int, default=20_000, help="cap on tickets per load level")
    p.add_argument("--drain-s", type=float, default=120.0, help="max wait for results after the last produce")
    p.add_argument("--warmup", type=int, default=32, help="warm-up tickets (train split, not timed)")
    p.add_argument("--max-batch", type=int, default=None, help="TRIAGE_MAX_BATCH (default: service default)")
    p.add_argument("--batch-timeout-ms", type=int, default=None, help="TRIAGE_BATCH_TIMEOUT_MS")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--out", help="write the JSON report here (default: print it)")
    return p.parse_args(argv)


def summarize(name: str, sent_at: dict[bytes, float], first_seen: dict[bytes, float],
              target_rate: float | None) -> dict[str, Any]:
    lat_ms = [(first_seen[k] - t) * 1000 for k, t in sent_at.items() if k in first_seen]
    sends = sorted(sent_at.values())
    done = [first_seen[k] for k in sent_at if k in first_seen]
    span_send = sends[-1] - sends[0] if len(sends) > 1 else 0.0
    span_done = max(done) - sends[0] if done else 0.0

    def r(x: float | None, nd: int = 1) -> float | None:
        return None if x is None else round(x, nd)

    return {
        "phase": name,
        "target_rate": r(target_rate, 3),
        "produced": len(sent_at),
        "results": len(lat_ms),
        "missing": len(sent_at) - len(lat_ms),
        # Offered rate: produces per second over the produce window (not for the burst).
        "offered_rate": r((len(sends) - 1) / span_send, 3) if span_send > 0 and target_rate else None,
        # Completed rate: results per second, first produce -> last result.
        "completed_rate": r(len(done) / span_done, 3) if span_done > 0 else None,
        "p50_ms": r(c.percentile(lat_ms, 0.50)),
        "p90_ms": r(c.percentile(lat_ms, 0.90)),
        "p99_ms": r(c.percentile(lat_ms, 0.99)),
        "mean_ms": r(statistics.fmean(lat_ms)) if lat_ms else None,
        "max_ms": r(max(lat_ms)) if lat_ms else None,
        "seconds": r(span_done, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.dev.broker import EmbeddedBroker

    levels = [float(x) for x in args.levels.split(",") if x.strip()]
    service_overrides: dict[str, Any] = {"topic_partitions": args.partitions}
    if args.max_batch is not None:
        service_overrides["max_batch"] = args.max_batch
    if args.batch_timeout_ms is not None:
        service_overrides["batch_timeout_ms"] = args.batch_timeout_ms
    settings = c.base_settings()
    report: dict[str, Any] = {"bench": "latency", "machine": c.machine(), "phases": []}
    offset = 0  # each phase takes the next texts of the test split (wrapping)

    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="bench-lat-") as tmp:
        c.say(f"starting the engine ({settings.model_path.name}, dtype {c.served_dtype(settings)}) ...")
        async with c.engine(settings) as classifier:
            await classifier.classify(c.model_texts(c.texts(args.warmup, split="train")))
            async with c.service(broker.bootstrap_servers, classifier, Path(tmp),
                                 **service_overrides) as (svc, results):
                s = svc.settings
                report["settings_used"] = {
                    "max_batch": s.engine_max_batch, "batch_timeout_ms": s.batch_timeout_ms,
                    "partitions": s.topic_partitions, "dtype": c.served_dtype(s),
                    "enforce_eager": s.enforce_eager, "max_num_seqs": s.max_num_seqs,
                }
                c.say(f"service ready: {report['settings_used']}")

                # 1. capacity: a burst, first produce -> last result.
                burst = c.ticket_messages("cap", c.texts(args.capacity_tickets, offset=offset))
                offset += len(burst)
                sent = await c.produce_burst(broker.bootstrap_servers, s.tickets_topic, burst)
                await results.wait_for(set(sent), max(args.drain_s, 2.0 * args.capacity_tickets))
                cap = summarize("capacity", sent, results.first_seen, None)
                if not cap["completed_rate"] or cap["missing"]:
                    raise RuntimeError(f"capacity burst incomplete: {cap}")
                capacity = cap["completed_rate"]
                report["capacity_per_s"] = capacity
                report["phases"].append(cap)
                c.say(f"capacity: {cap['results']} tickets in {cap['seconds']} s = {capacity:.2f} tickets/s")

                # 2. steady load at each level, open loop.
                for level in levels:
                    rate = level * capacity
                    n = max(1, min(args.max_tickets, round(rate * args.seconds)))
                    msgs = c.ticket_messages(f"load{int(level * 100)}", c.texts(n, offset=offset))
                    offset += n
                    c.say(f"load {level:.0%}: {n} tickets at {rate:.2f}/s for ~{n / rate:.0f} s ...")
                    t = time.monotonic()
                    sent = await c.produce_at_rate(broker.bootstrap_servers, s.tickets_topic, msgs, rate)
                    await results.wait_for(set(sent), args.drain_s)
                    phase = summarize(f"load_{int(level * 100)}pct", sent, results.first_seen, rate)
                    phase["level"] = level
                    phase["wall_s"] = round(time.monotonic() - t, 1)
                    report["phases"].append(phase)

    c.say("")
    c.say(_table(report["phases"]))
    return report


def _table(phases: list[dict[str, Any]]) -> str:
    cols = [("phase", "phase", "{}"), ("target/s", "target_rate", "{:.2f}"),
            ("offered/s", "offered_rate", "{:.2f}"), ("done/s", "completed_rate", "{:.2f}"),
            ("n", "produced", "{}"), ("missing", "missing", "{}"),
            ("p50 ms", "p50_ms", "{:.0f}"), ("p99 ms", "p99_ms", "{:.0f}"), ("max ms", "max_ms", "{:.0f}")]
    rows = [[h for h, _, _ in cols]]
    for p in phases:
        rows.append(["-" if p.get(k) is None else f.format(p[k]) for _, k, f in cols])
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
                     for r in rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    c.setup()
    report = asyncio.run(run(args))
    c.write_json(args.out, report)
    return 0 if all(p["missing"] == 0 for p in report["phases"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
