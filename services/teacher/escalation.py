"""Escalation policy: pure functions and small counters, no I/O, no clock.

- `should_escalate`: a ticket goes to the teacher when any field is below its threshold.
- `AuditEstimator`: live accuracy of confident student answers, measured against the teacher
  on audited tickets, with a Wilson 95% interval.
- `RollingRate`: share of True over the last N decisions (e.g. the escalation rate).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Mapping, Protocol

DEFAULT_THRESHOLD_KEY = "*"
_Z95 = 1.959963984540054


class HasConfidence(Protocol):
    confidence: float


def field_threshold(field: str, threshold: float | Mapping[str, float]) -> float:
    """A per-field threshold; a mapping may hold "*" as the default for unlisted fields."""
    if isinstance(threshold, Mapping):
        if field in threshold:
            return float(threshold[field])
        if DEFAULT_THRESHOLD_KEY in threshold:
            return float(threshold[DEFAULT_THRESHOLD_KEY])
        raise KeyError(f"no confidence threshold for field {field!r} and no '*' default")
    return float(threshold)


def configured_threshold(value: float) -> float:
    """A threshold set by hand (TRIAGE_CONFIDENCE_THRESHOLD): 1.0 means "escalate every ticket".
    Compared as `confidence < 1.0` it would let confidence exactly 1.0 through (grammar-forced
    or float32-saturated tokens), so it becomes math.inf, the trust-nothing threshold."""
    return math.inf if value >= 1.0 else float(value)


def should_escalate(
    prediction: Mapping[str, HasConfidence], threshold: float | Mapping[str, float]
) -> bool:
    """True when any field's confidence is strictly below its threshold.

    Equal to the threshold is confident; math.inf ("trust nothing") escalates every field,
    confidence 1.0 included. An empty prediction (no field answered) escalates.
    """
    if not prediction:
        return True
    return any(p.confidence < field_threshold(name, threshold) for name, p in prediction.items())


def unsure_fields(prediction: Mapping[str, HasConfidence], threshold: float | Mapping[str, float]) -> list[str]:
    """The fields strictly below their threshold, in prediction order: what the teacher is asked."""
    return [name for name, p in prediction.items() if p.confidence < field_threshold(name, threshold)]


def wilson_interval(successes: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


class AuditEstimator:
    """Agreement of confident student answers with the teacher (optionally over a window)."""

    def __init__(self, window: int | None = None) -> None:
        if window is not None and window < 1:
            raise ValueError("window must be >= 1")
        self._recent: deque[bool] | None = deque(maxlen=window) if window else None
        self._agree = 0
        self._n = 0

    def record(self, agree: bool) -> None:
        if self._recent is not None:
            if len(self._recent) == self._recent.maxlen:
                old = self._recent[0]
                self._agree -= int(old)
                self._n -= 1
            self._recent.append(bool(agree))
        self._agree += int(bool(agree))
        self._n += 1

    def estimate(self) -> tuple[float, int, float, float]:
        """(accuracy, n, lower95, upper95); accuracy is NaN before the first record."""
        lo, hi = wilson_interval(self._agree, self._n)
        accuracy = self._agree / self._n if self._n else math.nan
        return accuracy, self._n, lo, hi


class RollingRate:
    """Share of True among the last `window` decisions."""

    def __init__(self, window: int = 1000) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self._values: deque[bool] = deque(maxlen=window)
        self._true = 0

    def record(self, value: bool) -> None:
        if len(self._values) == self._values.maxlen:
            self._true -= int(self._values[0])
        self._values.append(bool(value))
        self._true += int(bool(value))

    def rate(self) -> float:
        """0.0 before the first decision."""
        return self._true / len(self._values) if self._values else 0.0

    def __len__(self) -> int:
        return len(self._values)
