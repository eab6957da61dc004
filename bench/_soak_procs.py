"""The soak's moving parts (bench/soak.py): the tickets it produces, and `Soak`, which starts
the two replicas, calibrates and runs the open-loop producer, and drives the schedule (teacher
outage, kill -9, the nightly distil subprocess, hot-swap, rollback). Apart from soak.py so each
file stays readable; the replica plumbing itself is bench/_faults_infra.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import _faults_infra as infra
from bench import _soak_report as rep
from bench._soak_report import Schedule

if TYPE_CHECKING:  # annotation only: _soak_sample imports from here, so not at runtime (a cycle)
    from bench._soak_sample import Sampler

PARTITIONS = 4
REPLICAS = ("A", "B")
REF = re.compile(r" ref \d+$")  # what messages() appends, as dedup_key folds it


def progress(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


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
        # The nightly job's retention, as `triage distill` runs it at its end.
        _, gc_out = await self.cli("gc", "--apply", "--work-dir", str(self.workdir / "distill"))
        freed = next((ln for ln in gc_out.splitlines() if ln.startswith("total:")), "no plan printed")
        return rc, f"PROMOTED (fake distil) {added.adapter_id}\n{out}\ngc: {freed}"

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
