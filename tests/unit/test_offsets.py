"""OffsetTracker: commit positions with out-of-order completion, across eager rebalances."""

from services.stream.offsets import OffsetTracker


def tracker(**positions):
    t = OffsetTracker()
    t.assign(positions)
    return t


def take(t, partition, offsets):
    return {o: t.add(partition, o) for o in offsets}


def test_commit_position_is_the_lowest_offset_still_in_flight():
    t = tracker(p0=10)
    epochs = take(t, "p0", (10, 11, 12))
    assert all(epochs.values())
    assert t.committable() == {}  # nothing done: the group's position 10 stands
    t.done("p0", 11, epochs[11])
    t.done("p0", 12, epochs[12])
    assert t.committable() == {}  # 10 still in flight holds the position back
    t.done("p0", 10, epochs[10])
    assert t.committable() == {"p0": 13}
    t.mark_committed({"p0": 13})
    assert t.committable() == {}  # no movement, nothing to commit
    assert t.add("p0", 12) is None  # a re-delivery of a finished record is skipped
    assert t.add("p0", 9) is None  # below where this ownership began: not ours to redo
    assert t.inflight() == 0


def test_a_partition_handed_straight_back_keeps_its_work_and_skips_re_reads():
    """aiokafka's eager rebalance revokes everything, then assigns most of it back."""
    t = tracker(p0=0)
    epochs = take(t, "p0", range(5))
    t.done("p0", 1, epochs[1])
    t.revoke(["p0"])
    assert t.committable() == {}  # suspended: nothing committed for it
    assert t.add("p0", 5) is None  # a record fetched before the revoke: not taken now
    t.done("p0", 2, epochs[2])  # its tasks run on meanwhile, and count
    assert t.inflight() == 3  # still held: backpressure does not lift on a rebalance
    assert t.assign({"p0": 0}) == []  # back, from the position committed at the revoke
    assert take(t, "p0", range(5)) == {o: None for o in range(5)}  # in flight or done: one task each
    assert t.add("p0", 5) == epochs[0]  # the rest continues, same ownership
    t.done("p0", 0, epochs[0])
    assert t.committable() == {"p0": 3}  # 0-2 done, 3 in flight
    assert t.inflight() == 3


def test_a_stale_batch_cannot_move_the_commit_past_records_still_in_flight():
    """A batch fetched before the revoke, handled after it: the old code forgot the partition
    at the revoke, took the stale batch as new and committed past 0-9 (held only by tasks it
    had forgotten), which a crash then lost."""
    t = tracker(p0=0)
    epochs = take(t, "p0", range(10))
    t.revoke(["p0"])
    assert take(t, "p0", range(10, 20)) == {o: None for o in range(10, 20)}  # not ours meanwhile
    t.assign({"p0": 0})
    late = take(t, "p0", range(10, 20))  # handled after the assignment: contiguous, taken
    for o in range(10, 20):
        t.done("p0", o, late[o])
    assert t.committable() == {}  # 0-9 are still in flight: the position stays at 0
    for o in range(10):
        t.done("p0", o, epochs[o])
    assert t.committable() == {"p0": 20}


def test_a_partition_now_elsewhere_is_dropped_and_its_late_work_ignored():
    t = tracker(p0=0, p1=0)
    old = take(t, "p0", range(3))
    t.revoke(["p0", "p1"])
    assert t.assign({"p1": 0}) == ["p0"]  # the caller cancels p0's tasks
    assert not t.owns("p0") and t.add("p0", 3) is None and t.inflight() == 0
    # Back later, after another consumer committed up to 12: a fresh ownership from there.
    assert t.assign({"p0": 12, "p1": 0}) == []
    assert t.add("p0", 2) is None  # below the group's position: done by the other owner
    new = t.add("p0", 12)
    assert new is not None and new != old[0]
    t.done("p0", 12, old[0])  # a cancelled task of the earlier ownership finishing late
    assert t.inflight() == 1 and t.committable() == {}  # does not release the current record
    t.done("p0", 12, new)
    assert t.committable() == {"p0": 13}


def test_a_partition_another_consumer_moved_on_starts_afresh():
    t = tracker(p0=0)
    take(t, "p0", range(3))
    t.revoke(["p0"])
    # The group's position is past anything this worker took: someone else owned it meanwhile.
    assert t.assign({"p0": 40}) == ["p0"]
    assert t.inflight() == 0 and t.add("p0", 39) is None and t.add("p0", 40) is not None
