"""The teacher client's failure policy pieces: circuit breaker, rolling spend window,
Retry-After parsing. `services.teacher.client.OpenAITeacher` uses (and re-exports) them.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from email.utils import parsedate_to_datetime
from typing import Any, Callable

# The client's logger, as before these pieces moved here: log records keep their name.
log = logging.getLogger("services.teacher.client")


class CircuitBreaker:
    """closed -> open after `failures` consecutive failures -> half-open after `reset_s`."""

    def __init__(self, failures: int, reset_s: float, clock: Callable[[], float]) -> None:
        self.failures, self.reset_s, self._clock = max(1, failures), reset_s, clock
        self.state = "closed"
        self.consecutive = 0
        self._opened_at = 0.0
        self._probing = False

    def refusing(self) -> bool:
        """Would `acquire` refuse right now? (No state change.)"""
        if self.state == "open":
            return self._clock() - self._opened_at < self.reset_s
        return self.state == "half_open" and self._probing

    def acquire(self) -> bool:
        """May a call go out? In half-open exactly one probe is let through at a time."""
        if self.state == "open" and self._clock() - self._opened_at >= self.reset_s:
            self.state, self._probing = "half_open", False
        if self.state == "closed":
            return True
        if self.state == "half_open" and not self._probing:
            self._probing = True
            return True
        return False

    def success(self) -> None:
        self.state, self.consecutive, self._probing = "closed", 0, False

    def failure(self) -> None:
        self.consecutive += 1
        if self.state == "half_open" or self.consecutive >= self.failures:
            if self.state != "open":
                log.warning("teacher circuit breaker opened after %d failures", self.consecutive)
            self.state, self._opened_at, self._probing = "open", self._clock(), False

    def abandon(self) -> None:
        """A probe was cancelled: let the next call probe instead."""
        self._probing = False


class SpendWindow:
    """Spend in the last hour / day, kept in one-minute buckets (at most 1440 of them).

    A bucket counts while any part of it is inside the window, so a cap errs on the safe
    side by at most one minute of spend.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._buckets: deque[list[float]] = deque()  # [minute_start, usd]

    def add(self, usd: float) -> None:
        minute = self._clock() // 60 * 60
        if self._buckets and self._buckets[-1][0] == minute:
            self._buckets[-1][1] += usd
        else:
            self._buckets.append([minute, usd])
        while self._buckets and self._buckets[0][0] <= minute - 86_400:
            self._buckets.popleft()

    def spent(self, window_s: float) -> float:
        since = self._clock() - window_s
        return sum(usd for start, usd in self._buckets if start + 60 > since)


def _retry_after_s(headers: Any) -> float | None:
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None
