"""Plumbing for bench/faults.py: `triage serve` replicas as OS processes, a producer that
knows partitions and refusals, an outcome collector, and the pure figures (lost, duplicated,
stall, recovery). Nothing here reaches into the service: it sees what a deployment sees
(processes, topics, record headers, /readyz).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

REPO = Path(__file__).resolve().parents[1]


def progress(msg: str) -> None:
    print(f"[faults {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- replicas: real `triage serve` processes ----------------------------------------------
@dataclass
class Replica:
    """One `triage serve` process (own process group, so kill -9 takes its engine child too)."""

    name: str
    env: dict[str, str]
    workdir: Path
    port: int
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    ready_once: bool = False
    expected_down: bool = False  # killed on purpose: the supervisor leaves it down
    events: list[str] = field(default_factory=list)
    args: tuple[str, ...] = ()  # after `serve`, e.g. ("--role", "teacher")
    command: tuple[str, ...] = ("-m", "services.cli", "serve")  # after the interpreter

    @property
    def log_path(self) -> Path:
        return self.workdir / f"serve-{self.starts}.log"

    @property
    def replica_id(self) -> str:  # the `triage-replica` header services.stream.app sends
        return f"{socket.gethostname()}:{self.proc.pid}" if self.proc else ""

    def start(self) -> Replica:
        self.starts += 1
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, *self.command, *self.args],
                cwd=self.workdir,  # no stray .env from the repository
                env=self.env, stdin=subprocess.DEVNULL, stdout=log_file,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group; again after the wait, for a re-parented child."""
        if self.proc is None:
            return
        for _ in range(2):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    async def ready(self) -> bool:
        status, _ = await asyncio.to_thread(http_get, self.port, "/readyz")
        return status == 200

    def tail(self, lines: int = 25) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            return [f"<no log: {exc}>"]


def http_get(port: int, path: str, timeout_s: float = 3.0) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout_s) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")
    except OSError as err:
        return 0, repr(err)


def replica_env(*, bootstrap: str, topics: dict[str, str], group: str, port: int, workdir: Path,
                registry: Path, teacher_url: str, threshold: float, max_batch: int, partitions: int,
                task_path: Path | None, core: str | None) -> dict[str, str]:
    """Environment of a `triage serve` process: everything through TRIAGE_* as in production."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update(
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        TRIAGE_BOOTSTRAP_SERVERS=bootstrap,
        TRIAGE_TICKETS_TOPIC=topics["tickets"], TRIAGE_RESULTS_TOPIC=topics["results"],
        TRIAGE_DEAD_LETTER_TOPIC=topics["dlq"], TRIAGE_CONTROL_TOPIC=topics["control"],
        TRIAGE_ESCALATIONS_TOPIC=topics["escalations"],
        TRIAGE_CONSUMER_GROUP=group, TRIAGE_TEACHER_CONSUMER_GROUP=f"{group}-teacher",
        TRIAGE_SESSION_TIMEOUT_MS="3000", TRIAGE_HEARTBEAT_INTERVAL_MS="500",
        TRIAGE_METRICS_PORT=str(port), TRIAGE_MAX_BATCH=str(max_batch),
        TRIAGE_TOPIC_PARTITIONS=str(partitions),
        TRIAGE_REGISTRY_DIR=str(registry), TRIAGE_DATA_DIR=str(workdir / "data"),
        TRIAGE_TEACHER_BASE_URL=teacher_url, TRIAGE_TEACHER_MODEL="gold-label-standin",
        # Low enough that only part of the traffic escalates: the teacher path is exercised
        # without every ticket waiting on it.
        TRIAGE_CONFIDENCE_THRESHOLD=str(threshold), TRIAGE_AUDIT_RATE="0",
        TRIAGE_LOG_LEVEL="INFO", TRIAGE_LOG_FORMAT="text",
    )
    if task_path is not None:
        env["TRIAGE_TASK_PATH"] = str(task_path)
    if "TRIAGE_MODEL_PATH" in os.environ:
        env["TRIAGE_MODEL_PATH"] = os.environ["TRIAGE_MODEL_PATH"]
    if core is not None and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
        env["VLLM_CPU_OMP_THREADS_BIND"] = core  # one core each: OpenMP pools don't thrash
    return env


class Supervisor:
    """What an orchestrator does: restart a replica that exited on its own (crash-only
    design), up to `max_restarts` each; one that never became ready is left down."""

    def __init__(self, replicas: Iterable[Replica], max_restarts: int = 2) -> None:
        self.replicas = list(replicas)
        self.max_restarts = max_restarts
        self.log: list[str] = []  # drained per scenario into its notes
        self._task: asyncio.Task[None] | None = None

    def start(self) -> Supervisor:
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            for r in self.replicas:
                if r.proc is None or r.alive() or r.expected_down:
                    if r.alive() and not r.ready_once and await r.ready():
                        r.ready_once = True
                    continue
                code = r.proc.returncode
                if not r.ready_once or r.starts > self.max_restarts:
                    r.expected_down = True
                    self._note(r, f"{r.name} exited rc={code}; left down "
                                  f"({'never ready' if not r.ready_once else 'restart cap'})")
                    continue
                self._note(r, f"{r.name} exited rc={code}; restarted")
                r.kill()  # reap the group's leftovers before a fresh start
                r.start()
            await asyncio.sleep(0.5)

    def _note(self, r: Replica, msg: str) -> None:
        r.events.append(msg)
        self.log.append(msg)
        progress(msg)

    def drain(self) -> list[str]:
        out, self.log = self.log, []
        return out

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


PROCS: list[Replica] = []  # every replica a bench started: killed on any exit path


def kill_all() -> None:
    for r in PROCS:
        r.kill()


def run_then_kill_all(main: Any) -> tuple[Any, float]:
    """`asyncio.run(main)` with SIGTERM unwinding like Ctrl-C (through every `finally`), then
    every started replica killed: a bench stopped by its caller leaves no orphan. Returns
    main's result and the seconds it took."""
    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    started = time.monotonic()
    try:
        result = asyncio.run(main)
    finally:
        kill_all()
    return result, round(time.monotonic() - started, 1)


async def wait_ready(replicas: Sequence[Replica], timeout_s: float) -> list[Replica]:
    """Wait until every replica answers /readyz 200 (or died, or timeout); the ready ones."""
    deadline = time.monotonic() + timeout_s
    pending = [r for r in replicas]
    while pending and time.monotonic() < deadline:
        for r in list(pending):
            if not r.alive():
                pending.remove(r)
            elif await r.ready():
                r.ready_once = True
                pending.remove(r)
        await asyncio.sleep(1.0)
    return [r for r in replicas if r.ready_once]


# ---- producing ------------------------------------------------------------------------------
@dataclass
class Produced:
    sent: dict[bytes, tuple[int, float]] = field(default_factory=dict)  # key -> (partition, t)
    refused: dict[bytes, str] = field(default_factory=dict)  # key -> why the producer/broker refused

    def merge(self, other: Produced) -> Produced:
        self.sent.update(other.sent)
        self.refused.update(other.refused)
        return self


async def produce(bootstrap: str, topic: str, messages: Sequence[tuple[bytes, bytes]], *,
                  rate: float | None = None, max_request_size: int = 1_048_576) -> Produced:
    """Send (key, value) pairs (open loop at `rate`/s if given); per key, the partition the
    broker acknowledged or why the record was refused (too large, broker error)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all",
                                max_request_size=max_request_size, request_timeout_ms=15_000)
    await producer.start()
    out = Produced()
    futures: list[tuple[bytes, float, asyncio.Future[Any]]] = []
    try:
        t0 = time.monotonic()
        for i, (key, value) in enumerate(messages):
            if rate:
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            sent_at = time.time()
            try:
                futures.append((key, sent_at, await producer.send(topic, value=value, key=key)))
            except Exception as exc:  # noqa: BLE001 - refused before sending (size)
                out.refused[key] = type(exc).__name__
        results = await asyncio.gather(*(f for _, _, f in futures), return_exceptions=True)
        for (key, sent_at, _), meta in zip(futures, results):
            if isinstance(meta, BaseException):
                out.refused[key] = type(meta).__name__
            else:
                out.sent[key] = (meta.partition, sent_at)
    finally:
        await producer.stop()
    return out


# ---- reading outcomes -----------------------------------------------------------------------
@dataclass(frozen=True)
class OutcomeRecord:
    key: bytes | None
    kind: str  # "result" | "dlq"
    partition: int
    at: float  # time.time() when the reader got it
    replica: str | None
    reason: str | None  # dead-letter reason
    route: str | None  # result route: student | teacher | unverified
    truncated: bool = False
    confidence: float | None = None  # the student's, on results
    labels: tuple[str, ...] = ()  # the published answer's labels, on results


def _parse(kind: str, value: bytes | None) -> dict[str, Any]:
    try:
        body = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(body, dict):
        return {}
    if kind == "dlq":
        return {"reason": body.get("reason") or None}
    student = body.get("student") or {}
    confs = [f.get("confidence") for f in student.values() if isinstance(f, dict)]
    confs = [c for c in confs if isinstance(c, (int, float))]
    fields = body.get("fields") if isinstance(body.get("fields"), dict) else {}
    return {"route": body.get("route"), "truncated": bool(body.get("truncated")),
            "confidence": min(confs) if confs else None, "labels": tuple(map(str, fields.values()))}


class OutcomeReader:
    """Reads the results and dead-letter topics from the start (no group, no commits)."""

    def __init__(self, bootstrap: str, results_topic: str, dlq_topic: str) -> None:
        self.bootstrap = bootstrap
        self.kinds = {results_topic: "result", dlq_topic: "dlq"}
        self.records: list[OutcomeRecord] = []
        self.errors: Counter[str] = Counter()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> OutcomeReader:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            *self.kinds, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest",
            enable_auto_commit=False, fetch_max_wait_ms=100,
            # Dead-letter records carry the original bytes: a 1 MB poison message is > 1 MiB.
            max_partition_fetch_bytes=16 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024,
        )
        await consumer.start()
        self._task = asyncio.create_task(self._run(consumer))
        return self

    async def _run(self, consumer: Any) -> None:
        try:
            while not self._stop.is_set():
                try:
                    batches = await consumer.getmany(timeout_ms=100, max_records=5000)
                except Exception as exc:  # noqa: BLE001 - keep reading through broker trouble
                    self.errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.5)
                    continue
                now = time.time()
                for tp, records in batches.items():
                    kind = self.kinds[tp.topic]
                    for r in records:
                        headers = {k: v.decode(errors="replace") for k, v in (r.headers or ())}
                        parsed = _parse(kind, r.value)
                        self.records.append(OutcomeRecord(
                            r.key, kind, r.partition, now, headers.get("triage-replica"),
                            parsed.get("reason"), parsed.get("route"),
                            parsed.get("truncated", False), parsed.get("confidence"),
                            parsed.get("labels", ())))
        finally:
            await consumer.stop()

    def answered(self, keys: set[bytes]) -> set[bytes]:
        return {r.key for r in self.records if r.key in keys}

    async def wait_for(self, keys: set[bytes], timeout_s: float, *, quiet_s: float = 1.0) -> bool:
        """Until every key has an outcome (then `quiet_s` more, for late duplicates)."""
        deadline = time.monotonic() + timeout_s
        last_report = time.monotonic()
        while time.monotonic() < deadline:
            done = self.answered(keys)
            if done >= keys:
                await asyncio.sleep(quiet_s)
                return True
            if time.monotonic() - last_report > 15:
                progress(f"  ... {len(done)}/{len(keys)} keys have an outcome")
                last_report = time.monotonic()
            await asyncio.sleep(0.2)
        return self.answered(keys) >= keys

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
