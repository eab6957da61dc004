"""bench/faults.py scenario `teacher_rebalance`: a second teacher worker joins and later leaves
the teacher group during a teacher outage (issue 23 item 1).

Tickets flow at --rate for 10 s + --outage-s + 20 s; the stand-in answers HTTP 500 for
--outage-s. At the outage's start a second `triage serve --role teacher` process (T) starts in
replica A's teacher group, sharing A's training log (as replicas share the triage-data volume);
once it is ready (partitions assigned: the first rebalance) it stays a while, then gets SIGTERM
(a graceful leave: the second rebalance), all before the outage ends. aiokafka's eager
protocol revokes every partition each time, which is where the old lane double-spent.

Beyond the usual row (lost, duplicated, stall), the target needs:
- every key's records: any number of `unverified`, then one final answer (a correction follows
  an unverified answer; nothing answers twice, nothing unverified after the teacher's);
- teacher calls (HTTP 200s of the stand-in) <= escalated keys + the teacher calls in progress
  at each rebalance, as the workers log them when they cancel the tasks of partitions that
  moved, or stop;
- T joined and left while the teacher was down.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench import _faults_data as data
from bench import _faults_infra as infra
from bench._faults_infra import progress
from bench._faults_report import first_after, row

CANCELLED = re.compile(r"teacher lane: cancelled (\d+) escalations \(([^;]*); (\d+) teacher calls in progress\)")
ASSIGNED = re.compile(r"teacher lane: assigned (\d+) partitions")


def log_marks(workdir: Path) -> dict[Path, int]:
    """Where each of a replica's log files ends now (read only what follows)."""
    return {p: p.stat().st_size for p in workdir.glob("serve-*.log")}


def log_since(workdir: Path, marks: dict[Path, int]) -> list[str]:
    lines: list[str] = []
    for p in sorted(workdir.glob("serve-*.log")):
        with open(p, "rb") as f:
            f.seek(marks.get(p, 0))
            lines += f.read().decode(errors="replace").splitlines()
    return lines


def rebalance_figures(lines: list[str]) -> dict[str, int]:
    cancels = [CANCELLED.search(line) for line in lines]
    cancels = [m for m in cancels if m]
    return {"assignments": sum(bool(ASSIGNED.search(line)) for line in lines),
            "cancelled": sum(int(m.group(1)) for m in cancels),
            "calls_in_progress": sum(int(m.group(3)) for m in cancels)}


def answer_order(records: list[Any], keys: set[bytes]) -> tuple[int, list[str]]:
    """(keys with more than one record, keys breaking 'unverified..., then one final answer')."""
    routes: dict[bytes, list[str]] = defaultdict(list)
    for r in records:
        if r.kind == "result" and r.key in keys:
            routes[r.key].append(r.route or "?")
    bad = []
    for key, seq in routes.items():
        final = [r for r in seq if r != "unverified"]
        if len(final) > 1 or (final and seq[-1] == "unverified"):
            bad.append(f"{key.decode(errors='replace')}: {'>'.join(seq)}")
    return sum(len(seq) > 1 for seq in routes.values()), bad


def teacher_worker(d: Any) -> infra.Replica:
    """`triage serve --role teacher` in A's teacher group, with A's training log."""
    from services.dev.broker import free_port

    port = free_port()
    env = infra.replica_env(
        bootstrap=d.bootstrap, topics=d.topics(), group=f"faults-main-{d.suffix}", port=port,
        workdir=d.workdir / "A", registry=d.workdir / "registry", teacher_url=d.teacher.base_url,
        threshold=d.args.threshold, max_batch=d.args.max_batch, partitions=4, task_path=None, core=None)
    return infra.Replica("T", env, d.workdir / "T", port, args=("--role", "teacher"))


async def scenario_teacher_rebalance(d: Any, procs: list[infra.Replica]) -> list[dict[str, Any]]:
    a = d.replicas.get("A")
    before_s, length_s, after_s = 10.0, d.args.outage_s, 20.0
    total_s = before_s + length_s + after_s
    n = max(1, round(d.args.rate * d.args.scale * total_s))
    msgs = data.tickets("tr", data.good_texts(n, offset=1500))
    reader = await d.reader()
    marks = log_marks(a.workdir) if a is not None else {}
    answered_before = d.teacher.stats["answered_total"]
    second = teacher_worker(d)
    events: list[str] = []
    joined = left = None
    try:
        flow = asyncio.create_task(infra.produce(d.bootstrap, d.topics()["tickets"], msgs, rate=n / total_s))
        await asyncio.sleep(before_s)
        d.teacher.set_faults(error_rate=1.0)
        start = time.time()
        progress(f"teacher rebalance: stand-in down for {length_s:.0f} s; starting a second teacher worker")
        procs.append(second.start())
        ready = await infra.wait_ready([second], max(1.0, length_s - 10))
        if ready:
            joined = time.time() - start
            events.append(f"T ready (joined) at +{joined:.1f} s")
            await asyncio.sleep(max(0.0, min(8.0, length_s - joined - 6)))
        else:
            events.append("T not ready before the outage's last 10 s: " + " / ".join(second.tail(3)))
        if second.alive():
            os.kill(second.proc.pid, signal.SIGTERM)  # a graceful leave: stop(), then leave the group
            try:
                await asyncio.to_thread(second.proc.wait, 30)
                left = time.time() - start
                events.append(f"T left (rc {second.proc.returncode}) at +{left:.1f} s")
            except subprocess.TimeoutExpired:
                events.append("T did not exit within 30 s of SIGTERM")
        await asyncio.sleep(max(0.0, length_s - (time.time() - start)))
        d.teacher.set_faults(error_rate=0.0)
        end = time.time()
        progress("teacher rebalance: stand-in back to normal")
        produced = await flow
        await reader.wait_for(set(produced.sent), d.args.drain_s)
    finally:
        d.teacher.set_faults(error_rate=0.0)
        second.kill()
        await reader.stop()
    keys = set(produced.sent)
    mine = [r for r in reader.records if r.key in keys]
    escalated = {r.key for r in mine if r.kind == "result" and r.route in ("teacher", "unverified")}
    calls = d.teacher.stats["answered_total"] - answered_before
    lines = (log_since(a.workdir, marks) if a is not None else []) + log_since(second.workdir, {})
    figures = rebalance_figures(lines)
    multi, disorder = answer_order(reader.records, keys)
    res = row("teacher rebalance (2nd worker joins + leaves in a 30 s outage)", produced, reader,
              recovery=first_after(mine, end, route="teacher"), notes=[], stall_cap=d.args.stall_cap_s,
              labels=d.labels["main"],
              extra={"teacher_calls": calls, "escalated": len(escalated), "rebalance": figures,
                     "keys_with_several_records": multi, "out_of_order": disorder[:20]})
    bound = len(escalated) + figures["calls_in_progress"]
    missed = []
    if calls > bound:
        missed.append(f"teacher calls {calls} > escalated {len(escalated)} + in progress {figures['calls_in_progress']}")
    if disorder:
        missed.append(f"{len(disorder)} keys not 'unverified..., then one answer'")
    if res["duplicated"]:
        missed.append(f"{res['duplicated']} keys answered twice")
    if joined is None or left is None or left > length_s:
        missed.append("the second worker did not join and leave within the outage")
    if missed:
        res["target_met"] = False
        verdict = res["notes"][0]
        res["notes"][0] = ("NOT met: " + ", ".join(missed) + ("; " + verdict[9:] if verdict.startswith("NOT met") else ""))
    res["notes"] += events + [
        f"teacher calls {calls} (bound: escalated {len(escalated)} + {figures['calls_in_progress']} in progress "
        f"at the rebalances; {figures['cancelled']} escalations cancelled on partitions that moved or at T's stop)",
        f"{figures['assignments']} assignments logged; {multi} keys with several records (unverified, then "
        f"the correction)"]
    return [res]
