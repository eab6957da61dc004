"""The soak's sampler (bench/soak.py): every --sample-s, committed consumer lag, memory and fds
of each process tree, bytes on disk and each replica's live adapter; plus the training log's
row count. Apart from soak.py so each file stays readable; what is done with the samples is
bench/_soak_report.py's.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

from bench import _faults_infra as infra
from bench import _soak_report as rep
from bench._soak_procs import PARTITIONS, REPLICAS, Soak, progress


ADAPTER_GAUGE = re.compile(r'^triage_live_adapter_info\{[^}]*adapter_id="([^"]+)"[^}]*\}\s+1(\.0)?\s*$', re.M)


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
    rss = uss = fds = anon = 0
    cpu = cpu_engine = 0.0  # user + system seconds so far: the tree's, and its vLLM processes'
    for p in procs:
        try:
            m = p.memory_full_info()
            rss, uss, fds = rss + m.rss, uss + m.uss, fds + p.num_fds()
            anon += rss_anon(p.pid)
            t = p.cpu_times()
            cpu += t.user + t.system
            if p.name().startswith("VLLM"):  # vLLM titles its processes VLLM::EngineCore / ::Worker
                cpu_engine += t.user + t.system
        except psutil.Error:
            pass
    return {"rss": rss, "uss": uss, "anon": anon, "fds": fds, "pids": len(procs),
            "cpu_s": round(cpu, 2), "cpu_engine_s": round(cpu_engine, 2)}


def cpu_per_window(samples: list[dict[str, Any]], bounds: list[tuple[float, float]]) -> list[dict[str, Any]]:
    """Per window, each process's CPU use in % of one core (its tree's CPU seconds over the
    window's span, and its vLLM processes' apart): where the cores went when latency moved.
    A restarted process (a new incarnation) counts from its restart."""
    out = []
    for lo, hi in bounds:
        inside = [s for s in samples if lo <= s["t"] < hi]
        row: dict[str, Any] = {}
        if len(inside) >= 2:
            first, last = inside[0], inside[-1]
            span = last["t"] - first["t"]
            for name, end in last["procs"].items():
                start = first["procs"].get(name)
                if not end or not start or start.get("inc") != end.get("inc") or "cpu_s" not in end or span <= 0:
                    continue
                row[name] = {"cpu_pct": round(100 * (end["cpu_s"] - start["cpu_s"]) / span, 1),
                             "engine_pct": round(100 * (end["cpu_engine_s"] - start["cpu_engine_s"]) / span, 1)}
        out.append(row)
    return out


def cpu_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per window: each process's CPU % of one core (engine share in brackets)."""
    lines = []
    for i, row in enumerate(rows):
        parts = [f"{n} {v['cpu_pct']:.0f}%" + (f" ({v['engine_pct']:.0f}% engine)" if v["engine_pct"] else "")
                 for n, v in sorted(row.items())]
        lines.append(f"cpu window {i}: " + (", ".join(parts) if parts else "-"))
    return lines


def rss_anon(pid: int) -> int:
    """Resident anonymous bytes (heap, KV cache, tensors): what a leak grows. The rest of RSS
    is file-backed (libtorch's code, the model's mmapped weights), which the kernel may drop and
    re-read: this VM's DAMON `pageout` scheme does, so RSS alone climbs back after each drop."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


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
