"""Two `triage serve` OS processes share one consumer group; one is SIGKILLed mid-stream.

Real Tansu broker (session fixture), two real service processes (each starts its own vLLM
engine, concurrently: ~1-2 min on 2 CPU cores), topics with 4 partitions. Checks:
  * both replicas become ready and split the 4 partitions between them;
  * both publish results before the kill (the `triage-replica` header says who answered,
    cross-checked with each process's own /metrics);
  * after `kill -9` of one replica's process group, the survivor takes over its partitions
    and every produced ticket has a published result; duplicates only where at-least-once
    allows them (uncommitted in-flight batches, at most one batch per replica).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from services.dev.broker import free_port
from services.stream.kafka_io import ensure_topics
from services.dev.datasets import load_split
from services.stream.kafka_io import produce, read_topic, ticket_message
from tests.integration.scrape import aget, scrape, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PARTITIONS = 4
N_TICKETS = 150
MAX_BATCH = 8  # small batches: the stream lasts long enough to kill a replica mid-way
START_TIMEOUT_S = 420  # two engines starting at once on a shared 2-core machine
DRAIN_TIMEOUT_S = 420


@dataclass
class Replica:
    name: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def replica_id(self) -> str:  # what services.stream.app puts in the `triage-replica` header
        return f"{socket.gethostname()}:{self.proc.pid}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (the service and its vLLM engine process)."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        # An engine child re-parented elsewhere would still be in the group: kill it too.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError as exc:
            return f"<no log: {exc}>"
        return "\n".join(text[-lines:])


@dataclass
class Result:
    key: bytes
    partition: int
    replica: str | None
    received_at: float


@dataclass
class Collector:
    """Reads the results topic from the start (no group), keeping the replica header."""

    bootstrap: str
    topic: str
    results: list[Result] = field(default_factory=list)

    async def run(self, stop: asyncio.Event) -> None:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=self.bootstrap,
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        try:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=200, max_records=1000)
                now = time.time()
                for records in batches.values():
                    for r in records:
                        headers = {k: v.decode() for k, v in (r.headers or ())}
                        self.results.append(Result(r.key, r.partition, headers.get("triage-replica"), now))
        finally:
            await consumer.stop()

    def keys(self, before: float | None = None) -> set[bytes]:
        return {r.key for r in self.results if before is None or r.received_at < before}

    def replicas(self) -> set[str | None]:
        return {r.replica for r in self.results}


def _start(name: str, tmp: Path, topics: dict[str, str], group: str, bootstrap: str,
           model_path: Path, core: str | None) -> Replica:
    workdir = tmp / name
    workdir.mkdir(parents=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update(
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        TRIAGE_BOOTSTRAP_SERVERS=bootstrap,
        TRIAGE_TICKETS_TOPIC=topics["tickets"],
        TRIAGE_RESULTS_TOPIC=topics["results"],
        TRIAGE_DEAD_LETTER_TOPIC=topics["dlq"],
        TRIAGE_CONTROL_TOPIC=topics["control"],
        TRIAGE_ESCALATIONS_TOPIC=topics["escalations"],
        TRIAGE_CONSUMER_GROUP=group,
        TRIAGE_TEACHER_CONSUMER_GROUP=f"{group}-teacher",
        # The student answers every ticket itself: this test is about the student group's
        # partitions (the teacher lane's failover: test_teacher_worker_kill.py).
        TRIAGE_CONFIDENCE_THRESHOLD="0.0",
        TRIAGE_SESSION_TIMEOUT_MS="3000",
        TRIAGE_HEARTBEAT_INTERVAL_MS="500",
        TRIAGE_METRICS_PORT=str(port),
        TRIAGE_MAX_BATCH=str(MAX_BATCH),
        TRIAGE_TOPIC_PARTITIONS=str(PARTITIONS),
        TRIAGE_MODEL_PATH=str(model_path),
        TRIAGE_REGISTRY_DIR=str(tmp / "registry"),
        TRIAGE_DATA_DIR=str(workdir / "data"),
        TRIAGE_TEACHER_BASE_URL="",
        TRIAGE_LOG_LEVEL="INFO",
    )
    if core is not None and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        env["VLLM_CPU_OMP_THREADS_BIND"] = core  # one core each: two OpenMP pools don't thrash
    log_path = workdir / "serve.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve"],
            cwd=workdir,  # no stray .env from the repo
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: kill -9 takes the engine child too
        )
    return Replica(name, port, proc, log_path)


async def _ready(replica: Replica) -> tuple[int, str]:
    if not replica.alive():
        raise AssertionError(f"{replica.name} exited with {replica.proc.returncode}")
    return await aget(replica.port, "/readyz")


async def test_two_replicas_split_partitions_and_survive_a_kill(kafka_bootstrap, student_model_path, tmp_path):
    suffix = uuid.uuid4().hex[:8]
    topics = {k: f"scale-{k}-{suffix}" for k in ("tickets", "results", "dlq", "control", "escalations")}
    await ensure_topics(kafka_bootstrap, topics.values(), PARTITIONS)
    cores = [str(i % os.cpu_count()) for i in range(2)] if (os.cpu_count() or 1) >= 2 else [None, None]
    replicas = [
        _start(name, tmp_path, topics, f"scale-{suffix}", kafka_bootstrap, student_model_path, core)
        for name, core in zip(("replica-a", "replica-b"), cores)
    ]
    collector = Collector(kafka_bootstrap, topics["results"])
    stop = asyncio.Event()
    reader = asyncio.create_task(collector.run(stop))
    ok = False
    try:
        # --- both up, partitions split between them -----------------------------------------
        async def all_ready():
            states = [await _ready(r) for r in replicas]
            return states if all(s == 200 for s, _ in states) else None

        await wait_for(all_ready, timeout_s=START_TIMEOUT_S, interval_s=1.0, what="both replicas ready")

        async def split():
            owned = [set((await scrape(r.port)).lag_partitions(topics["tickets"])) for r in replicas]
            reasons = [(await _ready(r))[1] for r in replicas]
            a, b = owned
            fine = a and b and not (a & b) and a | b == set(range(PARTITIONS)) and all(
                f"{len(o)} partitions assigned" in why for o, why in zip(owned, reasons)
            )
            return owned if fine else None

        owned = await wait_for(split, timeout_s=60, interval_s=1.0,
                               what="the 4 partitions split between both replicas")

        # --- stream, kill one replica once both have answered -------------------------------
        rows = load_split("test")[:N_TICKETS]
        ids = [f"s-{i}" for i in range(N_TICKETS)]
        await produce(kafka_bootstrap, topics["tickets"],
                      [ticket_message(tid, row.text) for tid, row in zip(ids, rows)])
        tickets = await read_topic(kafka_bootstrap, topics["tickets"],
                                   until=lambda r: len(r) >= N_TICKETS, timeout_s=30)
        partition_of = {t.key: t.partition for t in tickets}

        ids_of = {r.replica_id: r for r in replicas}
        await wait_for(lambda: set(ids_of) <= collector.replicas(), timeout_s=300, interval_s=0.2,
                       what="results from both replicas")
        at_kill = [await scrape(r.port) for r in replicas]
        victim, survivor = replicas[1], replicas[0]
        victim_parts = owned[1]
        # Still the same split (no rebalance while streaming) and the victim still has work.
        assert set(at_kill[1].lag_partitions(topics["tickets"])) == victim_parts
        victim.kill()
        killed_at = time.time()
        answered_before_kill = collector.keys(before=killed_at)
        pending_in_victim = {k for k, p in partition_of.items() if p in victim_parts} - answered_before_kill
        assert pending_in_victim, "the victim had finished its partitions before the kill: nothing to fail over"

        # --- the survivor finishes everything -----------------------------------------------
        wanted = set(partition_of)
        await wait_for(lambda: collector.keys() >= wanted, timeout_s=DRAIN_TIMEOUT_S, interval_s=0.5,
                       what=f"a result for each of the {N_TICKETS} tickets")
        await asyncio.sleep(1.0)  # let late duplicates (if any) arrive before counting

        async def took_over():
            s = await scrape(survivor.port)
            status, why = await _ready(survivor)
            lag = s.lag_partitions(topics["tickets"])
            done = status == 200 and f"{PARTITIONS} partitions assigned" in why and lag == {
                p: 0.0 for p in range(PARTITIONS)}
            return s if done else None

        final = await wait_for(took_over, timeout_s=30, interval_s=1.0,
                               what="survivor owning all 4 partitions with zero lag")
        ok = True
    finally:
        stop.set()
        await asyncio.gather(reader, return_exceptions=True)
        for r in replicas:
            r.kill()
        if not ok:
            for r in replicas:
                print(f"\n===== {r.name} (pid {r.proc.pid}, exit {r.proc.returncode}) {r.log_path} =====")
                print(r.tail())

    results = collector.results
    by_key: dict[bytes, list[Result]] = defaultdict(list)
    for r in results:
        by_key[r.key].append(r)
    # Every ticket answered (dedup by ticket id), nothing foreign.
    assert set(by_key) == wanted
    # Who answered: only our two replicas; both before the kill, per header and per /metrics.
    assert {r.replica for r in results} <= set(ids_of)
    before_kill = {r.replica for r in results if r.received_at < killed_at}
    assert before_kill == set(ids_of), before_kill
    assert at_kill[0].total("triage_results_total") > 0 and at_kill[1].total("triage_results_total") > 0
    # Each replica answered only for the partitions it owned (the victim) or took over.
    assert {partition_of[r.key] for r in results if r.replica == victim.replica_id} <= victim_parts
    # The survivor consumed the victim's partitions after the kill: every ticket still
    # unanswered there at the kill was answered by the survivor, except at most the batch the
    # victim had already published (received a moment after the kill).
    from_survivor_after = {r.key for r in results if r.replica == survivor.replica_id and r.received_at >= killed_at}
    from_victim = {r.key for r in results if r.replica == victim.replica_id}
    late_from_victim = pending_in_victim - from_survivor_after
    assert late_from_victim <= from_victim and len(late_from_victim) <= MAX_BATCH, late_from_victim
    assert {partition_of[k] for k in pending_in_victim} <= {partition_of[k] for k in from_survivor_after}
    # The survivor's own /metrics agree with what the results topic says it published.
    published_by_survivor = sum(r.replica == survivor.replica_id for r in results)
    assert 0 <= published_by_survivor - final.total("triage_results_total") <= MAX_BATCH
    # At-least-once, not more: a duplicate is an uncommitted in-flight batch redone after the
    # kill (the victim's) or after the failover rebalance rewound it (the survivor's own).
    dups = {k: rs for k, rs in by_key.items() if len(rs) > 1}
    dup_counts = Counter("victim" if partition_of[k] in victim_parts else "survivor" for k in dups)
    assert all(len(rs) == 2 for rs in dups.values()), dups
    assert dup_counts["victim"] <= MAX_BATCH and dup_counts["survivor"] <= MAX_BATCH, dup_counts
    for k, rs in dups.items():
        if partition_of[k] in victim_parts:  # answered by the victim, then again by the survivor
            assert [r.replica for r in rs] == [victim.replica_id, survivor.replica_id], (k, rs)
    print(
        f"\nscale-out: {N_TICKETS} tickets, {len(results)} results, split {owned}, "
        f"victim {victim.name} pending at kill {len(pending_in_victim)}, "
        f"answered by survivor after kill {len(from_survivor_after)}, duplicates {dict(dup_counts)}"
    )
