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
import os
import re
import shutil
import sqlite3
import sys
import time
import uuid
from contextlib import AsyncExitStack
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

if __package__ in (None, ""):  # run as a script (`python bench/soak.py`)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _faults_infra as infra  # noqa: E402
from bench import _soak_report as rep  # noqa: E402
from bench._soak_report import Schedule  # noqa: E402

PARTITIONS = 4
REPLICAS = ("A", "B")
REF = re.compile(r" ref \d+$")  # what messages() appends, as dedup_key folds it
ADAPTER_GAUGE = re.compile(r'^triage_live_adapter_info\{[^}]*adapter_id="([^"]+)"[^}]*\}\s+1(\.0)?\s*$', re.M)


def progress(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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


# ---- inputs ---------------------------------------------------------------------------------
def ticket_texts() -> list[str]:
    """BANKING77 test texts, then train's: the stand-in knows every one's gold label."""
    from services.dev.datasets import load_split

    return [r.text for r in load_split("test")] + [r.text for r in load_split("train")]


class RefGold(dict):  # type: ignore[type-arg]
    """The stand-in's gold (normalised text -> label) that also knows each ticket's text with
    its " (ref N)": an exact hit, not the stand-in's nearest-text search (~30 ms a ticket)."""

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and dict.__contains__(self, REF.sub("", key))

    def __getitem__(self, key: str) -> Any:
        return dict.__getitem__(self, REF.sub("", key))


def messages(prefix: str, texts: list[str], start: int, n: int, *, unique: bool = True) -> list[tuple[bytes, bytes]]:
    """Tickets `prefix-i`. `unique`: the text ends with " (ref i)", so no two tickets share a
    text, as on a desk: otherwise an hour at ~20 tickets/s repeats each of the 13k texts, the
    training log's dedup stops it growing and a repeated escalation is answered from the log
    (no teacher call, so an outage would touch nothing). The stand-in answers a text it does
    not know with the gold label of the nearest one it does; RefGold makes that exact."""
    from services.stream.kafka_io import ticket_message

    return [ticket_message(f"{prefix}-{i}", texts[i % len(texts)] + (f" (ref {i})" if unique else ""))
            for i in range(start, start + n)]


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


# ---- measuring ------------------------------------------------------------------------------
def dir_bytes(path: Path, pattern: str | None = None) -> int:
    total = 0
    roots = sorted(path.glob(pattern)) if pattern else [path]
    for root in roots:
        if root.is_file():
            total += root.stat().st_size
            continue
        for dirpath, _, files in os.walk(root):
            for f in files:
                try:
                    total += os.lstat(os.path.join(dirpath, f)).st_size
                except OSError:
                    pass
    return total


def disk(workdir: Path) -> dict[str, int]:
    return {"training_log": dir_bytes(workdir / "data", "training_log.sqlite3"),
            "training_log_wal": dir_bytes(workdir / "data", "training_log.sqlite3-*"),  # WAL + shm: reused, not grown
            "data_dir": dir_bytes(workdir / "data"),
            "registry": dir_bytes(workdir / "registry"),
            "run_dirs": dir_bytes(workdir / "distill", "run-*"),
            "caches": dir_bytes(workdir / "distill", "*-cache")}


def tree_memory(pid: int, *, children: bool = True) -> dict[str, Any] | None:
    """RSS, USS and open fds of a process and its descendants (None if it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + (root.children(recursive=True) if children else [])
    except psutil.Error:
        return None
    rss = uss = fds = 0
    for p in procs:
        try:
            m = p.memory_full_info()
            rss, uss, fds = rss + m.rss, uss + m.uss, fds + p.num_fds()
        except psutil.Error:
            pass
    return {"rss": rss, "uss": uss, "fds": fds, "pids": len(procs)}


def log_rows(path: Path) -> int | None:
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5) as db:
            return db.execute("SELECT count(*) FROM examples").fetchone()[0]
    except sqlite3.Error:
        return None


class Sampler:
    """Everything but the outcomes, every `period` seconds (see the module docstring)."""

    def __init__(self, run: Soak, period: float) -> None:
        self.run, self.period = run, period
        self.samples: list[dict[str, Any]] = []
        self.errors: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Sampler:
        from aiokafka import AIOKafkaConsumer

        t = self.run.topics
        self._watch = {
            "tickets": (AIOKafkaConsumer(bootstrap_servers=self.run.bootstrap, group_id=self.run.group,
                                         enable_auto_commit=False), t["tickets"]),
            "escalations": (AIOKafkaConsumer(bootstrap_servers=self.run.bootstrap,
                                             group_id=f"{self.run.group}-teacher", enable_auto_commit=False),
                            t["escalations"]),
        }
        for consumer, _ in self._watch.values():  # no subscription: never joins the group
            await consumer.start()
        self._task = asyncio.create_task(self._loop())
        return self

    async def lag(self, name: str) -> int | None:
        """Committed lag of a group on a topic: log end - committed (log start if none)."""
        from aiokafka import TopicPartition

        consumer, topic = self._watch[name]
        try:
            tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            ends = await consumer.end_offsets(tps)
            begins = await consumer.beginning_offsets(tps)
            total = 0
            for tp in tps:
                committed = await consumer.committed(tp)
                total += max(0, ends[tp] - (committed if committed is not None else begins[tp]))
            return total
        except Exception as exc:  # noqa: BLE001 - a sample without lag, not a dead sampler
            self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
            return None

    async def adapter(self, r: infra.Replica) -> str | None:
        status, body = await asyncio.to_thread(infra.http_get, r.port, "/metrics", 2.0)
        m = ADAPTER_GAUGE.search(body) if status == 200 else None
        return m.group(1) if m else None

    async def sample(self) -> dict[str, Any]:
        run = self.run
        t = time.time()
        procs: dict[str, Any] = {}
        for name, r in run.replicas.items():
            if r.alive():
                m = await asyncio.to_thread(tree_memory, r.proc.pid)
                if m:
                    procs[name] = {**m, "inc": r.starts}
        others = {"broker": run.broker._proc.pid if run.broker._proc else None, "soak": os.getpid(),
                  "distil": run.distil_pid}
        for name, pid in others.items():
            if pid:
                # this process alone: its children are the replicas, the broker and the distil
                m = await asyncio.to_thread(tree_memory, pid, children=name != "soak")
                if m:
                    procs[name] = {**m, "inc": 1}
        s = {"t": t, "lag": {k: await self.lag(k) for k in rep.LAG_TOPICS}, "procs": procs,
             "disk": await asyncio.to_thread(disk, run.workdir),
             "adapters": {n: await self.adapter(r) for n, r in run.replicas.items() if r.alive()}}
        self.samples.append(s)
        return s

    async def _loop(self) -> None:
        last_print = 0.0
        while True:
            started = time.monotonic()
            try:
                s = await self.sample()
                if time.monotonic() - last_print > 60:
                    last_print = time.monotonic()
                    mem = ", ".join(f"{n} {p['rss'] / rep.MiB:.0f} MiB/{p['fds']} fds"
                                    for n, p in s["procs"].items() if n in REPLICAS)
                    progress(f"lag {s['lag']}; {mem}; adapters {s['adapters']}; "
                             f"{len(self.run.sent)} produced, {len(self.run.reader.records)} outcomes")
            except Exception as exc:  # noqa: BLE001
                self.errors[type(exc).__name__] = self.errors.get(type(exc).__name__, 0) + 1
            await asyncio.sleep(max(0.2, self.period - (time.monotonic() - started)))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for consumer, _ in self._watch.values():
            await consumer.stop()


# ---- the run --------------------------------------------------------------------------------
class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path, broker: Any, teacher: Any) -> None:
        self.args, self.workdir, self.broker, self.teacher = args, workdir, broker, teacher
        self.schedule = Schedule.for_minutes(args.minutes)
        suffix = uuid.uuid4().hex[:8]
        self.topics = {k: f"soak-{k}-{suffix}" for k in ("tickets", "results", "dlq", "control", "escalations")}
        self.group = f"soak-{suffix}"
        self.replicas: dict[str, infra.Replica] = {}
        self.sent: dict[bytes, float] = {}
        self.refused: dict[bytes, str] = {}
        self.events: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.distil_pid: int | None = None
        self.distil: dict[str, Any] = {}
        self.stop_at = 0.0
        self.schedule_done = False  # the producer runs until both this and stop_at say so
        self.reader: infra.OutcomeReader | None = None
        self.sampler: Sampler | None = None
        self.texts = ticket_texts()

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap_servers

    def env(self, port: int, core: str | None) -> dict[str, str]:
        env = infra.replica_env(
            bootstrap=self.bootstrap, topics=self.topics, group=self.group, port=port, workdir=self.workdir,
            registry=self.workdir / "registry", teacher_url=self.teacher.base_url, threshold=0.0,
            max_batch=self.args.max_batch, partitions=PARTITIONS, task_path=None, core=core)
        # The adapter's own calibrated threshold and the default evaluation sample, as deployed.
        env.pop("TRIAGE_CONFIDENCE_THRESHOLD", None)
        env.pop("TRIAGE_AUDIT_RATE", None)
        return env

    async def deploy(self) -> None:
        from services.dev.broker import free_port
        from services.stream.kafka_io import ensure_topics

        await ensure_topics(self.bootstrap, self.topics.values(), PARTITIONS)
        cores = {"A": "0", "B": "1"} if (os.cpu_count() or 1) >= 2 else {}
        for name in REPLICAS:
            port = free_port()
            command = ("-m", "bench._soak_fake") if self.args.fake_student else ("-m", "services.cli", "serve")
            r = infra.Replica(name, self.env(port, cores.get(name)), self.workdir / name, port,
                              command=command).start()
            infra.PROCS.append(r)
            self.replicas[name] = r
        progress(f"started replicas {list(REPLICAS)} (cores {cores or 'unpinned'}); waiting for /readyz")
        t = time.monotonic()
        ready = await infra.wait_ready(list(self.replicas.values()), self.args.start_timeout_s)
        if len(ready) < len(REPLICAS):
            for r in self.replicas.values():
                progress(f"{r.name}: ready={r.ready_once}; " + " / ".join(r.tail(5)))
            raise SystemExit("replicas not ready")
        progress(f"ready in {time.monotonic() - t:.0f} s")

    async def calibrate(self) -> float:
        n = self.args.calibration_tickets
        msgs = messages("cal", self.texts, 0, n, unique=not self.args.verbatim_texts)
        produced = await infra.produce(self.bootstrap, self.topics["tickets"], msgs)
        keys = set(produced.sent)
        await self.reader.wait_for(keys, self.args.drain_s, quiet_s=0)
        first = rep.by_key(self.reader.records, keys)
        done = [recs[0].at for recs in first.values()]
        start = min(t for _, t in produced.sent.values())
        capacity = len(done) / max(1e-6, max(done) - start) if done else 0.0
        progress(f"calibration: {len(done)}/{n} answered in {max(done) - start:.1f} s: {capacity:.2f} tickets/s")
        if len(done) < n:
            self.notes.append(f"calibration: {n - len(done)} of {n} tickets without an outcome")
        return capacity

    async def produce_loop(self, rate: float, t0: float) -> None:
        """Open loop at `rate`, in chunks, until the schedule is done and `stop_at` has passed (a
        distil slower than the run keeps the load on through its swap and the rollback)."""
        i, first = 0, 0 if self.args.capacity else self.args.calibration_tickets  # texts after calibration's
        chunk_s = min(30.0, self.schedule.window_s)
        while not self.schedule_done or time.time() < self.stop_at:
            n = max(1, round(rate * chunk_s))
            produced = await infra.produce(self.bootstrap, self.topics["tickets"],
                                           messages("s", self.texts, first + i, n,
                                                    unique=not self.args.verbatim_texts), rate=rate)
            i += n
            self.sent.update({k: t for k, (_, t) in produced.sent.items()})
            self.refused.update(produced.refused)

    # -- schedule --
    async def at(self, t0: float, offset: float) -> None:
        await asyncio.sleep(max(0.0, t0 + offset - time.time()))

    async def wait_swap(self, adapter_id: str | None, timeout_s: float = 180.0) -> float | None:
        """Until every live replica's /metrics shows `adapter_id` ('base' for None)."""
        want = adapter_id or "base"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            live = [n for n, r in self.replicas.items() if r.alive()]
            now = {n: await self.sampler.adapter(self.replicas[n]) for n in live}
            if live and all(v == want for v in now.values()):
                return time.time()
            await asyncio.sleep(0.5)
        return None

    def registry_current(self) -> str | None:
        from services.student.registry import AdapterRegistry

        return AdapterRegistry(self.workdir / "registry").current_id()

    def last_move_at(self) -> float | None:
        """When the registry's pointer last moved (its history's last record)."""
        from services.student.registry import AdapterRegistry

        hist = AdapterRegistry(self.workdir / "registry").history()
        return datetime.fromisoformat(hist[-1]["at"]).timestamp() if hist else None

    async def cli(self, *argv: str, nice: int = 0, log: Path | None = None, track: bool = False) -> tuple[int, str]:
        env = self.env(0, None)
        env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
        cmd = ([*(["nice", "-n", str(nice)] if nice else [])] + [sys.executable, "-m", "services.cli", *argv])
        out = open(log, "wb") if log else None
        proc = await asyncio.create_subprocess_exec(
            *cmd, cwd=str(infra.REPO), env=env, stdin=asyncio.subprocess.DEVNULL,
            stdout=out or asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        if track:
            self.distil_pid = proc.pid
        try:
            stdout, _ = await proc.communicate()
        finally:
            self.distil_pid = None
            if out:
                out.close()
        text = log.read_text(errors="replace") if log else (stdout or b"").decode(errors="replace")
        return proc.returncode, text

    async def fake_distil(self) -> tuple[int, str]:
        """--fake-student: a copy of the live adapter under a new id, promoted after a pause."""
        from bench._soak_fake import fake_candidate
        from services.student.registry import AdapterRegistry

        await asyncio.sleep(min(10.0, self.schedule.window_s))
        run_dir = self.workdir / "distill" / f"run-fake-{int(time.time())}"
        run_dir.mkdir(parents=True)
        added = AdapterRegistry(self.workdir / "registry").add(fake_candidate(self.workdir / "registry", run_dir))
        rc, out = await self.cli("promote", added.adapter_id, "--reason", "soak --fake-student: stand-in distil")
        return rc, f"PROMOTED (fake distil) {added.adapter_id}\n{out}"

    def hand_promote_target(self, rc: int, out: str) -> tuple[str | None, str]:
        """What a person promotes when the nightly distil did not: its rejected candidate
        (added to the registry with the certificate the distil wrote), else another adapter."""
        from services.student.registry import AdapterRegistry

        registry = AdapterRegistry(self.workdir / "registry")
        m = re.search(r"^summary: (.+)/summary\.json$", out, re.M)
        if rc == 0 and m and (Path(m.group(1)) / "adapter").is_dir():
            added = registry.add(Path(m.group(1)) / "adapter")
            return added.adapter_id, "the distil's rejected candidate"
        live = registry.current_id()
        others = [a.adapter_id for a in registry.list() if a.adapter_id != live]
        return (others[-1], "another adapter of the registry") if others else (None, "")

    async def hand_promote(self, rc: int, out: str) -> None:
        target, what = self.hand_promote_target(rc, out)
        if target is None:
            return
        prc, _ = await self.cli("promote", target, "--reason", "soak: the distil promoted nothing")
        self.notes.append(f"the distil promoted nothing: `triage promote` of {what} {target} (rc {prc}) "
                          "for the hot-swap")

    async def run_schedule(self, t0: float) -> None:
        try:
            await self._schedule(t0)
        except Exception as exc:  # noqa: BLE001 - the report of what ran still counts
            self.notes.append(f"schedule stopped: {type(exc).__name__}: {exc}")
            progress(f"schedule stopped: {type(exc).__name__}: {exc}")
            self.stop_at = max(self.stop_at, time.time() + 2 * self.schedule.window_s)
        finally:
            self.schedule_done = True

    async def _schedule(self, t0: float) -> None:
        sc, w = self.schedule, self.schedule.window_s
        await self.at(t0, sc.outage_at)
        start = time.time()
        self.teacher.set_faults(error_rate=1.0)
        progress(f"teacher outage for {sc.outage_s:.0f} s")
        await asyncio.sleep(sc.outage_s)
        self.teacher.set_faults(error_rate=0.0)
        self.events.append({"name": "teacher outage", "kind": "outage", "start": start, "end": time.time()})
        progress("teacher back")

        await self.at(t0, sc.kill_at)
        b = self.replicas["B"]
        starts = b.starts
        b.kill()  # SIGKILL of its process group; the supervisor starts it again
        start = time.time()
        progress("kill -9 of replica B")
        end = None
        deadline = time.monotonic() + self.args.start_timeout_s
        while time.monotonic() < deadline:
            if b.starts > starts and b.alive() and await b.ready():
                end = time.time()
                break
            await asyncio.sleep(1.0)
        self.events.append({"name": "kill -9 B", "kind": "kill", "start": start, "end": end})
        progress(f"B back after {end - start:.0f} s" if end else "B NOT back")

        await self.at(t0, sc.distil_at)
        before = self.registry_current()
        start = time.time()
        progress(f"nightly: triage distill (nice {self.args.nice}, {self.args.distil_minutes:g} min budget)")
        argv = ["distill", "--work-dir", str(self.workdir / "distill"), "--max-minutes", f"{self.args.distil_minutes:g}",
                "--report-tsv", "none", "--eval-limit", str(self.args.distil_eval_limit), *self.args.distil_arg]
        if self.args.fake_student or self.args.stub_distil:
            rc, out = await self.fake_distil()
        else:
            rc, out = await self.cli(*argv, nice=self.args.nice, log=self.workdir / "distil.log", track=True)
        after = self.registry_current()
        promoted = rc == 0 and after != before and "NOT PROMOTED" not in out
        verdict = next((ln for ln in out.splitlines() if "PROMOTED" in ln), f"rc {rc}")
        gc_line = next((ln for ln in out.splitlines() if ln.startswith("gc:")), None)
        self.distil = {"rc": rc, "promoted": promoted, "verdict": verdict[:300], "gc": gc_line,
                       "seconds": round(time.time() - start, 1), "before": before, "after": after}
        self.events.append({"name": "distil", "kind": "distil", "start": start, "end": time.time()})
        progress(f"distil rc {rc} in {time.time() - start:.0f} s: {verdict[:160]}")
        if not promoted:
            await self.hand_promote(rc, out)
        swapped_to = self.registry_current()
        if swapped_to != before:
            moved = self.last_move_at() or start
            end = await self.wait_swap(swapped_to)
            self.events.append({"name": "hot-swap", "kind": "hot_swap", "start": moved, "end": end,
                                "adapter": swapped_to})
            progress(f"hot-swap to {swapped_to}: " + (f"{end - moved:.1f} s" if end else "NOT seen on every replica"))
            await self.at(t0, max(sc.rollback_at, (end or time.time()) - t0 + w))
            rc, out = await self.cli("rollback", "--reason", "soak: scheduled rollback")
            moved = self.last_move_at() or time.time()
            back = self.registry_current()
            end = await self.wait_swap(back)
            self.events.append({"name": "rollback", "kind": "rollback", "start": moved, "end": end, "adapter": back})
            progress(f"rollback (rc {rc}) to {back}: " + (f"{end - moved:.1f} s" if end else "NOT seen"))
        else:
            self.notes.append("no hot-swap: the distil promoted nothing and left no candidate, and the registry "
                              "has no other adapter; rollback skipped (it would go to the base model)")
            end = time.time()
        self.stop_at = max(t0 + sc.duration_s, (end or time.time()) + 2 * w)


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
