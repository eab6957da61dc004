"""Does the teacher's latency reach confident tickets? Student-route latency and throughput
with the teacher at 0 ms and at 1,500 ms, against the same tickets with no escalation at all.

    .venv/bin/python -m bench.escalation --registry var/recipe/registry      # a distilled adapter
    .venv/bin/python -m bench.escalation --tickets 300                       # base model

One process: embedded Tansu broker, the real vLLM student, one TriageService per pass running
both the student consumer and the teacher worker (`role=all`, as `triage serve` does by
default); the gold-label stand-in teacher runs in its own process (`--latency-ms` per pass).
With `--registry` the adapter's own calibrated threshold decides what escalates; without it
the threshold is set at the `--escalate` quantile of the base model's confidences on these
tickets. Passes, on the same tickets (vLLM prefix cache reset before each, fresh topics and
training log each):
  A. no escalation (threshold 0): the serving path alone;
  B. teacher at 0 ms;  C. teacher at `--slow-ms` (default 1,500 ms).
Every ticket is produced at once. Figures per pass: tickets/s (first produce -> last ticket's
first result), p50/p99 of produce -> result for tickets the student answered alone.
Targets: p99 student route C <= 1.2 x B; throughput C >= 0.9 x A.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as c  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.escalation", description=__doc__.split("\n\n")[0])
    p.add_argument("--tickets", type=int, default=600, help="BANKING77 test tickets (default 600)")
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--registry", help="serve this registry's current adapter with its own threshold")
    p.add_argument("--escalate", type=float, default=0.3, help="base model only: share to escalate")
    p.add_argument("--slow-ms", type=float, default=1500.0, help="the slow teacher's latency")
    p.add_argument("--warmup", type=int, default=32)
    p.add_argument("--timeout-s", type=float, default=600)
    p.add_argument("--out", help="write the JSON report here (default: print it)")
    return p.parse_args(argv)


def start_standin(latency_ms: float) -> tuple[subprocess.Popen, str]:
    from services.dev.broker import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.dev.standin", "--port", str(port), "--latency-ms", str(latency_ms)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()  # "... STAND-IN (not a model) at http://..."
    if "http" not in line:
        proc.kill()
        raise RuntimeError(f"stand-in did not start: {line!r}")
    return proc, f"http://127.0.0.1:{port}/v1"


async def one_pass(name: str, bootstrap: str, classifier: Any, workdir: Path, raw: list[str],
                   timeout_s: float, **overrides: Any) -> dict[str, Any]:
    reset = await c.reset_prefix_cache(classifier)
    async with c.service(bootstrap, classifier, workdir, **overrides) as (svc, results):
        messages = c.ticket_messages(f"esc-{name}", raw)
        keys = {k for k, _ in messages}
        sent_at = await c.produce_burst(bootstrap, svc.settings.tickets_topic, messages)
        complete = await results.wait_for(keys, timeout_s)
        teacher_calls = (svc.worker.teacher.stats().get("calls", 0)
                         if svc.worker is not None and svc.worker.teacher is not None else 0)
    first = min(sent_at.values())
    seen = [results.first_seen[k] for k in keys if k in results.first_seen]
    student_ms = [(results.first_seen[k] - sent_at[k]) * 1000 for k in keys
                  if results.first_route.get(k) == "student"]
    routes: dict[str, int] = {}
    for k in keys:
        route = results.first_route.get(k, "missing")
        routes[route] = routes.get(route, 0) + 1
    seconds = max(seen) - first if seen else float("nan")
    out = {
        "pass": name, "complete": complete, "results": len(seen), "seconds": round(seconds, 2),
        "tickets_per_s": round(len(seen) / seconds, 2) if seen else 0.0,
        "first_routes": routes, "escalated_share": round(1 - routes.get("student", 0) / len(keys), 3),
        "teacher_calls": teacher_calls,
        "student_p50_ms": c.percentile(student_ms, 0.5), "student_p99_ms": c.percentile(student_ms, 0.99),
        "prefix_cache_reset": reset,
    }
    c.say(f"{name:<28} {out['tickets_per_s']:7.2f} tickets/s  escalated {out['escalated_share']:.1%}  "
          f"student-route p50/p99 {out['student_p50_ms'] or 0:.0f}/{out['student_p99_ms'] or 0:.0f} ms"
          f"{'' if complete else '  INCOMPLETE'}")
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.dev.broker import EmbeddedBroker

    settings = c.base_settings()
    raw = c.texts(args.tickets, offset=args.offset)
    warm = c.model_texts(c.texts(args.warmup, split="train"))
    report: dict[str, Any] = {"bench": "escalation", "tickets": len(raw), "machine": c.machine()}
    # The service follows its registry: point it at the served one, or it swaps to the base model.
    served = {"registry_dir": Path(args.registry).resolve()} if args.registry else {}
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory(prefix="bench-esc-") as tmp:
        async with c.engine(settings, args.registry) as classifier:
            await classifier.classify(warm)
            adapter = classifier.live_adapter
            report["adapter"] = getattr(adapter, "adapter_id", None)
            if adapter is not None and adapter.threshold is not None:
                threshold = None  # the service uses the adapter's own calibrated threshold
                report["threshold"] = adapter.threshold
            else:
                confidences = sorted(p.confidence for p in await classifier.classify(c.model_texts(raw)))
                threshold = confidences[int(args.escalate * len(confidences))]
                report["threshold"] = threshold
            c.say(f"adapter {report['adapter'] or 'none (base model)'}; threshold {report['threshold']}")
            passes = [await one_pass("A no escalation", broker.bootstrap_servers, classifier, Path(tmp), raw,
                                     args.timeout_s, **served)]
            for name, latency in (("B teacher 0 ms", 0.0), (f"C teacher {args.slow_ms:.0f} ms", args.slow_ms)):
                proc, url = start_standin(latency)
                try:
                    passes.append(await one_pass(
                        name, broker.bootstrap_servers, classifier, Path(tmp), raw, args.timeout_s,
                        confidence_threshold=threshold, teacher_base_url=url, teacher_model="gold-label-standin",
                        teacher_api_key="bench", **served))
                finally:
                    proc.terminate()
                    proc.wait(timeout=10)
    a, b, slow = passes
    report["passes"] = passes
    p99_ratio = (slow["student_p99_ms"] or 0) / max(1e-9, b["student_p99_ms"] or 0)
    tp_ratio = slow["tickets_per_s"] / max(1e-9, a["tickets_per_s"])
    report["student_p99_slow_vs_fast"] = round(p99_ratio, 3)
    report["throughput_slow_vs_no_escalation"] = round(tp_ratio, 3)
    report["targets_met"] = all(p["complete"] for p in passes) and p99_ratio <= 1.2 and tp_ratio >= 0.9
    c.say(f"\nstudent-route p99 at {args.slow_ms:.0f} ms / at 0 ms: {p99_ratio:.2f} (target <= 1.2)")
    c.say(f"throughput at {args.slow_ms:.0f} ms / no escalation: {tp_ratio:.2f} (target >= 0.9)")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    c.setup()
    started = time.monotonic()
    report = asyncio.run(run(args))
    report["wall_s"] = round(time.monotonic() - started, 1)
    c.write_json(args.out, report)
    return 0 if all(p["complete"] for p in report["passes"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
