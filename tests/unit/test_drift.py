"""Drift windows (services/stream/drift.py) and where a closed window goes (drift_log.py)."""

import json
import math

import pytest

from services.stream.drift import Baseline, DriftTracker, Proportion, Window, check, top_labels

A = "a-0123456789abcdef"
B = "a-fedcba9876543210"


def meta(*, n=1000, accepted=500, errors=10, rate=0.5, feasible=True, trained=("card_arrival", "lost_card")):
    return {"threshold": {"value": 0.9, "feasible": feasible, "n": n, "accepted": accepted,
                          "errors_accepted": errors, "escalation_rate": rate},
            "data": {"labels": {"intent": {label: 10 for label in trained}}}}


def baseline(**kw):
    return Baseline.from_meta(A, meta(**kw))


def window(tickets=0, escalated=0, audited=0, agree=0, taught=0, novel=0, cold=False):
    return Window(0, A, cold, tickets=tickets, escalated=escalated, audited=audited, agree=agree,
                  taught=taught, novel=novel)


# ---- baseline from the adapter's metadata -----------------------------------------------------
def test_baseline_reads_the_certification_figures_and_the_training_labels():
    b = baseline()
    assert b.escalation == Proportion(500, 1000)
    assert b.accuracy == Proportion(490, 500)  # agreement of the accepted held-out rows
    assert b.trained == {"intent": frozenset({"card_arrival", "lost_card"})}


def test_a_trust_nothing_adapter_has_no_figures_to_depart_from():
    b = baseline(feasible=False)
    assert b.escalation is None and b.accuracy is None and b.trained  # the labels still count
    assert Baseline.from_meta(A, {}).trained is None


def test_per_field_thresholds_union_bound_the_errors():
    m = {"threshold": {"fields": {"a": 0.9, "b": 0.8}},
         "eval": {"certification": {"data": {"n": 400}, "escalation_rate_at_epsilon": 0.25, "fields": {
             "a": {"threshold": {"feasible": True, "accepted": 350, "errors_accepted": 4}},
             "b": {"threshold": {"feasible": True, "accepted": 320, "errors_accepted": 3}}}}}}
    b = Baseline.from_meta(A, m)
    assert b.escalation == Proportion(100, 400) and b.accuracy == Proportion(313, 320)


# ---- the alert ------------------------------------------------------------------------------
def test_an_escalation_rate_beyond_both_intervals_alerts_either_way():
    [up] = check(window(1000, 620), baseline())
    assert up.reason == "escalation" and "up" in up.detail
    [down] = check(window(1000, 380), baseline())
    assert "down" in down.detail
    assert check(window(1000, 530), baseline()) == []  # within the intervals


def test_a_small_window_does_not_alert_on_noise():
    assert check(window(20, 14), baseline()) == []  # 70% of 20: the interval reaches 48%


def test_audited_accuracy_alerts_only_when_worse():
    [alert] = check(window(1000, 500, audited=60, agree=48), baseline())
    assert alert.reason == "accuracy"
    assert check(window(1000, 500, audited=60, agree=60), baseline()) == []


def test_new_labels_alert_above_the_floor():
    [alert] = check(window(1000, 500, taught=500, novel=60), baseline())
    assert alert.reason == "novel_labels"
    assert check(window(1000, 500, taught=500, novel=3), baseline()) == []  # lower bound < 1%
    assert check(window(1000, 500, taught=500, novel=60), None)[0].reason == "novel_labels"


def test_a_cold_window_escalates_everything_by_design():
    assert check(window(1000, 1000, cold=True), baseline()) == []


# ---- the tracker ----------------------------------------------------------------------------
def tracker(size=4, **kw):
    closed = []
    t = DriftTracker(size, baseline_of=lambda a: baseline() if a == A else None,
                     on_close=lambda w, b, alerts: closed.append((w, b, alerts)), **kw)
    return t, closed


def test_a_window_closes_every_size_tickets_with_per_label_figures():
    t, closed = tracker()
    for i in range(9):
        t.decided(f"t{i}", A, {"intent": "lost_card" if i % 3 else "card_arrival"}, escalated=False)
    assert [w.tickets for w, _, _ in closed] == [4, 4]
    w, b, _ = closed[0]
    assert b.adapter_id == A and w.labels["lost_card"].tickets == 2 and w.labels["card_arrival"].tickets == 2
    assert [s["index"] for s in t.closed] == [0, 1]


def test_a_full_window_waits_for_its_own_teacher_answers():
    t, closed = tracker()
    t.decided("t0", A, {"intent": "lost_card"}, escalated=True)
    t.decided("t1", A, {"intent": "lost_card"}, escalated=False, audited=True)
    t.decided("t2", A, {"intent": "lost_card"}, escalated=False)
    t.decided("t3", A, {"intent": "card_arrival"}, escalated=False)
    t.decided("t4", A, {"intent": "lost_card"}, escalated=False)  # the next window begins
    assert closed == []
    t.taught("t0", A, {"intent": "new_intent"}, {"intent": "lost_card"})
    t.taught("t1", A, {"intent": "lost_card"}, {"intent": "lost_card"}, agree=True)
    [(w, _, _)] = closed
    assert (w.index, w.escalated, w.taught, w.novel, w.audited, w.agree) == (0, 1, 2, 1, 1, 1)
    assert w.labels["new_intent"].novel == 1 and w.labels["lost_card"].agree == 1


def test_a_missing_answer_closes_the_window_when_the_next_fills():
    t, closed = tracker(size=2)
    t.decided("t0", A, {"intent": "lost_card"}, escalated=True)
    t.decided("t1", A, {"intent": "lost_card"}, escalated=False)
    t.decided("t2", A, {"intent": "lost_card"}, escalated=False)
    t.decided("t3", A, {"intent": "lost_card"}, escalated=False)
    assert [w.index for w, _, _ in closed] == [0, 1]
    assert t.closed[0]["teacher_answers_missing"] == 1
    t.taught("t0", A, {"intent": "lost_card"}, {"intent": "lost_card"})  # late: counts in the open window
    t.decided("t4", A, {"intent": "lost_card"}, escalated=False)
    t.decided("t5", A, {"intent": "lost_card"}, escalated=False)
    assert closed[-1][0].taught == 1


def test_a_hot_swap_ends_the_window_early():
    t, closed = tracker()
    t.decided("t0", A, {"intent": "lost_card"}, escalated=False)
    t.decided("t1", B, {"intent": "lost_card"}, escalated=False)
    assert [(w.adapter_id, w.tickets) for w, _, _ in closed] == [(A, 1)]
    assert t._open.adapter_id == B


def test_novel_falls_back_to_what_the_student_predicted_and_the_base_model_has_none():
    t, closed = tracker(size=1)
    t.decided("t0", B, {"intent": "lost_card"}, escalated=True)  # B: no training record
    t.taught("t0", B, {"intent": "card_arrival"}, {"intent": "lost_card"})
    t.decided("t1", B, {"intent": "lost_card"}, escalated=True)
    t.taught("t1", B, {"intent": "lost_card"}, {"intent": "lost_card"})
    assert [(w.taught, w.novel) for w, _, _ in closed] == [(1, 1), (1, 0)]
    t.decided("t2", None, {"intent": "lost_card"}, escalated=True)
    t.taught("t2", None, {"intent": "card_arrival"}, {"intent": "lost_card"})
    assert (closed[-1][0].taught, closed[-1][0].novel) == (0, 0)


def test_alerts_reach_the_callback_and_the_summary():
    t, closed = tracker(size=100)
    for i in range(100):
        t.decided(f"t{i}", A, {"intent": "lost_card"}, escalated=i < 90)
    for i in range(90):
        t.taught(f"t{i}", A, {"intent": "new_intent" if i < 40 else "lost_card"}, {"intent": "lost_card"})
    _, _, alerts = closed[0]
    assert {a.reason for a in alerts} == {"escalation", "novel_labels"}
    record = t.closed[0]
    assert record["escalation_rate"]["value"] == 0.9 and record["novel_share"]["k"] == 40
    assert record["baseline"]["escalation_rate"]["value"] == 0.5
    assert list(top_labels(record["labels"], 1)) == ["new_intent"]
    json.dumps(record)  # one JSON line


def test_a_teacher_only_process_counts_teacher_answers():
    t, closed = tracker(size=2, unit="teacher")
    for i in range(4):
        t.taught(f"t{i}", A, {"intent": "lost_card"}, {"intent": "lost_card"}, agree=True)
    assert [(w.taught, w.audited) for w, _, _ in closed] == [(2, 2), (2, 2)]
    with pytest.raises(ValueError):
        DriftTracker(0)


def test_multi_field_answers_key_labels_by_field():
    t, closed = tracker(size=1)
    t.decided("t0", A, {"intent": "lost_card", "priority": "high", "entities": []}, escalated=False)
    assert set(closed[0][0].labels) == {"intent=lost_card", "priority=high"}


# ---- the service's side ------------------------------------------------------------------------
def test_the_drift_log_status_and_gauges(tmp_path):
    from services.settings import Settings
    from services.stream.drift_log import DriftLog, drift_status, drift_tracker
    from services.stream.metrics import ServiceMetrics

    adapter = tmp_path / "registry" / "adapters" / A
    adapter.mkdir(parents=True)
    (adapter / "triage_adapter.json").write_text(json.dumps(
        {**meta(), "base_model": "x", "prompt_style": "compact", "task": {}}))
    s = Settings(_env_file=None, data_dir=tmp_path / "data", registry_dir=tmp_path / "registry", drift_window=10)
    metrics = ServiceMetrics()
    t = drift_tracker(s, metrics)
    for i in range(10):
        t.decided(f"t{i}", A, {"intent": "lost_card"}, escalated=True)
        t.taught(f"t{i}", A, {"intent": "new_intent"}, {"intent": "lost_card"})
    [record] = DriftLog(s.drift_log_path).recent(5)
    assert {a["reason"] for a in record["alerts"]} == {"escalation", "novel_labels"}
    status = drift_status(s)
    assert status["windows"][0]["alerts"] == ["escalation", "novel_labels"] and len(status["alert"]) == 2
    assert status["windows"][0]["escalation_rate"] == "100.0% (n 10)"
    assert status["windows"][0]["guarded"] == ["lost_card"]  # the novelty guard, on by default
    assert t.guard.guarded(A, {"intent": "lost_card"}) == ["intent"]
    assert "triage_guarded_labels 1.0" in metrics.exposition().decode()
    text = metrics.exposition().decode()
    assert 'triage_drift_alert{reason="escalation"} 1.0' in text
    assert 'triage_drift_alert{reason="accuracy"} 0.0' in text
    assert 'triage_drift_window{bound="value",figure="escalation_rate"} 1.0' in text
    assert 'triage_drift_baseline{bound="value",figure="escalation_rate"} 0.5' in text
    assert 'triage_drift_window{bound="value",figure="accuracy"} NaN' in text
    with open(s.drift_log_path, "a") as f:
        f.write('{"cut')  # a crash mid-line never breaks status
    assert len(DriftLog(s.drift_log_path).recent(5)) == 1


def test_the_pipeline_feeds_every_decision():
    import asyncio

    from tests.unit.test_pipeline import FakeClassifier, record, ticket
    from services.stream.pipeline import EscalationConfig, TicketPipeline

    t, closed = tracker(size=3)
    pipeline = TicketPipeline(classifier=FakeClassifier({"sure": 0.9, "unsure": 0.2}), drift=t,
                              escalation=EscalationConfig(threshold_override=0.5))
    asyncio.run(pipeline.process([record(i, ticket(i, "unsure" if i else "sure")) for i in range(3)]))
    assert closed == []  # full, waiting for the teacher's two answers
    w = t._full
    assert (w.tickets, w.escalated, w.waiting) == (3, 2, {"t1", "t2"})
    assert math.isclose(w.escalation.value, 2 / 3)
