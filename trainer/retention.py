"""Retention: what grows without bound gets a policy; `triage gc` applies it (a dry run unless
`--apply`), and `triage distill` runs it after each cycle (TRIAGE_RETENTION_AFTER_DISTILL).

    triage gc                 # what would go, with sizes and reasons; deletes nothing
    triage gc --apply --json  # delete exactly that plan; the outcome as JSON

Store by store (settings TRIAGE_RETENTION_*):
- adapter registry: the current adapter, the last `keep_rollbacks` rollback targets (the stack
  is trimmed to them under the registry's writer lock: rollback past them reaches the base
  model, never a deleted adapter), adapters a running distil uses (its live adapter, its
  candidate) and the `keep_adapters` most recently used others are kept; the rest go, each a
  `gc` line in history.jsonl (the audit trail itself is kept: one line per move).
- distil run folders (<work-dir>/run-*): the `keep_runs` newest that ended (a failed or
  rejected run is kept for inspection like any other) and every run in progress (its `.running` marker is flocked by the distil, or: no summary.json and written
  to within `grace_hours`).
- frozen-layer cache (<work-dir>/frozen-cache): one file per base model, cut and dtype, rewritten
  by every cycle: the newest is the current one; others untouched for `grace_hours` belong to
  a base model, cut or dtype no longer trained. Only a recompute is lost if that guess is wrong.
- prediction cache (<work-dir>/eval-cache, `<adapter id|base>-<key>.jsonl`): files of adapters
  that are kept stay (the newest per adapter: an older key is an engine or code that changed);
  the rest are the answers of adapters that are gone.
- training log: examples, superseded states (a run's data set stays reproducible) and
  conflicts are labels and their audit: kept forever. A router task's `forwards` rows and the
  `answered` rows (escalations whose teacher result was published) are the teacher worker's
  memory against re-delivered escalations; the escalations topic keeps records 7 days, so rows
  older than `forwards_days` can never be asked for again: pruned (counted as forwards rows).
- dead-letter copies live only in Kafka: the topic's retention.ms (TRIAGE_DEAD_LETTER_RETENTION_DAYS,
  services/stream/kafka_io.py plan_topics) bounds them; nothing to do here.

Anything deleted is inside the registry's adapters/ or the work dir after resolving, and never
a symlink (nothing is followed out). Temporary leftovers of killed writers (.tmp-*, .gc-*,
*.partial) go once older than `grace_hours`.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

from services.student.registry import AdapterRegistry, content_id, is_adapter_id

RUN_MARKER = ".running"  # in a run folder while its distil runs: JSON, flocked by that process
RUN_GLOB = "run-*"
FROZEN_CACHE, EVAL_CACHE = "frozen-cache", "eval-cache"


@dataclass(frozen=True)
class RetentionPolicy:
    keep_adapters: int = 5  # adapters beyond current + kept rollback targets, most recently used first
    keep_rollbacks: int = 3  # rollback targets kept on the stack (the most recent)
    keep_runs: int = 7  # finished distil run folders, newest first
    grace_hours: float = 6.0  # younger than this: possibly in use by a writer, kept
    forwards_days: float = 30.0  # training-log forwards older than this are pruned

    @classmethod
    def from_settings(cls, settings: Any) -> RetentionPolicy:
        return cls(keep_adapters=settings.retention_keep_adapters,
                   keep_rollbacks=settings.retention_keep_rollbacks,
                   keep_runs=settings.retention_keep_runs, grace_hours=settings.retention_grace_hours,
                   forwards_days=settings.retention_forwards_days)


@dataclass
class Entry:
    path: str
    bytes: int
    reason: str
    kind: str  # adapter | run | frozen-cache | eval-cache | leftover
    adapter_id: str | None = None


@dataclass
class Plan:
    delete: list[Entry] = field(default_factory=list)
    keep: list[Entry] = field(default_factory=list)
    forget_rollbacks: list[str] = field(default_factory=list)  # stack entries trimmed away
    keep_rollbacks: int = 0
    forwards_rows: int = 0  # training-log forwards rows to prune
    forwards_before: str | None = None  # ISO cut-off for those rows
    log_path: str | None = None

    @property
    def bytes(self) -> int:
        return sum(e.bytes for e in self.delete)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes": self.bytes}


# --- the run marker (trainer/distill.py holds it for a run's lifetime) --------------------------
class RunClaim:
    """Marks a run folder as in progress for `triage gc`: an flock on its `.running` file (released
    by `release()`, or by the process ending, however it ends) naming the adapter the run
    started from, so gc keeps the run and the adapters it uses."""

    def __init__(self, run_dir: Path, live_at_start: str | None) -> None:
        self.marker = Path(run_dir) / RUN_MARKER
        self._file = open(self.marker, "w", encoding="utf-8")
        fcntl.flock(self._file, fcntl.LOCK_EX)
        self._file.write(json.dumps({"pid": os.getpid(), "live_at_start": live_at_start,
                                     "started": datetime.now(timezone.utc).isoformat()}))
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self.marker.unlink(missing_ok=True)
            self._file.close()  # closing drops the flock

    def __enter__(self) -> RunClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _marker_held(marker: Path) -> bool:
    try:
        with open(marker, "r", encoding="utf-8") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
    except FileNotFoundError:
        pass
    return False


def _last_write(path: Path) -> float:
    """Newest mtime of a folder and its direct entries (a training run appends to train.log)."""
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [p.lstat().st_mtime for p in path.iterdir()]
    return max(times)


def run_in_progress(run_dir: Path, grace_s: float, now: float) -> bool:
    if _marker_held(run_dir / RUN_MARKER):
        return True
    return not (run_dir / "summary.json").exists() and now - _last_write(run_dir) < grace_s


def _running_adapter_ids(run_dir: Path) -> set[str]:
    """The live adapter a running distil started from and its candidate (once trained)."""
    ids: set[str] = set()
    try:
        live = json.loads((run_dir / RUN_MARKER).read_text(encoding="utf-8")).get("live_at_start")
        if is_adapter_id(live):
            ids.add(live)
    except (OSError, ValueError, AttributeError):
        pass
    try:
        ids.add(content_id(run_dir / "adapter"))
    except (OSError, ValueError):  # not trained yet, or half-written
        pass
    return ids


# --- planning ---------------------------------------------------------------------------------
def size_of(path: Path) -> int:
    if path.is_symlink() or not path.is_dir():
        return path.lstat().st_size
    total = 0
    for folder, _dirs, files in os.walk(path):  # os.walk does not follow symlinks by default
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:  # a running writer replaced it meanwhile
                pass
    return total


def _inside(path: Path, root: Path) -> bool:
    """A deletable path: not a symlink and, resolved, strictly inside `root` resolved."""
    return not path.is_symlink() and path.resolve().is_relative_to(root.resolve()) and \
        path.resolve() != root.resolve()


def _entry(path: Path, reason: str, kind: str, adapter_id: str | None = None) -> Entry:
    return Entry(str(path), size_of(path), reason, kind, adapter_id)


def _last_used(registry: AdapterRegistry) -> dict[str, float]:
    """Per adapter id: when history.jsonl last named it (made current, or moved away from by a
    promotion or rollback: served until then; metadata replaced); an adapter added but never
    promoted has its folder's mtime."""
    used: dict[str, float] = {}
    for record in registry.history():
        try:
            at = datetime.fromisoformat(record["at"]).timestamp()
        except (KeyError, TypeError, ValueError):
            continue
        if record.get("event") == "gc":
            continue
        for adapter_id in (record.get("adapter_id"), record.get("previous")):
            if is_adapter_id(adapter_id):
                used[adapter_id] = max(used.get(adapter_id, 0.0), at)
    return used


def plan(registry: AdapterRegistry, work_dir: Path, policy: RetentionPolicy, *,
         log_path: Path | None = None, now: float | None = None) -> Plan:
    """What `apply` would delete and what stays, with reasons. Reads only."""
    now = time.time() if now is None else now
    grace_s = policy.grace_hours * 3600
    out = Plan(keep_rollbacks=policy.keep_rollbacks)
    work_dir = Path(work_dir)

    # runs first: a running distil protects the adapters it uses
    runs = sorted((p for p in work_dir.glob(RUN_GLOB) if p.is_dir() and not p.is_symlink()),
                  key=lambda p: p.name, reverse=True)  # run-<UTC stamp>-...: name order is time order
    running_ids: set[str] = set()
    finished = 0
    for run in runs:
        if run_in_progress(run, grace_s, now):
            running_ids |= _running_adapter_ids(run)
            out.keep.append(_entry(run, "in progress", "run"))
        elif finished < policy.keep_runs:
            finished += 1
            out.keep.append(_entry(run, f"one of the {policy.keep_runs} newest runs that ended", "run"))
        elif _inside(run, work_dir):
            out.delete.append(_entry(run, f"older than the {policy.keep_runs} newest runs that ended", "run"))

    # the registry
    current = registry.current_id()
    stack = registry.rollback_targets()
    kept_stack = stack[len(stack) - policy.keep_rollbacks:] if policy.keep_rollbacks else []
    out.forget_rollbacks = stack[: len(stack) - len(kept_stack)]
    protected = {a: "current" for a in [current] if a}
    for depth, adapter_id in enumerate(reversed(kept_stack), 1):
        protected.setdefault(adapter_id, f"rollback target #{depth}")
    for adapter_id in running_ids:
        protected.setdefault(adapter_id, "used by a running distil")
    folders = {p.name: p for p in registry.adapters_dir.iterdir()
               if is_adapter_id(p.name) and p.is_dir() and not p.is_symlink()}
    used = _last_used(registry)
    others = sorted((a for a in folders if a not in protected),
                    key=lambda a: max(used.get(a, 0.0), folders[a].stat().st_mtime), reverse=True)
    kept_ids = set(protected) | set(others[: policy.keep_adapters])
    for adapter_id in sorted(folders, key=lambda a: a not in protected):
        path = folders[adapter_id]
        if adapter_id in protected:
            out.keep.append(_entry(path, protected[adapter_id], "adapter", adapter_id))
        elif adapter_id in kept_ids:
            out.keep.append(_entry(path, f"one of the {policy.keep_adapters} most recently used others",
                                   "adapter", adapter_id))
        elif _inside(path, registry.adapters_dir):
            out.delete.append(_entry(path, f"not current, no kept rollback target, older than the "
                                           f"{policy.keep_adapters} most recently used others", "adapter", adapter_id))
    for path in registry.adapters_dir.glob(".*"):
        if path.name.startswith((".tmp-", ".gc-")) and now - _last_write(path) >= grace_s and _inside(path, registry.adapters_dir):
            out.delete.append(_entry(path, "leftover of an interrupted add or gc", "leftover"))

    _plan_frozen(out, work_dir / FROZEN_CACHE, work_dir, grace_s, now)
    _plan_predictions(out, work_dir / EVAL_CACHE, work_dir, kept_ids, grace_s, now)
    if log_path is not None:
        _plan_forwards(out, Path(log_path), policy.forwards_days, now)
    return out


def _plan_frozen(out: Plan, folder: Path, root: Path, grace_s: float, now: float) -> None:
    if not folder.is_dir():
        return
    files = sorted((p for p in folder.iterdir() if p.is_file() and not p.is_symlink()),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    newest = next((p for p in files if p.suffix == ".pt"), None)
    for path in files:
        if path == newest:
            out.keep.append(_entry(path, "written by the last cycle", FROZEN_CACHE))
        elif now - path.stat().st_mtime < grace_s:
            out.keep.append(_entry(path, "written recently (a cycle may be using it)", FROZEN_CACHE))
        elif _inside(path, root):
            why = ("leftover of an interrupted save" if path.suffix == ".partial" else
                   "not rewritten since: another base model, cut or dtype")
            out.delete.append(_entry(path, why, FROZEN_CACHE))


def _plan_predictions(out: Plan, folder: Path, root: Path, kept_ids: set[str], grace_s: float,
                      now: float) -> None:
    if not folder.is_dir():
        return
    seen: set[str] = set()
    files = sorted((p for p in folder.glob("*.jsonl") if p.is_file() and not p.is_symlink()),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for path in files:
        who = path.name.rsplit("-", 1)[0]  # <adapter id|base>-<prediction key>.jsonl
        kept = who == "base" or who in kept_ids
        if kept and who not in seen:
            seen.add(who)
            out.keep.append(_entry(path, f"newest answers of kept {who}", EVAL_CACHE))
        elif now - path.stat().st_mtime < grace_s:
            out.keep.append(_entry(path, "written recently (a cycle may be using it)", EVAL_CACHE))
        elif _inside(path, root):
            why = (f"an older prediction key of {who} (engine, prompt or code changed)" if kept
                   else f"{who} is no longer in the registry")
            out.delete.append(_entry(path, why, EVAL_CACHE))


REDELIVERY_TABLES = ("forwards", "answered")  # the training log's memory against re-deliveries


def _plan_forwards(out: Plan, log_path: Path, days: float, now: float) -> None:
    if not log_path.is_file():
        return
    before = (datetime.fromtimestamp(now, timezone.utc) - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    rows, found = 0, False
    with _log(log_path) as conn:
        for table in REDELIVERY_TABLES:
            try:
                rows += conn.execute(f"SELECT COUNT(*) FROM {table} WHERE created_at < ?", (before,)).fetchone()[0]
                found = True
            except sqlite3.OperationalError:  # a log from before that table
                pass
    if found:
        out.log_path, out.forwards_before, out.forwards_rows = str(log_path), before, int(rows)


@contextmanager
def _log(path: Path) -> Iterator[sqlite3.Connection]:
    """The training log's SQLite file (services/teacher/training_log.py: `forwards.created_at`
    is ISO UTC text), with the same busy timeout as its writers."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    try:
        yield conn
    finally:
        conn.close()


# --- applying ---------------------------------------------------------------------------------
def apply(plan_: Plan, registry: AdapterRegistry, work_dir: Path, *, reason: str = "gc") -> dict[str, Any]:
    """Delete exactly what `plan_` lists (the registry part under its writer lock, which refuses
    the current adapter and the kept rollback targets as they stand then). Returns what went."""
    ids = [e.adapter_id for e in plan_.delete if e.kind == "adapter" and e.adapter_id]
    deleted_ids = set(registry.prune(ids, reason, keep_rollbacks=plan_.keep_rollbacks)) \
        if ids or plan_.forget_rollbacks else set()
    deleted: list[Entry] = []
    skipped: list[Entry] = []
    for entry in plan_.delete:
        path = Path(entry.path)
        if entry.kind == "adapter":
            (deleted if entry.adapter_id in deleted_ids else skipped).append(entry)
            continue
        root = registry.adapters_dir if entry.kind == "leftover" else Path(work_dir)
        if not path.exists() or not _inside(path, root):
            skipped.append(entry)
        elif entry.kind == "run" and run_in_progress(path, 0.0, time.time()):
            skipped.append(entry)  # its marker is held now: a distil picked it up (never expected)
        else:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            deleted.append(entry)
    forwards = 0
    if plan_.forwards_rows and plan_.log_path and plan_.forwards_before:
        with _log(Path(plan_.log_path)) as conn:
            for table in REDELIVERY_TABLES:
                try:
                    forwards += conn.execute(f"DELETE FROM {table} WHERE created_at < ?",
                                             (plan_.forwards_before,)).rowcount
                except sqlite3.OperationalError:  # a log from before that table
                    pass
    return {"deleted": [asdict(e) for e in deleted], "skipped": [asdict(e) for e in skipped],
            "bytes": sum(e.bytes for e in deleted), "forwards_rows": forwards,
            "forgot_rollbacks": plan_.forget_rollbacks}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def describe(plan_: Plan, *, applied: bool) -> str:
    """The plan as lines for a person."""
    verb = "deleted" if applied else "would delete"
    lines = [f"{verb} ({'--apply given' if applied else 'dry run: triage gc --apply deletes'}):"]
    lines += [f"  {human_bytes(e.bytes):>10}  {e.kind:<12} {e.path}  ({e.reason})" for e in plan_.delete] or ["  nothing"]
    lines.append("kept:")
    lines += [f"  {human_bytes(e.bytes):>10}  {e.kind:<12} {e.path}  ({e.reason})" for e in plan_.keep] or ["  nothing"]
    if plan_.forget_rollbacks:
        lines.append(f"rollback stack trimmed to its last {plan_.keep_rollbacks}: forgets "
                     f"{', '.join(plan_.forget_rollbacks)}")
    if plan_.log_path:
        lines.append(f"training log: {plan_.forwards_rows} forwards rows before {plan_.forwards_before} "
                     "(labels are kept forever)")
    lines.append(f"total: {human_bytes(plan_.bytes)} in {len(plan_.delete)} paths")
    return "\n".join(lines)


def gc(settings: Any, work_dir: Path, *, apply_: bool = False) -> tuple[Plan, dict[str, Any] | None]:
    """`triage gc` for one task's settings: the plan, and with `apply_` what was deleted."""
    registry = AdapterRegistry(settings.registry_dir)
    the_plan = plan(registry, Path(work_dir), RetentionPolicy.from_settings(settings),
                    log_path=settings.training_log_path)
    return the_plan, (apply(the_plan, registry, Path(work_dir)) if apply_ else None)
