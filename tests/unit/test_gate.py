"""Promotion gate: a pure decision on two held-out reports."""

from __future__ import annotations

from trainer.promote import decide


def rep(coverage: float, accuracy: float, *, data_hash: str = "d", epsilon: float = 0.03, n: int = 1000,
        adapter_id: str | None = "a-x") -> dict:
    return {"coverage_at_epsilon": coverage, "accuracy": accuracy, "epsilon": epsilon,
            "adapter_id": adapter_id, "data": {"data_hash": data_hash, "n": n}}


def test_better_candidate_is_promoted():
    d = decide(rep(0.60, 0.85), rep(0.50, 0.84), margin=0.01)
    assert d.promote and "coverage" in d.reason


def test_worse_candidate_is_rejected_with_reason():
    d = decide(rep(0.40, 0.90), rep(0.50, 0.84), margin=0.01)
    assert not d.promote
    assert "lower coverage" in d.reason and "0.400" in d.reason and "0.500" in d.reason


def test_gain_below_margin_is_rejected():
    d = decide(rep(0.505, 0.85), rep(0.50, 0.85), margin=0.01)
    assert not d.promote and "margin" in d.reason


def test_tie_on_coverage_is_broken_by_accuracy():
    base = rep(0.0, 0.02, adapter_id=None)
    assert decide(rep(0.0, 0.45), base, margin=0.01).promote
    d = decide(rep(0.0, 0.025), base, margin=0.01)
    assert not d.promote and "tied" in d.reason and "base model" in d.reason


def test_equal_candidate_is_not_promoted_even_with_zero_margin():
    assert not decide(rep(0.5, 0.8), rep(0.5, 0.8), margin=0.0).promote


def test_reports_on_different_data_are_not_compared():
    d = decide(rep(0.9, 0.99, data_hash="x"), rep(0.1, 0.5, data_hash="y"), margin=0.01)
    assert not d.promote and "different held-out data" in d.reason
    assert not decide(rep(0.9, 0.99, epsilon=0.05), rep(0.1, 0.5), margin=0.01).promote


def test_no_live_report_compares_with_nothing():
    assert decide(rep(0.3, 0.8), None, margin=0.01).promote
    assert not decide(rep(0.0, 0.0), None, margin=0.01).promote
