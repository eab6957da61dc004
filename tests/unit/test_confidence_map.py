"""Calibrated confidence (services/student/confidence_map.py): the published number is a
probability, and the map never changes which tickets a threshold accepts."""

import math

import numpy as np
import pytest

from schemas.classification import EntityPrediction, FieldPrediction, LabelScore
from services.student.confidence_map import ConfidenceMap, adapter_maps, fit, mapped
from services.student.engine import StudentPrediction
from trainer import calibration as cal


def overconfident(n, seed, a=0.6, b=0.3):
    """Scores whose true chance of being right is sigmoid(a * logit(score) + b): a student that
    is overconfident at the top, as measured on the demo's held-out slices (a 0.59-0.90)."""
    rng = np.random.default_rng(seed)
    score = rng.beta(8, 1.2, n)
    logit = np.log(score / (1 - score))
    right = rng.random(n) < 1 / (1 + np.exp(-(a * logit + b)))
    return score, right


def test_a_map_fitted_on_one_sample_calibrates_another():
    score, right = overconfident(1000, seed=1)
    m = fit(score, right)
    assert m is not None and m.rows == 1000
    assert m.a == pytest.approx(0.6, abs=0.15) and m.b == pytest.approx(0.3, abs=0.35)
    fresh, fresh_right = overconfident(5000, seed=2)
    raw_ece = cal.expected_calibration_error(fresh, fresh_right)
    calibrated = [m(c) for c in fresh]
    assert raw_ece > 0.04
    assert cal.expected_calibration_error(calibrated, fresh_right) < 0.02


def test_the_map_is_strictly_increasing_and_keeps_0_and_1():
    m = ConfidenceMap(0.6, -0.4)
    grid = np.linspace(0.001, 0.999, 999)
    values = [m(c) for c in grid]
    assert all(b > a for a, b in zip(values, values[1:]))
    assert m(0.0) == 0.0 and m(1.0) == 1.0 and m(math.nan) == 0.0  # 0 is never certified


def test_the_same_tickets_are_accepted_before_and_after_the_map():
    """So every certificate the raw walk gives (and its simulations) holds for mapped scores."""
    score, right = overconfident(2000, seed=3)
    m = fit(score[:600], right[:600])
    certify, certify_right = score[600:], right[600:]
    raw = cal.choose_threshold(certify, certify_right, 0.10)
    calibrated = [m(c) for c in certify]
    after = cal.choose_threshold(calibrated, certify_right, 0.10)
    assert raw.feasible and after.feasible
    assert (certify >= raw.threshold).tolist() == [c >= after.threshold for c in calibrated]
    assert after.threshold == pytest.approx(m(raw.threshold))


def test_too_few_rows_or_one_sided_rows_fit_nothing():
    score, right = overconfident(99, seed=4)
    assert fit(score, right) is None
    assert fit([0.9] * 500, [True] * 500) is None
    assert fit([0.0, 1.0] * 200, [False, True] * 200) is None  # only 0 and 1: nothing to map


def test_a_prediction_is_mapped_field_by_field_and_stays_a_distribution():
    pred = StudentPrediction(
        fields={"intent": FieldPrediction(label="a", confidence=0.9, alternatives=[
            LabelScore(label="b", probability=0.06), LabelScore(label="c", probability=0.03)]),
            "priority": FieldPrediction(label="low", confidence=0.8)},
        distribution={"intent": [0.9, 0.06, 0.03, 0.01]}, adapter_id="a-1",
        entities=EntityPrediction(entities=[], confidence=0.97), entity_field="entities")
    maps = {"intent": ConfidenceMap(0.5, 0.0), "entities": ConfidenceMap(2.0, 0.0)}
    out = mapped(pred, maps)
    intent = out.fields["intent"]
    assert intent.confidence == pytest.approx(maps["intent"](0.9)) and intent.confidence < 0.9
    left = 1 - intent.confidence  # the runners-up share what the top label leaves, in proportion
    assert [s.probability for s in intent.alternatives] == pytest.approx([0.06 / 0.1 * left, 0.03 / 0.1 * left])
    assert out.fields["priority"] == pred.fields["priority"]  # no map for it: the engine's score
    assert out.entities.confidence == pytest.approx(maps["entities"](0.97))
    assert out.distribution == pred.distribution and out.confidence == min(
        intent.confidence, 0.8, out.entities.confidence)
    assert mapped(pred, {}) is pred


def test_maps_travel_with_the_threshold_in_the_adapters_metadata():
    class Ref:
        meta = {"threshold": {"value": 0.7, "confidence_map": {"intent": {"method": "platt", "a": 0.5,
                                                                            "b": 0.1, "rows": 535}}}}

    assert adapter_maps(Ref()) == {"intent": ConfidenceMap(0.5, 0.1, 535)}
    assert adapter_maps(None) == {} and adapter_maps(type("Old", (), {"meta": {"threshold": {"value": 0.9}}})()) == {}


def test_distills_reports_fit_on_selection_certify_mapped_and_publish_calibrated():
    """trainer.evaluate: the selection report fits the map, the certification report chooses the
    threshold on mapped scores, and the report set is judged through the same pair."""
    from schemas.task import TaskSpec, default_task_path
    from trainer.dataset import Row
    from trainer.evaluate import HeldOut, report, served_maps, served_threshold

    task = TaskSpec.from_file(default_task_path())
    gold, other = task.fields[0].labels[0], task.fields[0].labels[1]

    def part(name, n, seed):
        score, right = overconfident(n, seed, b=2.0)
        rows = [Row(f"{name}-{i}", {"intent": gold}) for i in range(n)]
        preds = [StudentPrediction(fields={"intent": FieldPrediction(label=gold if ok else other, confidence=c)},
                                   distribution={}, adapter_id="a-1") for c, ok in zip(score, right)]
        return HeldOut(name, "-", rows), preds

    (select, sp), (certify, cp), (final, fp) = part("select", 600, 5), part("certify", 1200, 6), part("final", 3000, 7)
    chosen = report(task, select, sp, adapter_id="a-1", epsilon=0.05, delta=0.05)
    assert chosen["confidence_map"]["intent"]["rows"] == 600
    cert = report(task, certify, cp, adapter_id="a-1", epsilon=0.05, delta=0.05, confidence_map=served_maps(chosen))
    assert cert["confidence_map"] == chosen["confidence_map"]
    assert cert["ece"] < cert["ece_raw"] and cert["ece_raw"] > 0.03
    out = report(task, final, fp, adapter_id="a-1", epsilon=0.05, delta=0.05,
                 threshold=served_threshold(cert), confidence_map=served_maps(cert))
    assert out["ece"] < 0.03 < out["ece_raw"]
    # the same tickets as a raw walk on the certification part would accept
    raw_cert = report(task, certify, cp, adapter_id="a-1", epsilon=0.05, delta=0.05, confidence_map={})
    assert raw_cert["confidence_map"] == {} and raw_cert["ece"] == raw_cert["ece_raw"]
    raw_out = report(task, final, fp, adapter_id="a-1", epsilon=0.05, delta=0.05,
                     threshold=served_threshold(raw_cert), confidence_map={})
    assert cert["threshold"]["accepted"] == raw_cert["threshold"]["accepted"] > 0
    assert out["coverage_at_epsilon"] == raw_out["coverage_at_epsilon"]
