"""Fault suite: does the deployed system lose, stall or double-answer tickets under faults?

    .venv/bin/python bench/faults.py --json var/bench/faults.json        # all, ~10 min on 2 cores
    .venv/bin/python bench/faults.py --only poison --scale 0.1           # one scenario, small

A deployment shape, not internals: an embedded Tansu broker, the gold-label teacher stand-in
(in-process HTTP server), and the service as real `triage serve` processes configured only
through TRIAGE_* variables (replicas A and B share a consumer group; C serves a 150-label
task on its own topics). A supervisor restarts a replica that exits on its own, as an
orchestrator would. Per scenario: produce tickets with unique ids, read the results and
dead-letter topics until every produced key has an outcome (or --drain-s), and report

  fault | produced | results | dead-lettered | lost | duplicated result keys | max stall s |
  recovery s | notes

lost = produced keys with neither a result nor a dead-letter record; duplicated = keys with
more than one result record (not counting an `unverified` answer, then the teacher's correction:
that is the contract); max stall = longest time a partition had pending work and no
outcome; recovery = fault end -> first outcome after it (see each scenario). Target: 0 lost,
every bad input dead-lettered with a reason, every good ticket answered, no stall over
--stall-cap-s. Progress on stderr, the table on stdout, details in --json. Exit 1 if a
target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
import uuid
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

if __package__ in (None, ""):  # run as a script (`python bench/faults.py`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _faults_data as data  # noqa: E402
from bench import _faults_infra as infra  # noqa: E402
from bench._faults_infra import progress  # noqa: E402
from bench._faults_report import first_after, row, skipped, table  # noqa: E402
from bench._faults_teacher import scenario_teacher_rebalance  # noqa: E402

SCENARIOS = ("poison", "kill", "teacher_outage", "teacher_rebalance", "teacher_invalid", "broker_restart")
# kill first (it needs both replicas); poison late (on a build without per-ticket isolation a
# poison record wedges its partition for every later scenario); broker restart last (it wipes
# the memory-only broker, and with it any wedged partition).
RUN_ORDER = ("kill", "teacher_outage", "teacher_rebalance", "teacher_invalid", "poison", "broker_restart")
PARTITIONS = 4
HUGE_UNDER, HUGE_OVER = 1_000_000, 1_100_000  # around aiokafka's / Kafka's 1 MiB defaults


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/faults.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=SCENARIOS, action="append",
                   help="run only this scenario (repeatable)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every ticket count (0.1 = smoke)")
    p.add_argument("--json", dest="json_path", help="write the report here")
    p.add_argument("--threshold", type=float, default=0.4,
                   help="TRIAGE_CONFIDENCE_THRESHOLD: below it a ticket escalates to the teacher")
    p.add_argument("--max-batch", type=int, default=16, help="TRIAGE_MAX_BATCH of the replicas")
    p.add_argument("--rate", type=float, default=2.0, help="tickets/s while a timed fault runs")
    p.add_argument("--outage-s", type=float, default=30.0, help="teacher outage length")
    p.add_argument("--invalid-s", type=float, default=20.0, help="teacher invalid-answer window")
    p.add_argument("--drain-s", type=float, default=120.0, help="wait for outcomes after producing")
    p.add_argument("--start-timeout-s", type=float, default=420.0, help="replicas becoming ready")
    p.add_argument("--stall-cap-s", type=float, default=60.0,
                   help="longest acceptable partition stall (the service's retry cap)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--workdir", help="keep replica logs here (default: a temporary folder)")
    args = p.parse_args(argv)
    args.only = [s for s in RUN_ORDER if not args.only or s in args.only]
    return args


@dataclass
class Deployment:
    args: argparse.Namespace
    workdir: Path
    broker: Any
    teacher: Any
    suffix: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    replicas: dict[str, infra.Replica] = field(default_factory=dict)
    supervisor: infra.Supervisor | None = None
    rng: random.Random = field(default_factory=random.Random)
    labels: dict[str, set[str]] = field(default_factory=dict)  # label set per topic space

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap_servers

    def topics(self, space: str = "main") -> dict[str, str]:
        kinds = ("tickets", "results", "dlq", "control", "escalations")
        return {k: f"faults-{space}-{k}-{self.suffix}" for k in kinds}

    def n(self, count: int) -> int:
        return max(1, round(count * self.args.scale))

    async def reader(self, space: str = "main") -> infra.OutcomeReader:
        t = self.topics(space)
        return await infra.OutcomeReader(self.bootstrap, t["results"], t["dlq"]).start()


# ---- scenarios ------------------------------------------------------------------------------
async def scenario_poison(d: Deployment) -> list[dict[str, Any]]:
    """Good tickets interleaved with long CJK, ~1 MB records, random bytes, special-token
    injections on A; CLINC150 (150 labels) tickets on C."""
    rng, t = d.rng, d.topics()
    good = data.tickets("pg", data.good_texts(d.n(100), offset=1000))
    cjk = [data.ticket_message(f"pc-{i}", data.cjk_text(rng)) for i in range(d.n(5))]
    inject = data.tickets("pi", data.injection_texts(d.n(20), offset=2000))
    rand = data.random_records("pr", rng, d.n(1000))
    mix = good + cjk + inject + rand
    rng.shuffle(mix)
    clinc = data.tickets("pl", data.clinc_texts(d.n(60)))
    readers = [await d.reader(), await d.reader("clinc")]
    try:
        half = len(mix) // 2
        produced = await infra.produce(d.bootstrap, t["tickets"], mix[:half])
        # Just under the 1 MiB defaults with a default producer; just over with a producer
        # allowed 2 MiB, so the broker (not our client) decides.
        produced.merge(await infra.produce(d.bootstrap, t["tickets"], [data.huge_ticket("ph-under", HUGE_UNDER)]))
        produced.merge(await infra.produce(d.bootstrap, t["tickets"], [data.huge_ticket("ph-over", HUGE_OVER)],
                                           max_request_size=2 * 1024 * 1024))
        produced.merge(await infra.produce(d.bootstrap, t["tickets"], mix[half:]))
        produced_clinc = await infra.produce(d.bootstrap, d.topics("clinc")["tickets"], clinc)
        progress(f"poison: produced {len(produced.sent)} on A's topic ({len(produced.refused)} refused), "
                 f"{len(produced_clinc.sent)} CLINC150 tickets on C's")
        await asyncio.gather(readers[0].wait_for(set(produced.sent), d.args.drain_s),
                             readers[1].wait_for(set(produced_clinc.sent), d.args.drain_s))
    finally:
        for r in readers:
            await r.stop()
    keys = lambda msgs: {k for k, _ in msgs}  # noqa: E731
    classes = {"good": keys(good), "cjk": keys(cjk), "injection": keys(inject), "random": keys(rand),
               "huge": {b"ph-under", b"ph-over"}}
    by_class = {}
    for name, ks in classes.items():
        outcome = {r.key: r.kind for r in readers[0].records if r.key in ks}
        by_class[name] = {"produced": len(ks & set(produced.sent)),
                          "result": sum(v == "result" for v in outcome.values()),
                          "dlq": sum(v == "dlq" for v in outcome.values())}
    notes = [f"{n}: {c['result']} answered/{c['dlq']} DLQ of {c['produced']}" for n, c in by_class.items()]
    mix_row = row("poison mix", produced, readers[0], recovery=None, notes=notes,
                  stall_cap=d.args.stall_cap_s, labels=d.labels["main"],
                  expect={"result": classes["good"], "dlq": classes["random"] | classes["huge"]},
                  extra={"by_class": by_class})
    mix_row["notes"].append(f"truncated results {mix_row['truncated_results']}")
    c_state, c_notes = d.replicas.get("C"), []
    if c_state is not None and not c_state.ready_once:
        c_notes.append("150-label replica never became ready: " + " / ".join(c_state.tail(3)))
    clinc_row = row("poison 150-label task", produced_clinc, readers[1], recovery=None, notes=c_notes,
                    stall_cap=d.args.stall_cap_s, labels=d.labels.get("clinc", set()))
    return [mix_row, clinc_row]


async def scenario_kill(d: Deployment) -> list[dict[str, Any]]:
    """Two replicas share the group; kill -9 B (process group) once it has answered and
    still has work; A must take B's partitions. Recovery: kill -> A's first outcome there."""
    a, b = d.replicas.get("A"), d.replicas.get("B")
    if not (a and b and a.alive() and b.alive()):
        return [skipped("kill -9 replica", "needs replicas A and B alive")]
    # Enough that B still has batches queued when its first result shows, at any --scale.
    msgs = data.tickets("k", data.good_texts(max(d.n(150), 8 * d.args.max_batch), offset=0))
    reader = await d.reader()
    try:
        produced = await infra.produce(d.bootstrap, d.topics()["tickets"], msgs)
        keys = set(produced.sent)
        victim_id = b.replica_id
        deadline = time.monotonic() + d.args.drain_s
        while time.monotonic() < deadline and not any(
                r.replica == victim_id and r.key in keys for r in reader.records):
            await asyncio.sleep(0.1)
        victim_parts = {r.partition for r in reader.records if r.replica == victim_id}
        done = reader.answered(keys)
        pending = {k for k, (p, _) in produced.sent.items() if p in victim_parts} - done
        b.expected_down = True
        b.kill()
        killed_at = time.time()
        progress(f"kill: SIGKILLed B (partitions {sorted(victim_parts)}, {len(pending)} of its keys pending)")
        await reader.wait_for(keys, d.args.drain_s, quiet_s=3.0)
    finally:
        await reader.stop()
    after = [r for r in reader.records if r.replica != victim_id and r.key in keys]
    recovery = first_after(after, killed_at, partitions=victim_parts)
    notes = [f"victim partitions {sorted(victim_parts)}, {len(pending)} keys pending at kill",
             "duplicates are at-least-once redelivery of uncommitted batches"]
    if not victim_parts:
        notes.insert(0, "B answered nothing before the drain timeout: not a mid-batch kill")
    return [row("kill -9 replica", produced, reader, recovery=recovery, notes=notes,
                stall_cap=d.args.stall_cap_s, labels=d.labels["main"])]


async def _teacher_window(d: Deployment, fault: str, on: dict[str, Any], off: dict[str, Any],
                          length_s: float, before_s: float = 10.0, after_s: float = 20.0) -> list[dict[str, Any]]:
    """Tickets flow at --rate throughout; the stand-in misbehaves for `length_s` in between.
    Recovery: fault end -> the first teacher-answered result after it."""
    total_s = before_s + length_s + after_s
    n = max(1, round(d.args.rate * d.args.scale * total_s))
    prefix = "to" if "outage" in fault else "ti"
    msgs = data.tickets(prefix, data.good_texts(n, offset=3000 if prefix == "to" else 2500))
    reader = await d.reader()
    stats_before = dict(d.teacher.stats["by_status"])
    try:
        flow = asyncio.create_task(infra.produce(d.bootstrap, d.topics()["tickets"], msgs, rate=n / total_s))
        await asyncio.sleep(before_s)
        d.teacher.set_faults(**on)
        start = time.time()
        progress(f"{fault}: stand-in faults {on} for {length_s:.0f} s")
        await asyncio.sleep(length_s)
        d.teacher.set_faults(**off)
        end = time.time()
        progress(f"{fault}: stand-in back to normal")
        produced = await flow
        await reader.wait_for(set(produced.sent), d.args.drain_s)
    finally:
        d.teacher.set_faults(**off)
        await reader.stop()
    mine = [r for r in reader.records if r.key in produced.sent]
    during = [r for r in mine if start <= r.at < end]
    status = {k: v - stats_before.get(k, 0) for k, v in d.teacher.stats["by_status"].items()}
    res = row(fault, produced, reader, recovery=first_after(mine, end, route="teacher"),
              notes=[], stall_cap=d.args.stall_cap_s, labels=d.labels["main"],
              extra={"teacher_http_status": status})
    res["notes"] += [f"{len(during)} outcomes during the fault "
                     f"({sum(r.route == 'teacher' for r in during)} by the teacher)",
                     f"teacher HTTP {status}"]
    if res["recovery_s"] is None:
        res["notes"].append("no teacher-answered result after the fault (nothing escalated?)")
    return [res]


async def scenario_teacher_outage(d: Deployment) -> list[dict[str, Any]]:
    return await _teacher_window(d, "teacher outage", {"error_rate": 1.0}, {"error_rate": 0.0}, d.args.outage_s)


async def scenario_teacher_invalid(d: Deployment) -> list[dict[str, Any]]:
    return await _teacher_window(d, "teacher invalid answers", {"invalid_rate": 1.0}, {"invalid_rate": 0.0},
                                 d.args.invalid_s)


async def scenario_broker_restart(d: Deployment) -> list[dict[str, Any]]:
    """Restart Tansu on the same port (memory-only: topics, offsets and groups are gone),
    recreate the topics, produce. Recovery: broker back -> first outcome."""
    from services.dev.broker import EmbeddedBroker
    from services.stream.kafka_io import ensure_topics

    t = d.topics()
    pre = data.tickets("bp", data.good_texts(d.n(20), offset=500))
    reader = await d.reader()
    try:
        pre_produced = await infra.produce(d.bootstrap, t["tickets"], pre)
        await reader.wait_for(set(pre_produced.sent), 60, quiet_s=0)
        pre_done = len(reader.answered(set(pre_produced.sent)))
    finally:
        await reader.stop()
    port = d.broker.port
    d.broker.stop()
    down_at = time.time()
    await asyncio.sleep(5.0)
    d.broker = EmbeddedBroker(port=port).start()
    await ensure_topics(d.bootstrap, t.values(), PARTITIONS)
    up_at = time.time()
    progress(f"broker restart: down {up_at - down_at:.1f} s, topics recreated")
    post = data.tickets("bq", data.good_texts(d.n(60), offset=600))
    reader = await d.reader()
    try:
        produced = await infra.produce(d.bootstrap, t["tickets"], post, rate=max(1.0, len(post) / 20))
        await reader.wait_for(set(produced.sent), d.args.drain_s)
    finally:
        await reader.stop()
    recovery = first_after(reader.records, up_at, keys=set(produced.sent))
    notes = [f"memory-only broker: the {len(pre_produced.sent)} pre-restart tickets "
             f"({pre_done} answered before) and all offsets cannot survive; only post-restart tickets counted",
             f"broker down {up_at - down_at:.1f} s"]
    return [row("broker restart", produced, reader, recovery=recovery, notes=notes,
                stall_cap=d.args.stall_cap_s, labels=d.labels["main"])]


RUNNERS: dict[str, Callable[[Deployment], Any]] = {
    "poison": scenario_poison, "kill": scenario_kill, "teacher_outage": scenario_teacher_outage,
    "teacher_invalid": scenario_teacher_invalid, "broker_restart": scenario_broker_restart,
    "teacher_rebalance": lambda d: scenario_teacher_rebalance(d, infra.PROCS),
}


# ---- deployment -----------------------------------------------------------------------------
async def deploy(d: Deployment, stack: AsyncExitStack) -> None:
    from services.dev.broker import free_port
    from services.dev.standin import run_standin
    from services.stream.kafka_io import ensure_topics

    from schemas.task import TaskSpec, default_task_path

    d.labels["main"] = {label for f in TaskSpec.from_file(default_task_path()).fields for label in f.labels}
    wanted = ["A"] + (["B"] if "kill" in d.args.only else []) + (["C"] if "poison" in d.args.only else [])
    cores = {"A": "0", "B": "1", "C": "1"} if len(wanted) > 1 and (os.cpu_count() or 1) >= 2 else {}
    registry = d.workdir / "registry"  # empty: the base student, nothing to hot-swap
    for name in wanted:
        space = "clinc" if name == "C" else "main"
        teacher_url, task_path = d.teacher.base_url, None
        if name == "C":
            task_path = d.workdir / "clinc150.json"
            info = data.write_clinc_task(task_path)
            d.labels["clinc"] = set(TaskSpec.from_file(task_path).fields[0].labels)
            clinc_teacher = await stack.enter_async_context(run_standin(data_paths=data.clinc_paths()))
            teacher_url = clinc_teacher.base_url
            progress(f"CLINC150 task: {info['labels']} labels -> {task_path}")
        await ensure_topics(d.bootstrap, d.topics(space).values(), PARTITIONS)
        port = free_port()
        env = infra.replica_env(
            bootstrap=d.bootstrap, topics=d.topics(space), group=f"faults-{space}-{d.suffix}", port=port,
            workdir=d.workdir / name, registry=registry, teacher_url=teacher_url,
            threshold=d.args.threshold, max_batch=d.args.max_batch, partitions=PARTITIONS,
            task_path=task_path, core=cores.get(name))
        replica = infra.Replica(name, env, d.workdir / name, port).start()
        infra.PROCS.append(replica)
        d.replicas[name] = replica
    progress(f"started `triage serve` replicas {wanted} (cores {cores or 'unpinned'}); waiting for /readyz")
    t0 = time.monotonic()
    ready = await infra.wait_ready(list(d.replicas.values()), d.args.start_timeout_s)
    progress(f"ready in {time.monotonic() - t0:.0f} s: {[r.name for r in ready]}")
    for r in d.replicas.values():
        if not r.ready_once:
            progress(f"replica {r.name} NOT ready (alive={r.alive()}); log tail:\n  " + "\n  ".join(r.tail(8)))
    d.supervisor = infra.Supervisor(d.replicas.values()).start()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from services.dev.broker import EmbeddedBroker
    from services.dev.standin import run_standin

    report: dict[str, Any] = {"bench": "faults", "args": vars(args), "scenarios": []}
    async with AsyncExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="triage-faults-")))
        workdir.mkdir(parents=True, exist_ok=True)
        broker = EmbeddedBroker().start()
        teacher = await stack.enter_async_context(run_standin())
        d = Deployment(args, workdir, broker, teacher, rng=random.Random(args.seed))
        stack.callback(lambda: d.broker.stop())  # the current broker (restarts replace it)
        stack.callback(infra.kill_all)
        progress(f"broker {d.bootstrap}, teacher stand-in {teacher.base_url}, workdir {workdir}")
        await deploy(d, stack)
        stack.push_async_callback(d.supervisor.stop)
        for name in args.only:
            started = time.monotonic()
            progress(f"--- {name} ---")
            try:
                rows = await RUNNERS[name](d)
            except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the rest
                progress(f"{name} failed: {type(exc).__name__}: {exc}")
                rows = [skipped(name, f"{type(exc).__name__}: {exc}")]
            for r in rows:
                r["notes"] += d.supervisor.drain()
                r["seconds"] = round(time.monotonic() - started, 1)
                progress(f"{r['fault']}: {r['notes'][0]}")
            report["scenarios"] += rows
            if name == "poison" and "C" in d.replicas:
                d.replicas["C"].expected_down = True  # done with it: give its core back
                d.replicas["C"].kill()
        report["replicas"] = {n: {"starts": r.starts, "events": r.events, "log_tail": r.tail(15)}
                              for n, r in d.replicas.items()}
    report["target_met"] = all(r["target_met"] for r in report["scenarios"])
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from bench import _common

    _common.setup()

    report, seconds = infra.run_then_kill_all(run(args))
    report["seconds"] = seconds
    report["machine"] = _common.machine()
    print(table(report["scenarios"]), flush=True)
    progress(f"done in {report['seconds']} s; target {'met' if report['target_met'] else 'NOT met'}")
    if args.json_path:
        Path(args.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_path).write_text(json.dumps(report, indent=2, default=str) + "\n")
        progress(f"wrote {args.json_path}")
    return 0 if report["target_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
