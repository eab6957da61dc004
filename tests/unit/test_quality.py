"""Quality measured by people (services/teacher/quality.py): the three agreements with their n
and Wilson bounds from known counts, the most corrected labels, the join from the training log
(the teacher's answer a person replaced, the published answer the feedback quotes, the
evaluation sample's side), and the gauges (services/stream/metrics.py)."""

from __future__ import annotations

import json
import math
import sqlite3

import pytest

from schemas.training import TrainingExample
from services.stream.metrics import ServiceMetrics
from services.teacher.feedback import FeedbackDesk
from services.teacher.quality import Judged, agree, corrections, measure, quality_from_log, read_judged
from services.teacher.training_log import TrainingLog
from tests.unit.test_feedback import TASK


def judged(n: int, *, people: str, student: str | None, teacher: str | None, in_sample: bool) -> list[Judged]:
    return [Judged(people={"team": people}, student=None if student is None else {"team": student},
                   teacher=None if teacher is None else {"team": teacher}, in_sample=in_sample)] * n


def test_known_counts_and_wilson_bounds_by_hand():
    items = (judged(7, people="cards", student="cards", teacher="cards", in_sample=True)
             + judged(1, people="cards", student="cards", teacher="payments", in_sample=True)
             + judged(2, people="cards", student="payments", teacher="cards", in_sample=True)
             + judged(3, people="account", student=None, teacher="account", in_sample=True)  # escalated
             + judged(4, people="account", student="payments", teacher=None, in_sample=False))
    report = measure(items)
    sample, everything = report["sample"], report["all"]
    assert sample["tickets"] == 13 and everything["tickets"] == 17
    # 8 of 10 accepted answers agree with people. Wilson 95%, by hand (z = 1.96): centre
    # (0.8 + 1.9208/10) / (1 + 3.8415/10) = 0.71674, half-width 1.96 * sqrt(0.016 + 0.00096)
    # / 1.38415 = 0.22659 -> [0.4902, 0.9433].
    assert sample["student_vs_people"]["agree"] == 8 and sample["student_vs_people"]["n"] == 10
    assert sample["student_vs_people"]["rate"] == pytest.approx(0.8)
    assert sample["student_vs_people"]["low"] == pytest.approx(0.4902, abs=1e-4)
    assert sample["student_vs_people"]["high"] == pytest.approx(0.9433, abs=1e-4)
    assert (sample["teacher_vs_people"]["agree"], sample["teacher_vs_people"]["n"]) == (12, 13)
    assert (sample["student_vs_teacher"]["agree"], sample["student_vs_teacher"]["n"]) == (7, 10)
    # `all` adds the 4 non-sample corrections of the student (no teacher answer for them).
    assert (everything["student_vs_people"]["agree"], everything["student_vs_people"]["n"]) == (8, 14)
    assert everything["teacher_vs_people"]["n"] == 13 and everything["student_vs_teacher"]["n"] == 10
    # Most corrected first: people said account (4 times) / cards (2 times) where the student said payments.
    assert report["corrections"]["student"] == [
        {"field": "team", "label": "account", "corrected": 4, "judged": 4, "said": {"payments": 4}},
        {"field": "team", "label": "cards", "corrected": 2, "judged": 10, "said": {"payments": 2}}]
    assert report["corrections"]["teacher"] == [
        {"field": "team", "label": "cards", "corrected": 1, "judged": 10, "said": {"payments": 1}}]


def test_nothing_judged_yet_is_an_unknown_rate_not_zero():
    report = measure([])
    assert report["sample"]["student_vs_people"] == {"agree": 0, "n": 0, "rate": None, "low": 0.0, "high": 1.0}
    assert report["corrections"] == {"student": [], "teacher": []}


def test_agreement_is_over_the_fields_both_name_and_entities_are_sets():
    assert agree({"team": "cards"}, {"team": "cards", "other": "x"}) is True
    assert agree({"team": "cards"}, {"other": "x"}) is None  # nothing to compare: not counted
    a = [{"type": "country", "text": "Spain"}, {"type": "country", "text": "France"}]
    assert agree({"entities": a}, {"entities": list(reversed(a))}) is True
    assert agree({"team": "cards", "entities": a}, {"team": "cards", "entities": a[:1]}) is False


def test_top_k_keeps_the_most_corrected_labels():
    items = [Judged(people={"team": label}, student={"team": "cards"}) for label in
             ["payments"] * 3 + ["account"] * 2 + ["other"]]
    top = corrections(items, "student", top=2)
    assert [(c["label"], c["corrected"]) for c in top] == [("payments", 3), ("account", 2)]


def row(text: str, team: str, source: str, ticket_id: str) -> TrainingExample:
    return TrainingExample(text=text, labels={"team": team, "entities": []}, teacher_model="gpt",
                           prompt_hash="p", source=source, ticket_id=ticket_id)


def published(route: str, team: str) -> dict:  # a whole result record: extra keys are dropped
    return {"ticket_id": "x", "route": route, "fields": {"team": team}, "entities": [], "confidence": 0.9,
            "model": "smol", "latency_ms": 1.0, "engine_ms": 1.0}


def test_the_log_joins_people_the_teacher_it_replaced_and_the_quoted_student(tmp_path):
    path = tmp_path / "log.sqlite3"
    with TrainingLog(path) as log:
        desk = FeedbackDesk(TASK, log, eval_share=0.05)
        log.append([row("my card is late", "payments", "sample", "T-1"),  # an audit: the teacher erred
                    row("refund please", "payments", "sample", "T-2"),  # an audit: all agree
                    row("reset my password", "cards", "live", "T-3")])  # an escalation: the teacher erred
        sent = [
            {"ticket_id": "T-1", "fields": {"team": "cards"}, "published": published("student", "cards")},
            {"ticket_id": "T-2", "fields": {"team": "payments"}, "published": published("student", "payments")},
            {"ticket_id": "T-3", "fields": {"team": "account"}, "published": published("teacher", "cards")},
            {"ticket_id": "T-4", "fields": {"team": "account"}, "text": "close my account please",
             "published": published("student", "cards")},  # the student alone, outside the log
            {"ticket_id": "T-3", "fields": {"team": "account"}, "source": "system"},  # not people
        ]
        outcomes = [desk.receive(json.dumps(r).encode()).outcome for r in sent]
        assert outcomes == ["corrected", "confirmed", "corrected", "added", "outranked"]
    got = {j.people["team"] + ":" + str(j.teacher and j.teacher["team"]): j for j in read_judged(path, "entities")}
    assert set(got) == {"cards:payments", "payments:payments", "account:cards", "account:None"}
    assert got["cards:payments"].student == {"team": "cards", "entities": []} and got["cards:payments"].in_sample
    assert got["account:cards"].student is None and not got["account:cards"].in_sample  # not accepted
    assert got["account:None"].student == {"team": "cards", "entities": []}
    report = quality_from_log(path, "entities")
    assert (report["sample"]["student_vs_people"]["agree"], report["sample"]["student_vs_people"]["n"]) == (2, 2)
    assert (report["sample"]["teacher_vs_people"]["agree"], report["sample"]["teacher_vs_people"]["n"]) == (1, 2)
    assert (report["all"]["student_vs_people"]["agree"], report["all"]["student_vs_people"]["n"]) == (2, 3)
    assert (report["all"]["teacher_vs_people"]["agree"], report["all"]["teacher_vs_people"]["n"]) == (1, 3)
    assert (report["sample"]["student_vs_teacher"]["agree"], report["sample"]["student_vs_teacher"]["n"]) == (1, 2)


def test_an_older_feedback_table_gets_the_published_column_and_no_log_is_no_feedback(tmp_path):
    assert read_judged(tmp_path / "absent.sqlite3") == []
    path = tmp_path / "old.sqlite3"
    with TrainingLog(path):
        pass
    with sqlite3.connect(path) as conn:  # as the first feedback release wrote it
        conn.execute("ALTER TABLE feedback DROP COLUMN published")
    assert read_judged(path) == []  # read-only, unmigrated: still readable
    with TrainingLog(path) as log:
        assert "published" in {r[1] for r in log._read("PRAGMA table_info(feedback)")}


def test_gauges_carry_each_figure_and_only_the_top_corrections():
    metrics = ServiceMetrics()
    items = (judged(8, people="cards", student="cards", teacher="cards", in_sample=True)
             + judged(2, people="cards", student="payments", teacher="cards", in_sample=True))
    metrics.set_quality(measure(items))
    value = metrics.registry.get_sample_value
    labels = {"measure": "student_vs_people", "scope": "sample"}
    assert value("triage_agreement", labels) == pytest.approx(0.8)
    assert value("triage_agreement_low", labels) == pytest.approx(0.4902, abs=1e-4)
    assert value("triage_agreement_high", labels) == pytest.approx(0.9433, abs=1e-4)
    assert value("triage_agreement_samples", labels) == 10
    assert value("triage_human_corrections", {"who": "student", "field": "team", "label": "cards",
                                              "said": "payments"}) == 2
    metrics.set_quality(measure([]))  # the corrections are replaced, an empty figure is NaN
    assert math.isnan(value("triage_agreement", labels))
    assert value("triage_human_corrections", {"who": "student", "field": "team", "label": "cards",
                                              "said": "payments"}) is None
