"""Which offsets a consumer may commit when records finish out of order. Pure, no Kafka.

The teacher worker holds many escalations at once and they finish in any order (a teacher
call takes 0.1 s or, during an outage, minutes). Kafka commits one offset per partition
("everything before this is done"), so the commit position is the lowest offset still in
flight, or one past the highest seen when nothing is. A crash re-delivers everything from
there: at-least-once, never a gap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable, Iterable

Partition = Hashable  # (topic, partition) or aiokafka's TopicPartition


@dataclass
class _PartitionState:
    inflight: set[int] = field(default_factory=set)
    highest: int = -1  # highest offset seen
    committed: int = -1  # the last position handed out by `committable` and confirmed


class OffsetTracker:
    def __init__(self) -> None:
        self._parts: dict[Partition, _PartitionState] = {}

    def add(self, partition: Partition, offset: int) -> bool:
        """Track a consumed record; False if it was seen already (a re-delivery: skip it)."""
        state = self._parts.setdefault(partition, _PartitionState())
        if offset <= state.highest or offset < state.committed:
            return False
        state.inflight.add(offset)
        state.highest = offset
        return True

    def done(self, partition: Partition, offset: int) -> None:
        """The record's work is finished (results acked). Unknown partitions are ignored:
        they were revoked while the work ran."""
        state = self._parts.get(partition)
        if state is not None:
            state.inflight.discard(offset)

    def committable(self) -> dict[Partition, int]:
        """Partition -> position to commit, only where it moved since `mark_committed`."""
        out: dict[Partition, int] = {}
        for partition, state in self._parts.items():
            position = min(state.inflight) if state.inflight else state.highest + 1
            if position > state.committed and position > 0:
                out[partition] = position
        return out

    def mark_committed(self, positions: dict[Partition, int]) -> None:
        for partition, position in positions.items():
            state = self._parts.get(partition)
            if state is not None:
                state.committed = max(state.committed, position)

    def forget(self, partitions: Iterable[Partition]) -> None:
        """Revoked partitions: their records now belong to another consumer."""
        for partition in partitions:
            self._parts.pop(partition, None)

    def inflight(self) -> int:
        return sum(len(s.inflight) for s in self._parts.values())

    def partitions(self) -> list[Partition]:
        return list(self._parts)
