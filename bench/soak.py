"""Soak: two `triage serve` replicas under steady load for an hour, with a nightly cycle, a
teacher outage, a kill -9 and a rollback inside the run (issue 27, item 1).

    .venv/bin/python bench/soak.py                       # 60 minutes (make soak)
    .venv/bin/python bench/soak.py --minutes 10          # the CI-adjacent mode: schedule scaled

The deployment shape of bench/faults.py (its Replica, Supervisor, replica_env, producer and
outcome reader): an embedded Tansu broker, the gold-label stand-in as teacher (in this
process), replicas A and B as real `triage serve` processes in one consumer group, each
pinned to one core (VLLM_CPU_OMP_THREADS_BIND=0 / 1: one engine per core, so their OpenMP
pools don't fight), sharing one registry and one training log (as replicas share the
triage-data volume). The run starts from an adapter: --registry (default var/demo/registry)
is copied into the work dir with the training log beside it (<registry>/../data) and the
distil caches (<registry>/../distill/{eval,frozen}-cache), so the nightly distil trains on
that log plus what this run escalates.

1. calibration (unless --capacity): a burst of --calibration-tickets; capacity = tickets /
   (first produce -> last first outcome); the producer then runs open loop at --load x it.
2. the schedule (offsets scale with --minutes; at 60: 5-minute windows, 10 minutes warm-up):
   teacher outage (the stand-in answers HTTP 500) at 15 min for 5 min; kill -9 of B's
   process group at 24 min, restarted at once by the supervisor (as an orchestrator would);
   `triage distill` at 27 min (niced: the nightly job yields to serving; its own retention,
   `triage gc --apply`, runs at its end), its promotion hot-swaps both replicas through the
   control topic; `triage rollback` at 45 min or one window after the hot-swap, whichever is
   later; the run goes on for two windows after the rollback's swap. A distil that rejects
   its candidate is followed by `triage promote` of that candidate (added to the registry with
   the certificate the distil wrote, as a person would), or of another adapter of the registry
   if the distil failed, so the swap is still exercised (reported as such).
3. a sampler every --sample-s: committed consumer lag of the student group on the tickets
   topic and of the teacher group on the escalations topic; RSS, USS and open fds of each
   replica's process tree (serve + vLLM engine core), the broker, this process and a running
   distil; the training log's, registry's, run dirs' and caches' bytes; each replica's live
   adapter (its /metrics).

`--fake-student` (bench/_soak_fake.py): the same run with a fake classifier in each replica and
a stand-in distil (a copy of the live adapter under a new id, promoted): the plumbing without an
engine, e.g. `--fake-student --minutes 2 --load 0.2`.

Per window: tickets in / out, lost, duplicated keys (`dup` = keys breaking "unverified...,
then one answer" + `c` corrections after `unverified`), lag max (tickets / escalations),
student-route p50 / p99 (produce -> first result), escalation rate, memory and fds per
process, disk. Then the issue's checks as PASS / FAIL, the JSON (--json) and a PNG (--png).
Exit 1 if a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script (`python bench/soak.py`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _faults_infra as infra  # noqa: E402
from bench import _soak_report as rep  # noqa: E402
from bench._soak_procs import REPLICAS, RefGold, Soak, progress  # noqa: E402
from bench._soak_report import Schedule  # noqa: E402
from bench._soak_sample import Sampler, cpu_lines, cpu_per_window, log_rows  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/soak.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=60.0, help="length of the run proper (schedule scales)")
    p.add_argument("--load", type=float, default=0.7, help="producer rate as a fraction of the capacity")
    p.add_argument("--capacity", type=float, default=None,
                   help="tickets/s of the two replicas together (skips the calibration burst)")
    p.add_argument("--calibration-tickets", type=int, default=240)
    p.add_argument("--registry", default="var/demo/registry",
                   help="registry to start from (copied); its ../data training log and ../distill caches too")
    p.add_argument("--workdir", default="var/soak", help="replica logs, registry copy, log, distil runs (wiped)")
    p.add_argument("--json", dest="json_path", default="var/bench/soak.json")
    p.add_argument("--png", default="var/bench/soak.png")
    p.add_argument("--fake-student", action="store_true",
                   help="replicas with a fake classifier and a stand-in distil (bench/_soak_fake.py): "
                        "the plumbing in minutes, no engine")
    p.add_argument("--stub-distil", action="store_true",
                   help="the real engine, but the nightly distil is the stand-in of --fake-student (the live "
                        "adapter under a new id, promoted): the hot-swap and rollback without a training run")
    p.add_argument("--verbatim-texts", action="store_true",
                   help="tickets as BANKING77 has them (texts repeat) instead of each with its own ' (ref N)'")
    p.add_argument("--max-batch", type=int, default=64, help="TRIAGE_MAX_BATCH of the replicas")
    p.add_argument("--sample-s", type=float, default=None, help="sampling period (default 5 s at 60 min, scaled, >= 2)")
    p.add_argument("--distil-minutes", type=float, default=None,
                   help="training budget of the nightly distil (default 8 at 60 min, scaled, >= 1)")
    p.add_argument("--distil-eval-limit", type=int, default=None,
                   help="held-out rows per evaluation (default all at >= 30 min, else 900)")
    p.add_argument("--distil-arg", action="append", default=[], help="extra `triage distill` argument (repeatable)")
    p.add_argument("--nice", type=int, default=10, help="niceness of the distil (the nightly job yields to serving)")
    p.add_argument("--drain-s", type=float, default=240.0, help="wait for every outcome after the last produce")
    p.add_argument("--start-timeout-s", type=float, default=600.0)
    p.add_argument("--lag-cap-s", type=float, default=60.0)
    args = p.parse_args(argv)
    scale = args.minutes / 60.0
    args.sample_s = args.sample_s or max(2.0, 5.0 * scale)
    args.distil_minutes = args.distil_minutes or max(1.0, 8.0 * scale)
    if args.distil_eval_limit is None:
        args.distil_eval_limit = 0 if args.minutes >= 30 else 900
    return args


def prepare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Fresh work dir: the registry, its training log (a consistent copy) and the distil caches."""
    src = Path(args.registry)
    if not (src / "current.json").is_file():
        raise SystemExit(f"{src}: no registry with a current adapter (run `make demo` first, or pass --registry)")
    if workdir.exists():
        if not (workdir / "soak.marker").exists() and any(workdir.iterdir()):
            raise SystemExit(f"{workdir} exists and is not a soak's work dir: pick another --workdir")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / "soak.marker").write_text("bench/soak.py work dir: wiped by the next run\n")
    shutil.copytree(src, workdir / "registry")
    info: dict[str, Any] = {"registry": str(src), "log": None, "caches": []}
    (workdir / "data").mkdir()
    log_src = src.parent / "data" / "training_log.sqlite3"
    if log_src.is_file():
        with sqlite3.connect(f"file:{log_src}?mode=ro", uri=True) as a, \
                sqlite3.connect(workdir / "data" / "training_log.sqlite3") as b:
            a.backup(b)
        info["log"] = str(log_src)
    (workdir / "distill").mkdir()
    for cache in ("eval-cache", "frozen-cache"):
        if (src.parent / "distill" / cache).is_dir():
            shutil.copytree(src.parent / "distill" / cache, workdir / "distill" / cache)
            info["caches"].append(cache)
    return info


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.dev.broker import EmbeddedBroker
    from services.dev.standin import run_standin

    workdir = Path(args.workdir).resolve()
    prep = prepare(args, workdir)
    report: dict[str, Any] = {"bench": "soak", "args": vars(args), "prepared": prep,
                              "schedule": vars(Schedule.for_minutes(args.minutes))}
    rows_before = log_rows(workdir / "data" / "training_log.sqlite3")
    async with AsyncExitStack() as stack:
        broker = EmbeddedBroker().start()
        stack.callback(broker.stop)
        from services.dev.standin_gold import load_gold

        teacher = await stack.enter_async_context(run_standin(gold=RefGold(load_gold(None))))
        soak = Soak(args, workdir, broker, teacher)
        stack.callback(infra.kill_all)
        progress(f"broker {soak.bootstrap}, stand-in {teacher.base_url}, workdir {workdir}")
        await soak.deploy()
        supervisor = infra.Supervisor(soak.replicas.values(), max_restarts=10).start()
        stack.push_async_callback(supervisor.stop)
        soak.reader = await infra.OutcomeReader(soak.bootstrap, soak.topics["results"], soak.topics["dlq"]).start()
        stack.push_async_callback(soak.reader.stop)
        soak.sampler = await Sampler(soak, args.sample_s).start()
        stack.push_async_callback(soak.sampler.stop)
        capacity = args.capacity or await soak.calibrate()
        rate = args.load * capacity
        if rate <= 0:
            raise SystemExit("capacity 0: nothing answered in the calibration")
        t0 = time.time()
        soak.stop_at = t0 + soak.schedule.duration_s
        progress(f"producing at {rate:.2f} tickets/s ({args.load:g} x {capacity:.2f}) for >= {args.minutes:g} min")
        producer = asyncio.create_task(soak.produce_loop(rate, t0))
        schedule = asyncio.create_task(soak.run_schedule(t0))
        await schedule
        await producer
        t_produced = time.time()
        progress(f"produced {len(soak.sent)}; waiting for every outcome (<= {args.drain_s:g} s)")
        await soak.reader.wait_for(set(soak.sent), args.drain_s, quiet_s=3.0)
        drain_deadline = time.monotonic() + 60
        while time.monotonic() < drain_deadline:  # final lag to 0 (informational)
            if soak.sampler.samples and all(soak.sampler.samples[-1]["lag"].get(t) == 0 for t in rep.LAG_TOPICS):
                break
            await asyncio.sleep(args.sample_s)
        t_end = time.time()
        records = list(soak.reader.records)
        samples = list(soak.sampler.samples)
        report.update({
            "capacity": round(capacity, 3), "rate": round(rate, 3), "t0": t0, "produced_until": t_produced,
            "t_end": t_end, "produced": len(soak.sent), "refused": len(soak.refused), "events": soak.events,
            "distil": soak.distil, "notes": soak.notes + supervisor.drain(), "sampler_errors": soak.sampler.errors,
            "reader_errors": dict(soak.reader.errors),
            "replicas": {n: {"starts": r.starts, "events": r.events, "log_tail": r.tail(10)}
                         for n, r in soak.replicas.items()},
        })
    keys = rep.key_figures(soak.sent, records)
    sc = Schedule.for_minutes(args.minutes)
    rows = rep.windows(keys, samples, soak.events, t0, t_produced, sc.window_s)
    report["windows"] = rows
    report["cpu_windows"] = cpu_per_window(samples, rep.window_bounds(t0, t_produced, sc.window_s))
    report["checks"] = rep.checks(keys, rows, samples, soak.events, t0=t0, schedule=sc, replicas=REPLICAS,
                                  lag_cap_s=args.lag_cap_s)
    rows_after = log_rows(workdir / "data" / "training_log.sqlite3")
    report["training_log_rows"] = {"start": rows_before, "end": rows_after}
    report["disk"] = {"start": samples[0]["disk"] if samples else {}, "end": samples[-1]["disk"] if samples else {}}
    report["samples"] = samples
    return report



def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from bench import _common

    _common.setup()

    report, seconds = infra.run_then_kill_all(run(args))
    report["seconds"] = seconds
    report["machine"] = _common.machine()
    print(rep.table(report["windows"], REPLICAS), flush=True)
    lines = rep.check_lines(report["checks"])
    d0, d1 = report["disk"]["start"], report["disk"]["end"]
    rows = report["training_log_rows"]
    print(f"\ncapacity {report['capacity']} tickets/s, producing at {report['rate']} for "
          f"{(report['produced_until'] - report['t0']) / 60:.1f} min: {report['produced']} tickets")
    print(f"distil: {report['distil'].get('verdict', '-')}; {report['distil'].get('gc') or 'no gc line'}")
    print("disk start -> end: " + ", ".join(f"{k} {d0.get(k, 0) / 1e6:.1f} -> {d1.get(k, 0) / 1e6:.1f} MB" for k in d1)
          + f"; training-log rows {rows['start']} -> {rows['end']}"
          + (f" ({(d1['training_log'] - d0['training_log']) / (rows['end'] - rows['start']):.0f} bytes a new row)"
             if rows["start"] is not None and rows["end"] and rows["end"] > rows["start"] and d0 else ""))
    for n in report["notes"]:
        print(f"note: {n}")
    print("\n".join(cpu_lines(report.get("cpu_windows", []))))
    print("\n".join(lines), flush=True)
    judged = [c["ok"] for k, c in report["checks"].items() if isinstance(c, dict) and "ok" in c]
    report["target_met"] = all(ok is not False for ok in judged)
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        rep.plot(args.png, report["windows"], report["samples"], report["events"], report["t0"],
                 f"bench/soak.py --minutes {args.minutes:g}: {report['rate']} tickets/s "
                 f"({args.load:g} x {report['capacity']})")
        progress(f"wrote {args.png}")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=2, default=str) + "\n")
        progress(f"wrote {args.json_path}")
    return 0 if report["target_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
