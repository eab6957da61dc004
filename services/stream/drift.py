"""Drift, noticed: the live stream in windows, against the figures of the live adapter's distil.

Pure: no I/O. The service feeds a `DriftTracker` (the pipeline each student decision, the teacher
worker each teacher answer) and reacts to a closed window (services/stream/drift_log.py: a
metric, a log line, the drift log `triage status` reads).

A window is every `size` consumed tickets of one adapter (a hot-swap, or the threshold turning
cold, starts a new one). Its figures, each a `Proportion` with a Wilson 95% interval, overall
and per label:
- escalation rate: tickets the student did not answer alone;
- accuracy: agreement with the teacher of the evaluation sample's confident answers (audits),
  the figure the adapter's threshold certified on its held-out slice;
- novel share: of the tickets the teacher labelled, those whose label the adapter never
  trained on (its distil records its training labels; an adapter without that record falls
  back to the labels the student has predicted here).
Teacher answers come later than decisions: a full window waits for the answers of its own
escalated and audited tickets (by ticket id) and closes when they are in, or when the next
window fills. In a teacher-only process (`unit="teacher"`) a window is every `size` answers.

An alert (`check`) when a window departs from its adapter's distil beyond both intervals:
escalation rate outside (either way), accuracy below, or the novel share's lower bound above
`novel_floor` (the distil's novel share is 0 by construction).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from services.teacher.escalation import wilson_interval

REASONS = ("escalation", "accuracy", "novel_labels")


@dataclass(frozen=True)
class Proportion:
    k: int
    n: int

    @property
    def value(self) -> float | None:
        return self.k / self.n if self.n else None

    def interval(self) -> tuple[float, float]:
        return wilson_interval(self.k, self.n)

    def as_dict(self) -> dict[str, Any]:
        low, high = self.interval()
        value = self.value
        return {"value": None if value is None else round(value, 4), "k": self.k, "n": self.n,
                "low": round(low, 4), "high": round(high, 4)}


@dataclass(frozen=True)
class Baseline:
    """What the adapter's distil measured on its held-out certification rows (teacher labels)."""

    adapter_id: str | None
    escalation: Proportion | None = None  # at the stored threshold
    accuracy: Proportion | None = None  # agreement of the accepted rows with the teacher
    trained: Mapping[str, frozenset[str]] | None = None  # labels per field in its training data

    @classmethod
    def from_meta(cls, adapter_id: str | None, meta: Mapping[str, Any] | None) -> Baseline:
        """From an adapter's triage_adapter.json. An infeasible or missing threshold (the
        adapter trusts nothing) has no escalation or accuracy figure to depart from."""
        meta = meta or {}
        labels = (meta.get("data") or {}).get("labels")
        trained = {f: frozenset(counts) for f, counts in labels.items()} if isinstance(labels, dict) else None
        stored = meta.get("threshold") or {}
        cert = ((meta.get("eval") or {}).get("certification")) or {}
        if isinstance(stored.get("fields"), dict):  # per field: the certification report has the counts
            blocks = [((f or {}).get("threshold") or {}) for f in (cert.get("fields") or {}).values()]
            n = int((cert.get("data") or {}).get("n") or 0)
            rate = cert.get("escalation_rate_at_epsilon")
        else:
            blocks = [stored] if stored else []
            n, rate = int(stored.get("n") or 0), stored.get("escalation_rate")
        if not blocks or any(b.get("feasible") is False or not b.get("accepted") for b in blocks):
            return cls(adapter_id, trained=trained)
        # Several fields: a ticket is accepted when every field is; union bound on the errors.
        accepted = min(int(b["accepted"]) for b in blocks)
        errors = min(accepted, sum(int(b.get("errors_accepted") or 0) for b in blocks))
        escalation = Proportion(round(float(rate) * n), n) if rate is not None and n else None
        return cls(adapter_id, escalation, Proportion(accepted - errors, accepted), trained)

    def as_dict(self) -> dict[str, Any]:
        return {"adapter_id": self.adapter_id,
                "escalation_rate": self.escalation.as_dict() if self.escalation else None,
                "accuracy": self.accuracy.as_dict() if self.accuracy else None,
                "trained_labels": sum(len(v) for v in self.trained.values()) if self.trained else None}


@dataclass
class LabelCounts:
    tickets: int = 0  # student decisions with this label
    escalated: int = 0
    taught: int = 0  # teacher answers with this label
    novel: int = 0  # ... a label the adapter never trained on
    audited: int = 0  # audits whose teacher label is this one
    agree: int = 0

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if v}


@dataclass
class Window:
    index: int
    adapter_id: str | None
    cold: bool = False  # the live threshold trusts nothing: every ticket escalates
    started_at: float | None = None
    ended_at: float | None = None
    tickets: int = 0
    escalated: int = 0
    taught: int = 0
    novel: int = 0
    audited: int = 0
    agree: int = 0
    waiting: set[str] = field(default_factory=set)  # ticket ids whose teacher answer is due
    labels: dict[str, LabelCounts] = field(default_factory=dict)

    def label(self, key: str) -> LabelCounts:
        return self.labels.setdefault(key, LabelCounts())

    @property
    def escalation(self) -> Proportion:
        return Proportion(self.escalated, self.tickets)

    @property
    def accuracy(self) -> Proportion:
        return Proportion(self.agree, self.audited)

    @property
    def novel_share(self) -> Proportion:
        return Proportion(self.novel, self.taught)


@dataclass(frozen=True)
class Alert:
    reason: str  # one of REASONS
    detail: str


def _pct(p: Proportion) -> str:
    low, high = p.interval()
    return f"{p.value:.1%} [{low:.1%}, {high:.1%}] (n {p.n})"


def check(window: Window, baseline: Baseline | None, *, novel_floor: float = 0.01) -> list[Alert]:
    """The ways `window` departs from `baseline` beyond both Wilson intervals (disjoint intervals:
    conservative, so a window of a few tickets never alerts on noise)."""
    alerts: list[Alert] = []
    if baseline is not None and not window.cold:
        live, then = window.escalation, baseline.escalation
        if then is not None and live.n:
            (lo, hi), (b_lo, b_hi) = live.interval(), then.interval()
            if lo > b_hi or hi < b_lo:
                alerts.append(Alert("escalation", f"escalation {'up' if lo > b_hi else 'down'}: {_pct(live)} "
                                                  f"vs {_pct(then)} at the distil"))
        live, then = window.accuracy, baseline.accuracy
        if then is not None and live.n and live.interval()[1] < then.interval()[0]:
            alerts.append(Alert("accuracy", f"audited accuracy down: {_pct(live)} vs {_pct(then)} "
                                            f"on the distil's held-out rows"))
    novel = window.novel_share
    if novel.n and novel.interval()[0] > novel_floor:
        alerts.append(Alert("novel_labels", f"teacher labels the adapter never trained on: {_pct(novel)} "
                                            f"(floor {novel_floor:.1%})"))
    return alerts


def summary(window: Window, baseline: Baseline | None, alerts: list[Alert], unit: str = "tickets") -> dict[str, Any]:
    """A closed window as one JSON record (the drift log, `triage status`)."""
    return {
        "index": window.index, "unit": unit, "adapter_id": window.adapter_id, "cold": window.cold,
        "started_at": window.started_at, "ended_at": window.ended_at, "tickets": window.tickets,
        "teacher_answers_missing": len(window.waiting),
        "escalation_rate": window.escalation.as_dict(), "accuracy": window.accuracy.as_dict(),
        "novel_share": window.novel_share.as_dict(),
        "baseline": baseline.as_dict() if baseline is not None else None,
        "alerts": [{"reason": a.reason, "detail": a.detail} for a in alerts],
        "labels": {k: c.as_dict() for k, c in sorted(window.labels.items())},
    }


# on_close(window, baseline, alerts): the service's reaction (metric, log line, drift log).
OnClose = Callable[[Window, "Baseline | None", list[Alert]], None]


class DriftTracker:
    def __init__(self, size: int = 1000, *, unit: str = "tickets",
                 baseline_of: Callable[[str | None], Baseline | None] = lambda _: None,
                 novel_floor: float = 0.01, on_close: OnClose | None = None,
                 clock: Callable[[], float] | None = None, keep: int = 50, guard: Any = None) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        if unit not in ("tickets", "teacher"):
            raise ValueError("unit is 'tickets' or 'teacher'")
        self.size, self.unit, self.novel_floor = size, unit, novel_floor
        self._baseline_of, self.on_close, self.clock = baseline_of, on_close, clock
        self._baselines: dict[str | None, Baseline | None] = {}
        self._predicted: dict[str | None, dict[str, set[str]]] = {}  # adapter -> field -> labels seen
        self._count = 0
        self._open: Window | None = None
        self._full: Window | None = None  # full, waiting for its teacher answers
        self.closed: list[dict[str, Any]] = []  # the last `keep` summaries
        self.keep = keep
        self.guard = guard  # services/stream/novelty_guard.py: fed here, asked by the pipeline

    # ---- the feeds -------------------------------------------------------------------------
    def decided(self, ticket_id: str, adapter_id: str | None, labels: Mapping[str, Any], escalated: bool,
                *, audited: bool = False, cold: bool = False) -> None:
        """One student decision: escalated (the teacher will answer) or answered alone, then
        `audited` (the evaluation sample: the teacher answers too)."""
        window = self._window(adapter_id, cold)
        window.tickets += 1
        window.escalated += bool(escalated)
        for key, label in self._labels(labels, adapter_id):
            counts = window.label(key)
            counts.tickets += 1
            counts.escalated += bool(escalated)
        if escalated or audited:
            window.waiting.add(ticket_id)
        if self.unit == "tickets" and window.tickets >= self.size:
            self._filled(window)

    def taught(self, ticket_id: str, adapter_id: str | None, teacher: Mapping[str, Any],
               student: Mapping[str, Any], agree: bool | None = None) -> None:
        """The teacher's answer to an escalated (`agree` None) or audited ticket."""
        # a late answer (its window closed) or one decided elsewhere counts in the open window
        window = self._owner(ticket_id) or self._open or self._window(adapter_id, False)
        known = self._known(adapter_id)
        self._labels(student, adapter_id)  # what the student predicted is known from now on
        novel = False
        for key, name, label in self._teacher_labels(teacher):
            counts = window.label(key)
            counts.taught += 1
            fresh = known is not None and label not in known.get(name, ())
            counts.novel += fresh
            novel = novel or fresh
            if agree is not None:
                counts.audited += 1
                counts.agree += bool(agree)
        base = self.baseline(adapter_id)
        if self.guard is not None and base is not None and base.trained is not None:
            # only against the distil's record: "not predicted yet" is no evidence to escalate on
            self.guard.observe(adapter_id, student, {name: label not in base.trained.get(name, ())
                                                     for _, name, label in self._teacher_labels(teacher)})
        if known is not None:  # the base model trained on nothing: no novel share to speak of
            window.taught += 1
            window.novel += novel
        if agree is not None:
            window.audited += 1
            window.agree += bool(agree)
        window.waiting.discard(ticket_id)
        if window is self._full and not window.waiting:
            self._close(window)
        elif self.unit == "teacher" and window is self._open:
            window.tickets += 1
            if window.tickets >= self.size:
                self._filled(window)

    def flush(self) -> None:
        """Close the full window now, answers missing or not (a bench between phases)."""
        if self._full is not None:
            self._close(self._full)

    def baseline(self, adapter_id: str | None) -> Baseline | None:
        if adapter_id not in self._baselines:
            self._baselines[adapter_id] = self._baseline_of(adapter_id) if adapter_id else None
        return self._baselines[adapter_id]

    # ---- windows ---------------------------------------------------------------------------
    def _window(self, adapter_id: str | None, cold: bool) -> Window:
        """The open window for a decision of `adapter_id`: a swap (or the threshold turning
        cold) ends the open one early, one adapter per window."""
        w = self._open
        if w is not None and self.unit == "tickets" and (w.adapter_id, w.cold) != (adapter_id, cold):
            if w.tickets:
                self._filled(w)
            else:
                w.adapter_id, w.cold = adapter_id, cold
        if self._open is None:
            self._open = Window(self._count, adapter_id, cold, started_at=self._now())
            self._count += 1
        return self._open

    def _filled(self, window: Window) -> None:
        if self._full is not None:  # the one before waited long enough
            self._close(self._full)
        self._open = None
        window.ended_at = self._now()
        if window.waiting:
            self._full = window
        else:
            self._close(window)

    def _close(self, window: Window) -> None:
        if window is self._full:
            self._full = None
        baseline = self.baseline(window.adapter_id)
        alerts = check(window, baseline, novel_floor=self.novel_floor)
        self.closed.append({**summary(window, baseline, alerts, self.unit),
                            "guarded": self.guard.active(window.adapter_id) if self.guard is not None else []})
        del self.closed[:-self.keep]
        if self.on_close is not None:
            self.on_close(window, baseline, alerts)

    def _owner(self, ticket_id: str) -> Window | None:
        for window in (self._full, self._open):
            if window is not None and ticket_id in window.waiting:
                return window
        return None

    # ---- labels ----------------------------------------------------------------------------
    def _known(self, adapter_id: str | None) -> Mapping[str, Any] | None:
        """The labels per field the adapter trained on (else: predicted here), None for the base model."""
        if adapter_id is None:
            return None
        base = self.baseline(adapter_id)
        if base is not None and base.trained is not None:
            return base.trained
        return self._predicted.setdefault(adapter_id, {})

    def _labels(self, labels: Mapping[str, Any], adapter_id: str | None) -> list[tuple[str, str]]:
        """(per-label key, label) of the categorical fields; noted as predicted by `adapter_id`."""
        seen = self._predicted.setdefault(adapter_id, {})
        out = []
        for key, name, label in self._teacher_labels(labels):
            seen.setdefault(name, set()).add(label)
            out.append((key, label))
        return out

    @staticmethod
    def _teacher_labels(labels: Mapping[str, Any]) -> list[tuple[str, str, str]]:
        """(key, field, label) per categorical field: the key is the label alone for a one-field
        answer, field=label otherwise (entity lists are no label)."""
        cats = [(n, v) for n, v in labels.items() if isinstance(v, str)]
        return [(v if len(cats) == 1 else f"{n}={v}", n, v) for n, v in cats]

    def _now(self) -> float | None:
        return self.clock() if self.clock is not None else None


def top_labels(labels: Mapping[str, Mapping[str, int]], n: int = 10) -> dict[str, Mapping[str, int]]:
    """The labels that moved most in a window: most novel teacher answers, then escalations."""
    ranked = sorted(labels.items(), key=lambda kv: (-kv[1].get("novel", 0), -kv[1].get("escalated", 0),
                                                    -kv[1].get("tickets", 0), kv[0]))
    return dict(ranked[:n])
