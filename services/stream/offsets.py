"""Which offsets a consumer may commit when records finish out of order. Pure, no Kafka.

The teacher worker holds many escalations at once and they finish in any order (a teacher
call takes 0.1 s or, during an outage, minutes). Kafka commits one offset per partition
("everything before this is done"), so the commit position is the lowest offset still in
flight, or one past the highest taken when nothing is. A crash re-delivers everything from
there: at-least-once, never a gap.

Rebalances. aiokafka's eager protocol revokes every partition, then assigns, often handing
most of them straight back. So a revoke only *suspends* a partition (`revoke`): its records
stay tracked while their work runs on, nothing new is taken for it and nothing committed.
`assign` then says what happened: a partition handed back continues where it was (its
re-read records are skipped: their first copy is still in flight or already done here), any
other starts afresh at the fetch position the consumer reports, and the partitions no longer
ours are returned so the caller can cancel their work (the new owner redoes it from the
committed position). Each ownership has an epoch: a late `done` from a cancelled task of an
earlier ownership cannot release a record of the current one.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Mapping

Partition = Hashable  # (topic, partition) or aiokafka's TopicPartition

_epochs = itertools.count(1)


@dataclass
class _PartitionState:
    start: int  # the fetch position this ownership began at: records below it are not ours
    highest: int  # highest offset taken (start - 1: none yet)
    committed: int  # the position the group has (confirmed by `mark_committed`, or `start`)
    epoch: int = field(default_factory=lambda: next(_epochs))
    inflight: set[int] = field(default_factory=set)
    owned: bool = True  # False between a revoke and the next assignment


class OffsetTracker:
    def __init__(self) -> None:
        self._parts: dict[Partition, _PartitionState] = {}

    # ---- ownership ----------------------------------------------------------------------
    def assign(self, positions: Mapping[Partition, int]) -> list[Partition]:
        """A new assignment: partition -> the position its fetch starts at. Returns the
        partitions whose earlier state was dropped (no longer ours, or moved on by another
        consumer meanwhile): their in-flight work must be cancelled by the caller."""
        dropped = [p for p in self._parts if p not in positions]
        for p in dropped:
            del self._parts[p]
        for p, start in positions.items():
            state = self._parts.get(p)
            # Continuous ownership: the group's position is one we handed out, so every
            # record from it on is in flight here, done here, or not yet taken.
            if state is not None and state.start <= start <= state.highest + 1:
                state.owned, state.committed = True, start
                continue
            if state is not None:
                dropped.append(p)
            self._parts[p] = _PartitionState(start=start, highest=start - 1, committed=start)
        return dropped

    def revoke(self, partitions: Iterable[Partition]) -> None:
        """Suspend: take nothing new, commit nothing, keep tracking what is in flight."""
        for p in partitions:
            state = self._parts.get(p)
            if state is not None:
                state.owned = False

    def owns(self, partition: Partition) -> bool:
        state = self._parts.get(partition)
        return state is not None and state.owned

    # ---- records ------------------------------------------------------------------------
    def add(self, partition: Partition, offset: int) -> int | None:
        """Take a consumed record: its ownership epoch (pass it to `done`), or None when it
        is not to be worked on here (partition not ours now, below this ownership's start,
        or a re-read of a record already in flight or done)."""
        state = self._parts.get(partition)
        if state is None or not state.owned or offset < state.start or offset <= state.highest:
            return None
        state.inflight.add(offset)
        state.highest = offset
        return state.epoch

    def done(self, partition: Partition, offset: int, epoch: int) -> None:
        """The record's work is finished (results acked). Ignored for a partition dropped or
        re-owned since (`epoch` differs): that record is another ownership's now."""
        state = self._parts.get(partition)
        if state is not None and state.epoch == epoch:
            state.inflight.discard(offset)

    # ---- commits ------------------------------------------------------------------------
    def committable(self) -> dict[Partition, int]:
        """Owned partition -> position to commit, only where it moved past the group's."""
        out: dict[Partition, int] = {}
        for partition, state in self._parts.items():
            position = min(state.inflight) if state.inflight else state.highest + 1
            if state.owned and position > state.committed:
                out[partition] = position
        return out

    def mark_committed(self, positions: Mapping[Partition, int]) -> None:
        for partition, position in positions.items():
            state = self._parts.get(partition)
            if state is not None:
                state.committed = max(state.committed, position)

    # ---- gauges -------------------------------------------------------------------------
    def inflight(self, partitions: Iterable[Partition] | None = None) -> int:
        """Records in flight (suspended partitions included: their work still runs)."""
        chosen = self._parts if partitions is None else {p: self._parts[p] for p in partitions if p in self._parts}
        return sum(len(s.inflight) for s in chosen.values())

    def partitions(self) -> list[Partition]:
        return list(self._parts)
