"""The service's side of drift (services/stream/drift.py): where a closed window goes.

- a log line per window (a warning naming the reasons when it departs from the distil);
- the `triage_drift_*` gauges (ServiceMetrics.set_drift) that the TriageDrift alert rule and
  the dashboard read;
- one JSON line per window in the drift log (`Settings.drift_log_path`, beside the training
  log), which `triage status` reads: the service is the only one that sees every decision,
  the training log holds teacher answers only.
Baselines come from the registry: the adapter's own triage_adapter.json, read once per id.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import deque
from pathlib import Path
from typing import Any

from services.stream.drift import Alert, Baseline, DriftTracker, Window, top_labels
from services.stream.novelty_guard import NoveltyGuard

log = logging.getLogger(__name__)


class DriftLog:
    """Append-only JSON lines; a line is one `write` on an O_APPEND file, so replicas sharing
    the folder do not interleave."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def recent(self, n: int) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with open(self.path, encoding="utf-8") as f:
            lines = deque(f, maxlen=n)
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash: skip it, never fail status
                continue
        return out


def registry_baselines(registry_dir: str | Path) -> Any:
    """adapter_id -> its distil's Baseline (None when the registry lacks it)."""
    from services.student.registry import AdapterRegistry, is_adapter_id, read_meta

    root = AdapterRegistry(registry_dir).adapters_dir

    def baseline_of(adapter_id: str | None) -> Baseline | None:
        if not is_adapter_id(adapter_id):
            return None
        try:
            return Baseline.from_meta(adapter_id, read_meta(root / str(adapter_id)))
        except (OSError, ValueError):
            return None

    return baseline_of


def drift_tracker(settings: Any, metrics: Any, *, unit: str = "tickets", name: str = "") -> DriftTracker:
    """The tracker a replica feeds, wired to its metrics, its log and the drift log."""
    drift_log = DriftLog(settings.drift_log_path)
    replica = f"{socket.gethostname()}:{os.getpid()}"

    def on_close(window: Window, baseline: Baseline | None, alerts: list[Alert]) -> None:
        # the tracker has just summarised this window (with its guarded labels): not again here
        record = {**tracker.closed[-1], "replica": replica, "task": name or None}
        if metrics is not None and hasattr(metrics, "drift_alert"):
            set_gauges(metrics, record)
        if alerts:
            log.warning("drift window %d (%s, adapter %s): %s", window.index, unit, window.adapter_id,
                        "; ".join(a.detail for a in alerts), extra={"drift": [a.reason for a in alerts]})
        else:
            log.info("drift window %d (%s, adapter %s): escalated %s, audited accuracy %s, novel labels %s",
                     window.index, unit, window.adapter_id, *(_short(record[k]) for k in (
                         "escalation_rate", "accuracy", "novel_share")))
        try:
            drift_log.append(record)
        except OSError:  # a full or read-only disk must not stop the stream
            log.exception("drift log %s: append failed", drift_log.path)

    tracker = DriftTracker(settings.drift_window, unit=unit, baseline_of=registry_baselines(settings.registry_dir),
                           novel_floor=settings.drift_novel_floor, on_close=on_close, clock=time.time,
                           guard=novelty_guard(settings, metrics))
    return tracker


def novelty_guard(settings: Any, metrics: Any) -> NoveltyGuard | None:
    """The replica's guard (None when TRIAGE_NOVELTY_GUARD_MIN_NOVEL is 0), saying each change."""
    if not settings.novelty_guard_min_novel:
        return None

    def on_change(adapter_id: str | None, field: str, label: str, guarded: bool, novel: int, seen: int) -> None:
        if guarded:
            log.warning("novelty guard: tickets the student labels %s=%s now escalate: %d of the teacher's "
                        "last %d answers on them were labels adapter %s never trained on", field, label,
                        novel, seen, adapter_id, extra={"drift": ["novelty_guard"]})
        else:
            log.info("novelty guard lifted for %s=%s (%d novel of the last %d)", field, label, novel, seen)
        if metrics is not None and hasattr(metrics, "guarded_labels"):
            metrics.guarded_labels.set(len(guard.active(adapter_id)))

    guard = NoveltyGuard(settings.novelty_guard_history, min(settings.novelty_guard_min_novel,
                                                              settings.novelty_guard_history), on_change=on_change)
    return guard


def set_gauges(metrics: Any, record: dict[str, Any]) -> None:
    """The `triage_drift_*` series of ServiceMetrics from a closed window's record."""
    from services.stream.drift import REASONS

    metrics.drift_windows.inc()
    raised = {a["reason"] for a in record["alerts"]}
    for reason in REASONS:
        metrics.drift_alert.labels(reason=reason).set(int(reason in raised))
    for gauge, source, figures in ((metrics.drift_window, record, ("escalation_rate", "accuracy", "novel_share")),
                                   (metrics.drift_baseline, record.get("baseline") or {}, ("escalation_rate", "accuracy"))):
        for figure in figures:
            p = source.get(figure)
            for bound in ("value", "low", "high"):
                value = p.get(bound) if p else None
                gauge.labels(figure, bound).set(float("nan") if value is None else value)


def _short(p: dict[str, Any]) -> str:
    return "-" if p["value"] is None else f"{p['value']:.1%} (n {p['n']})"


def drift_status(settings: Any, n: int = 5) -> dict[str, Any]:
    """`triage status`: the last windows in short, their alerts, and the moving labels of the last."""
    try:
        windows = DriftLog(settings.drift_log_path).recent(n)
    except OSError as exc:  # unreadable: the rest of status still helps
        return {"drift_log": str(settings.drift_log_path), "error": str(exc)}
    short = [{
        "index": w.get("index"), "unit": w.get("unit"), "replica": w.get("replica"),
        "adapter_id": w.get("adapter_id"), "ended_at": _when(w.get("ended_at")), "tickets": w.get("tickets"),
        **{k: _short(w[k]) for k in ("escalation_rate", "accuracy", "novel_share") if k in w},
        "alerts": [a["reason"] for a in w.get("alerts", [])], "guarded": w.get("guarded", []),
    } for w in windows]
    last = windows[-1] if windows else None
    return {
        "drift_log": str(settings.drift_log_path), "window": settings.drift_window,
        "windows": short,
        "alert": [a["detail"] for a in last.get("alerts", [])] if last else [],
        "baseline": last.get("baseline") if last else None,
        "labels": top_labels(last.get("labels", {})) if last else {},
    }


def _when(ts: float | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts)) if ts else None
