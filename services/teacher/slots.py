"""The teacher's concurrency, shared by escalations and audits (services.teacher.worker)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, deque
from typing import AsyncIterator


class TeacherSlots:
    """The teacher's concurrency, shared by escalations and audits with escalations first.

    A freed slot is handed to the next waiter in line (FIFO per kind): after an outage
    thousands of escalations wait here, and waking them all on every release (a Condition)
    cost O(waiters) per teacher answer.
    """

    def __init__(self, total: int, audit_slots: int) -> None:
        self.total, self.audit_slots = max(1, total), max(0, min(audit_slots, total))
        self._busy = Counter[str]()
        self._queues: dict[str, deque[tuple[str, asyncio.Future[None]]]] = {
            "escalation": deque(), "audit": deque()}

    @staticmethod
    def _lane(kind: str) -> str:
        return "audit" if kind == "audit" else "escalation"

    def _free_for(self, lane: str) -> bool:
        if sum(self._busy.values()) >= self.total:
            return False
        if lane == "audit":
            return self._busy["audit"] < self.audit_slots and not self._queues["escalation"]
        return True

    def _hand_over(self) -> None:
        """Give free slots to the waiters first in line, escalations before audits."""
        for lane in ("escalation", "audit"):
            queue = self._queues[lane]
            while queue and self._free_for(lane):
                kind, waiter = queue.popleft()
                if not waiter.done():
                    self._busy[kind] += 1
                    waiter.set_result(None)

    @contextlib.asynccontextmanager
    async def hold(self, kind: str) -> AsyncIterator[None]:
        lane = self._lane(kind)
        if not self._queues[lane] and self._free_for(lane):
            self._busy[kind] += 1
        else:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._queues[lane].append((kind, waiter))
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # handed a slot as it was cancelled
                    self._release(kind)
                else:  # leave the line: a stale entry would make newcomers queue behind nobody
                    with contextlib.suppress(ValueError):
                        self._queues[lane].remove((kind, waiter))
                    # escalations wait only while every slot is busy, so nobody behind this one
                    # can start now; handing over anyway keeps that from being load-bearing
                    self._hand_over()
                raise
        try:
            yield
        finally:
            self._release(kind)

    def _release(self, kind: str) -> None:
        self._busy[kind] -= 1
        self._hand_over()

    def busy(self, kind: str) -> int:
        return self._busy[kind]
