"""Adapter registry: content-hashed LoRA adapters and an atomically moved `current` pointer.

The trainer writes (add, promote, rollback); the service reads (`current()`, polled, then
hot-swaps). Layout under `root`:

    adapters/<adapter_id>/      adapter_config.json, adapter_model.safetensors, triage_adapter.json
    current.json                {"adapter_id": ..., "stack": [previously promoted ids], ...}
    history.jsonl               one line per promote / rollback / metadata replaced / gc (audit trail)

- Ids are content hashes ("a-" + 16 hex of sha256 over the weight files and
  adapter_config.json): new weights always get a new id, so vLLM's per-LoRA caches can never
  serve stale weights (DESIGN.md #9), and adding the same folder twice is a no-op; adding the
  same weights with other metadata (a new threshold) replaces the stored metadata.
- `add` copies into a temp folder inside the registry and renames it into place; a reader
  never sees half an adapter. Nothing else is ever written into adapters/.
- `current.json` is replaced atomically (tmp + fsync + os.replace) and carries the stack of
  earlier promotions, so `rollback` is one atomic write too. `adapter_id: null` = base model.
- Writers take an exclusive flock on `.lock`; readers never lock.
- Ids come from files, the CLI and Kafka: only the registry's own form (`is_adapter_id`)
  resolves, and only to a folder that really is inside adapters/ (no `..`, absolute paths
  or symlinks out).
- `promote(..., expected_current=id)` is a compare-and-swap: a distillation that evaluated
  its candidate against adapter X does not overwrite a rollback (or promotion) made while
  it ran (`CurrentMoved`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import EllipsisType
from typing import Any, Iterator

from services.student.prompting import PromptStyle

META_FILE = "triage_adapter.json"
CONFIG_FILE = "adapter_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
_ADAPTER_ID = re.compile(r"a-[0-9a-f]{16}")


def is_adapter_id(value: object) -> bool:
    """Is `value` of the form `content_id` makes ("a-" + 16 lowercase hex)?"""
    return isinstance(value, str) and _ADAPTER_ID.fullmatch(value) is not None


class CurrentMoved(RuntimeError):
    """`promote(expected_current=...)` refused: someone moved `current` in the meantime."""

    def __init__(self, expected: str | None, actual: str | None) -> None:
        self.expected, self.actual = expected, actual
        super().__init__(f"current adapter is {actual or 'the base model'}, expected "
                         f"{expected or 'the base model'}: moved meanwhile")


def weight_files(adapter_dir: Path) -> list[Path]:
    return sorted(p for p in adapter_dir.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def content_id(adapter_dir: str | Path) -> str:
    """'a-' + first 16 hex of sha256 over (name, bytes) of the weights and adapter_config.json."""
    adapter_dir = Path(adapter_dir)
    files = weight_files(adapter_dir)
    if not files or not (adapter_dir / CONFIG_FILE).is_file():
        raise ValueError(f"{adapter_dir}: not a PEFT adapter (needs {CONFIG_FILE} + weights)")
    digest = hashlib.sha256()
    for path in [*files, adapter_dir / CONFIG_FILE]:
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return "a-" + digest.hexdigest()[:16]


def read_meta(adapter_dir: str | Path) -> dict[str, Any]:
    path = Path(adapter_dir) / META_FILE
    if not path.is_file():
        raise ValueError(f"{adapter_dir}: missing {META_FILE}")
    meta = json.loads(path.read_text(encoding="utf-8"))
    for key in ("base_model", "prompt_style", "task"):
        if key not in meta:
            raise ValueError(f"{path}: missing {key!r}")
    PromptStyle(meta["prompt_style"])  # fails fast on an unknown style
    return meta


def write_meta(adapter_dir: str | Path, meta: dict[str, Any]) -> None:
    """Replace an adapter folder's metadata atomically (before `add`; `add` of the same
    weights writes the registry's copy this way)."""
    _atomic_write(Path(adapter_dir) / META_FILE, json.dumps(meta, indent=1))


@dataclass(frozen=True)
class AdapterRef:
    adapter_id: str
    path: Path
    prompt_style: PromptStyle
    # Calibrated escalation threshold: one per field (meta threshold.fields), or one for every
    # field (an adapter calibrated before per-field thresholds); None = not calibrated;
    # math.inf = calibrated to trust nothing (`stored_threshold`).
    threshold: float | dict[str, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_dir(cls, adapter_dir: str | Path, adapter_id: str | None = None) -> AdapterRef:
        """A ref to any adapter folder (e.g. a candidate not yet in the registry)."""
        adapter_dir = Path(adapter_dir).resolve()
        meta = read_meta(adapter_dir)
        return cls(
            adapter_id=adapter_id or content_id(adapter_dir),
            path=adapter_dir,
            prompt_style=PromptStyle(meta["prompt_style"]),
            threshold=stored_threshold(meta),
            meta=meta,
        )


def stored_threshold(meta: dict[str, Any]) -> float | dict[str, float] | None:
    """The escalation threshold an adapter's metadata carries: None when it was never calibrated
    (no `threshold`), math.inf for "trust nothing": an infeasible calibration, stored as null
    (JSON has no infinity) or, by adapters calibrated before that, as 1.0 with `feasible`
    false; 1.0 would let confidence exactly 1.0 through (grammar-forced or saturated tokens)."""
    stored = meta.get("threshold")
    if not stored:
        return None

    def read(value: Any, feasible: Any) -> float:
        return math.inf if value is None or feasible is False else float(value)

    if isinstance(stored.get("fields"), dict):  # per-field feasibility: in the report that chose them
        reports = meta.get("eval") or {}
        evaluated = (reports.get("certification") or reports.get("calibration") or {}).get("fields") or {}
        return {name: read(t, ((evaluated.get(name) or {}).get("threshold") or {}).get("feasible"))
                for name, t in stored["fields"].items()}
    return read(stored.get("value"), stored.get("feasible"))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AdapterRegistry:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.adapters_dir = self.root / "adapters"
        self.pointer_path = self.root / "current.json"
        self.history_path = self.root / "history.jsonl"
        self.adapters_dir.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"AdapterRegistry({str(self.root)!r})"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # --- adapters ---------------------------------------------------------------------------
    def add(self, adapter_dir: str | Path) -> AdapterRef:
        """Copy an adapter folder in under its content id. The same weights again (a re-run
        that trained identical weights, a re-calibration) replace the stored metadata with
        theirs, so a new threshold is never dropped (a `meta` line in the history; running
        replicas pick it up at their next poll); identical metadata is a no-op."""
        adapter_dir = Path(adapter_dir)
        meta = read_meta(adapter_dir)  # refuse folders the service could not use
        adapter_id = content_id(adapter_dir)
        final = self.adapters_dir / adapter_id
        if not final.exists():
            tmp = self.adapters_dir / f".tmp-{adapter_id}-{uuid.uuid4().hex[:8]}"
            try:
                shutil.copytree(adapter_dir, tmp)
                if content_id(tmp) != adapter_id:  # changed while we copied
                    raise RuntimeError(f"{adapter_dir} changed during add")
                try:
                    os.rename(tmp, final)  # atomic; fails if a concurrent add won the race
                except OSError:
                    if not final.exists():
                        raise
                _fsync_dir(self.adapters_dir)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        with self._locked():
            stored = read_meta(final)
            if stored != meta:
                write_meta(final, meta)
                before, after = (m.get("threshold") or {} for m in (stored, meta))
                self._record({"event": "meta", "adapter_id": adapter_id, "previous": self.current_id(),
                              "reason": f"metadata replaced (threshold {before.get('value')} -> "
                                        f"{after.get('value')})", "at": datetime.now(timezone.utc).isoformat()})
        return self.get(adapter_id)

    def get(self, adapter_id: str) -> AdapterRef:
        """The adapter stored under `adapter_id`; KeyError for anything else (malformed ids
        included: an id is never a path)."""
        if not is_adapter_id(adapter_id):
            raise KeyError(f"not an adapter id: {adapter_id!r} (expected 'a-' + 16 hex)")
        path = self.adapters_dir / adapter_id
        # resolve(): a symlink planted in adapters/ must not lead out of it
        inside = path.resolve().parent == self.adapters_dir.resolve()
        if not inside or not path.is_dir():
            raise KeyError(f"no adapter {adapter_id!r} in {self.root}")
        return AdapterRef.from_dir(path, adapter_id)

    def list(self) -> list[AdapterRef]:
        return [self.get(p.name) for p in sorted(self.adapters_dir.iterdir())
                if is_adapter_id(p.name) and p.is_dir()]

    # --- the current pointer ------------------------------------------------------------------
    def _pointer(self) -> dict[str, Any]:
        try:
            return json.loads(self.pointer_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"adapter_id": None, "stack": []}

    def current_id(self) -> str | None:
        """Cheap read for pollers: the live adapter id (None = base model)."""
        return self._pointer().get("adapter_id")

    def current(self) -> AdapterRef | None:
        adapter_id = self.current_id()
        return None if adapter_id is None else self.get(adapter_id)

    def _move(self, event: str, adapter_id: str | None, stack: list[str], reason: str) -> None:
        now = datetime.now(timezone.utc).isoformat()
        previous = self.current_id()
        pointer = {"adapter_id": adapter_id, "stack": stack, "reason": reason, "at": now, "event": event}
        _atomic_write(self.pointer_path, json.dumps(pointer, indent=1))
        self._record({"event": event, "adapter_id": adapter_id, "previous": previous, "reason": reason, "at": now})

    def _record(self, record: dict[str, Any]) -> None:
        with open(self.history_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def promote(self, adapter_id: str, reason: str, *,
                expected_current: str | None | EllipsisType = ...) -> AdapterRef:
        """Make `adapter_id` current (it must be in the registry).

        With `expected_current` (an id, or None for the base model), only if `current` is still
        that; otherwise `CurrentMoved` and nothing changes. Promoting what is already current
        is a no-op either way.
        """
        ref = self.get(adapter_id)
        with self._locked():
            pointer = self._pointer()
            now = pointer.get("adapter_id")
            if expected_current is not ... and now != expected_current and now != adapter_id:
                raise CurrentMoved(expected_current, now)
            if now != adapter_id:
                stack = list(pointer.get("stack", []))
                if pointer.get("adapter_id") is not None:
                    stack.append(pointer["adapter_id"])
                self._move("promote", adapter_id, stack, reason)
        return ref

    def rollback(self, reason: str = "rollback") -> AdapterRef | None:
        """Back to the adapter promoted before the current one (None = base model)."""
        with self._locked():
            pointer = self._pointer()
            if pointer.get("adapter_id") is None:
                return None
            stack = list(pointer.get("stack", []))
            previous = stack.pop() if stack else None
            self._move("rollback", previous, stack, reason)
        return None if previous is None else self.get(previous)

    def history(self) -> list[dict[str, Any]]:
        if not self.history_path.exists():
            return []
        lines = self.history_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    # --- retention (trainer/retention.py decides what; the invariants are kept here) -------------
    def rollback_targets(self) -> list[str]:
        """The stack of earlier promotions, oldest first: `rollback` pops from its end."""
        return list(self._pointer().get("stack", []))

    def prune(self, adapter_ids: list[str], reason: str, *, keep_rollbacks: int | None = None) -> list[str]:
        """Delete `adapter_ids` from adapters/, under the writer lock, skipping any that is current
        or on the rollback stack as it stands under that lock: a rollback never points to a
        deleted adapter. `keep_rollbacks`: first forget all but that many of the most recent
        rollback targets (the stack's end; rollback past them reaches the base model), in the
        same lock hold. Each deletion (and a trim) is a `gc` line in the history. Returns the
        ids deleted."""
        deleted: list[str] = []
        with self._locked():
            pointer = self._pointer()
            current, stack = pointer.get("adapter_id"), list(pointer.get("stack", []))
            if keep_rollbacks is not None and len(stack) > keep_rollbacks:
                dropped = stack[: len(stack) - keep_rollbacks]
                stack = stack[len(stack) - keep_rollbacks:]
                self._move("gc", current, stack, f"{reason}: rollback stack trimmed to {keep_rollbacks}, "
                                                 f"forgot {', '.join(dropped)}")
            for adapter_id in dict.fromkeys(adapter_ids):
                if adapter_id == current or adapter_id in stack:
                    continue
                path = self.adapters_dir / adapter_id
                # only a real folder inside adapters/ (no symlink out, no malformed id)
                if (not is_adapter_id(adapter_id) or path.is_symlink() or not path.is_dir()
                        or path.resolve().parent != self.adapters_dir.resolve()):
                    continue
                # renamed first: a reader never opens a half-deleted adapter under its id
                doomed = self.adapters_dir / f".gc-{adapter_id}-{uuid.uuid4().hex[:8]}"
                os.rename(path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
                deleted.append(adapter_id)
                self._record({"event": "gc", "adapter_id": adapter_id, "previous": current, "reason": reason,
                              "at": datetime.now(timezone.utc).isoformat()})
            if deleted:
                _fsync_dir(self.adapters_dir)
        return deleted
