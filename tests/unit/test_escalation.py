import math

import pytest

from schemas.classification import FieldPrediction
from schemas.training import eval_sample_source
from services.teacher.escalation import (
    AuditEstimator,
    RollingRate,
    should_escalate,
    wilson_interval,
)


def pred(**confidences: float) -> dict[str, FieldPrediction]:
    return {name: FieldPrediction(label="x", confidence=c) for name, c in confidences.items()}


# --- should_escalate -----------------------------------------------------------------------
def test_equal_to_threshold_is_confident():
    assert should_escalate(pred(intent=0.7), 0.7) is False


def test_just_below_threshold_escalates():
    assert should_escalate(pred(intent=math.nextafter(0.7, 0.0)), 0.7) is True


def test_above_threshold_is_confident():
    assert should_escalate(pred(intent=0.71), 0.7) is False


def test_any_field_below_escalates():
    assert should_escalate(pred(intent=0.99, priority=0.2), 0.5) is True
    assert should_escalate(pred(intent=0.99, priority=0.5), 0.5) is False


def test_per_field_thresholds():
    thresholds = {"intent": 0.9, "priority": 0.3}
    assert should_escalate(pred(intent=0.95, priority=0.35), thresholds) is False
    assert should_escalate(pred(intent=0.85, priority=0.95), thresholds) is True  # intent < 0.9
    assert should_escalate(pred(intent=0.95, priority=0.25), thresholds) is True
    assert should_escalate(pred(intent=0.9, priority=0.3), thresholds) is False  # both equal


def test_per_field_default_and_missing():
    assert should_escalate(pred(intent=0.6, other=0.4), {"intent": 0.5, "*": 0.5}) is True
    assert should_escalate(pred(intent=0.6, other=0.6), {"intent": 0.5, "*": 0.5}) is False
    with pytest.raises(KeyError):
        should_escalate(pred(other=0.9), {"intent": 0.5})


def test_thresholds_zero_and_one():
    assert should_escalate(pred(intent=0.0), 0.0) is False
    assert should_escalate(pred(intent=0.999), 1.0) is True
    assert should_escalate(pred(intent=1.0), 1.0) is False


def test_empty_prediction_escalates():
    assert should_escalate({}, 0.5) is True


# --- the evaluation sample's membership (replaces ticket-id audit sampling) -----------------
@pytest.mark.parametrize("share", [0.01, 0.05, 0.3])
def test_sample_share_within_tolerance_over_10k_texts(share):
    n = 10_000
    hits = sum(eval_sample_source(f"ticket text {i}", share, share, cold=False) is not None for i in range(n))
    sd = math.sqrt(n * share * (1 - share))
    assert abs(hits - n * share) < 5 * sd, (hits, n * share)


def test_sample_extremes():
    texts = [f"t{i}" for i in range(2000)]
    assert not any(eval_sample_source(t, 0.0, 0.0, cold=True) for t in texts)
    assert all(eval_sample_source(t, 1.0, 1.0, cold=False) == "sample" for t in texts)


# --- Wilson / AuditEstimator / RollingRate -------------------------------------------------
def test_wilson_known_values():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(0.7225, abs=1e-3)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_contains_estimate_and_narrows():
    widths = []
    for n in (10, 100, 1000, 10000):
        k = int(0.9 * n)
        lo, hi = wilson_interval(k, n)
        assert lo <= k / n <= hi
        widths.append(hi - lo)
    assert widths == sorted(widths, reverse=True)


def test_audit_estimator():
    est = AuditEstimator()
    acc, n, lo, hi = est.estimate()
    assert math.isnan(acc) and n == 0 and (lo, hi) == (0.0, 1.0)
    for agree in [True] * 8 + [False] * 2:
        est.record(agree)
    acc, n, lo, hi = est.estimate()
    assert (acc, n) == (0.8, 10)
    assert (lo, hi) == pytest.approx(wilson_interval(8, 10))


def test_audit_estimator_window_keeps_recent():
    est = AuditEstimator(window=5)
    for agree in [False] * 10 + [True] * 5:
        est.record(agree)
    acc, n, _, _ = est.estimate()
    assert (acc, n) == (1.0, 5)


def test_rolling_rate():
    rate = RollingRate(window=4)
    assert rate.rate() == 0.0
    for value in [True, False, True, True, False]:
        rate.record(value)
    assert len(rate) == 4
    assert rate.rate() == 0.5  # last four: F T T F
    for _ in range(4):
        rate.record(True)
    assert rate.rate() == 1.0
