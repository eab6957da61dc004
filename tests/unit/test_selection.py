"""The gate selects on one part of the held-out slice and certifies on the other: a promoted
adapter's threshold then fails its bound at most delta of the time, cycle after cycle; one slice
for both (the gate before) fails it about twice as often (bench/selection.py, 4,000 draws:
the figures in trainer/README.md). A smaller, seeded version of that simulation."""

from __future__ import annotations

import math

from bench.selection import World, simulate
from trainer import calibration as cal


def rates(result: dict) -> tuple[float, float, int]:
    """(violation rate, its Monte-Carlo standard error at delta, promotions) over the cycles
    after the first, where the gate chose a candidate over a live adapter."""
    later = result["per_cycle"][1:]
    promoted = sum(c["promoted"] for c in later)
    rate = sum(c["violations"] for c in later) / promoted
    return rate, math.sqrt(0.05 * 0.95 / promoted), promoted


def test_promoted_thresholds_fail_at_most_delta_with_disjoint_selection_and_certification(monkeypatch):
    world = World(cycles=4)
    split = simulate(world, 600, "split", seed=1)
    rate, se, promoted = rates(split)
    assert promoted > 300, split  # enough promotions for the rate to mean something
    assert rate <= world.delta + 2 * se, split
    assert split["violation_rate"] <= world.delta + 2 * split["mc_se"], split  # the first one too
    assert split["live_violation_rate_at_end"] <= world.delta + 2 * math.sqrt(0.05 * 0.95 / 600), split
    # the same world with one slice for both: a winner is a candidate the rows were kind to. Shown
    # with one walk at the full delta: the product's two walks, each at delta / 2, are more
    # conservative and keep even this protocol under delta here (4.5%)
    monkeypatch.setattr(cal, "WALKS", ((3, 1.0),))
    rate, se, promoted = rates(simulate(world, 600, "reuse", seed=1))
    assert promoted > 300 and rate > world.delta + 2 * se, reuse


def test_the_first_adapter_certified_on_the_whole_slice_holds_once_re_certified_when_kept():
    """The product's gate: no adapter live, so the whole slice certifies the first one; a later
    gate that keeps it re-certifies it on the certification part. Every stored threshold
    (promotions and re-certifications) fails at most delta; without the re-certification the
    kept first adapter keeps rows' luck that also selected it."""
    world = World(cycles=4)
    result = simulate(world, 600, "first-whole", seed=1)
    stored = result["promotions"] + result["recertified"]
    failed = result["violations"] + result["recert_violations"]
    assert result["recertified"] > 50 and stored > 600, result  # the first adapter is often kept
    assert failed / stored <= world.delta + 2 * math.sqrt(0.05 * 0.95 / stored), result
    first = result["per_cycle"][0]
    assert first["violations"] / first["promoted"] <= world.delta + 2 * math.sqrt(0.05 * 0.95 / first["promoted"])
    assert result["live_violation_rate_at_end"] <= world.delta + 2 * math.sqrt(0.05 * 0.95 / 600), result
