"""People's feedback: validated against the task, joined to the ticket, stored in the training
log as a label that outranks the teacher's, held out where the row was, and one outcome per
record (services/teacher/feedback.py, the training log's `record_feedback`, trainer/dataset.py)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from schemas.task import TaskSpec
from schemas.training import TrainingExample, in_hash_share
from services.teacher.feedback import OUTCOMES, FeedbackDesk, load_feedback_file
from services.teacher.training_log import TrainingLog
from trainer.dataset import Row, build, dedup, rows_from_log, split_heldout

TASK = TaskSpec.model_validate({
    "name": "desk", "instructions": "Route the ticket and copy the countries.",
    "fields": [
        {"name": "team", "description": "Who handles it.", "labels": ["cards", "payments", "account"]},
        {"type": "entities", "name": "entities", "description": "Countries.",
         "entity_types": [{"name": "country", "description": "A country."}]},
    ],
})
EVAL_SHARE = 0.05


def teacher_row(text: str, team: str, source: str = "live", ticket_id: str = "T-1") -> TrainingExample:
    return TrainingExample(text=text, labels={"team": team, "entities": []}, teacher_model="gpt",
                           prompt_hash="p", source=source, ticket_id=ticket_id)


def feedback(ticket_id: str, **values) -> bytes:
    return json.dumps({"ticket_id": ticket_id, **values}).encode()


@pytest.fixture
def log(tmp_path):
    with TrainingLog(tmp_path / "log.sqlite3") as training_log:
        yield training_log


@pytest.fixture
def desk(log):
    return FeedbackDesk(TASK, log, eval_share=EVAL_SHARE)


def test_a_correction_outranks_the_teacher_and_keeps_the_row_held_out(log, desk):
    log.append([teacher_row("my card never came from Spain", "payments", source="sample", ticket_id="T-1")])
    before = log.version()
    verdict = desk.receive(feedback("T-1", fields={"team": "cards"}, author="agent-7"))
    assert verdict.outcome == "corrected" and not verdict.refused
    assert log.version() > before  # the trainer sees that the data changed
    row = log.answer_for("my card never came from Spain")
    assert row.labels == {"team": "cards", "entities": []} and row.labelled_by == "human"
    assert row.source == "sample"  # still the evaluation sample: held out, and now the gold
    rows, _ = rows_from_log(log.path)
    trainable, heldout = split_heldout(rows)
    assert [r.labels["team"] for r in heldout] == ["cards"] and not trainable
    # what the teacher said is kept beside it, for measuring the teacher against people
    replaced = log._read("SELECT replaced, author, outcome FROM feedback")
    assert [(json.loads(r[0]), r[1], r[2]) for r in replaced] == [({"team": "payments"}, "agent-7", "corrected")]


def test_a_human_label_trains_instead_of_the_teachers(log, desk):
    texts = [f"ticket number {i} about a card" for i in range(40)]
    log.append([teacher_row(t, "payments", ticket_id=f"T-{i}") for i, t in enumerate(texts)])
    assert desk.receive(feedback("T-3", fields={"team": "cards"})).outcome == "corrected"
    rows, version = rows_from_log(log.path)
    data = build(rows, TASK, val_fraction=0.0, data_version=version, heldout_fraction=0.2)
    by_text = {r.text: r for r in data.train}
    assert by_text[texts[3]].labels["team"] == "cards" and by_text[texts[3]].labelled_by == "human"
    assert all(by_text[t].labels["team"] == "payments" for t in texts if t != texts[3] and t in by_text)


def test_dedup_prefers_a_person_over_the_teacher_and_keeps_the_first_rows_side():
    teacher = Row("Card not here", {"team": "payments"}, "sample", "teacher")
    human = Row("card not here!", {"team": "cards"}, "feedback", "human")
    system = Row("CARD NOT HERE", {"team": "account"}, "feedback", "system")
    [kept] = dedup([teacher, system, human])
    assert kept.labels == {"team": "cards"} and kept.labelled_by == "human"
    assert kept.source == "sample"  # held out as the teacher's row was
    assert dedup([human, teacher])[0].labels == {"team": "cards"}


def test_confirmations_redeliveries_and_a_system_under_a_person(log, desk):
    log.append([teacher_row("where is my card", "cards", ticket_id="T-9")])
    record = feedback("T-9", fields={"team": "cards"}, at="2026-03-01T10:00:00Z")
    assert desk.receive(record).outcome == "confirmed"
    version = log.version()
    assert desk.receive(record).outcome == "confirmed"  # a re-delivery: stored once
    assert log.version() == version and log._read("SELECT COUNT(*) FROM feedback")[0][0] == 1
    assert log.answer_for("where is my card").labelled_by == "human"
    assert desk.receive(feedback("T-9", fields={"team": "account"}, source="system")).outcome == "outranked"
    assert log.answer_for("where is my card").labels["team"] == "cards"
    # a teacher answer arriving later keeps the person's label (the difference is a conflict)
    log.append([teacher_row("where is my card", "payments", ticket_id="T-10")])
    assert log.answer_for("where is my card").labels["team"] == "cards" and log.stats()["conflicts"] == 1


def test_bad_feedback_is_refused_with_a_reason(log, desk):
    log.append([teacher_row("I moved to France", "account", ticket_id="T-5")])
    cases = {
        b"{not json": "not_json",
        feedback("T-5"): "invalid_feedback",  # says nothing
        feedback("T-5", fields={"team": "cards"}, colour="red"): "invalid_feedback",
        feedback("T-404", fields={"team": "cards"}): "unknown_ticket",
        feedback("T-5", fields={"team": "mortgages"}): "unknown_label",
        feedback("T-5", fields={"urgency": "high"}): "unknown_field",
        feedback("T-5", entities=[{"type": "country", "text": "Germany"}]): "invalid_entities",
        feedback("T-5", entities=[{"type": "city", "text": "France"}]): "invalid_entities",
    }
    version = log.version()
    for value, reason in cases.items():
        verdict = desk.receive(value)
        assert verdict.outcome == reason and verdict.refused, value
        assert verdict.outcome in OUTCOMES and verdict.detail
    assert log.version() == version  # nothing refused was stored
    assert desk.receive(feedback("T-5", entities=[{"type": "country", "text": "France"}])).outcome == "corrected"
    assert log.answer_for("I moved to France").labels["entities"] == [{"type": "country", "text": "France"}]


def test_a_ticket_the_log_lacks_needs_its_text_and_keeps_the_samples_rule(log, desk):
    texts = [f"lost card number {i}" for i in range(200)]
    for i, text in enumerate(texts):
        assert desk.receive(feedback(f"S-{i}", fields={"team": "cards"}, text=text)).outcome == "added"
    sources = {e.text: e.source for e in log.examples()}
    for text in texts:  # in the evaluation sample's share: held out (gold), else it trains
        assert sources[text] == ("sample" if in_hash_share(text, "sample", EVAL_SHARE) else "feedback")
    assert "sample" in sources.values() and "feedback" in sources.values()
    assert log.ticket_text("S-1") == texts[1]  # and it is known by its id from now on


def test_a_file_of_corrections_goes_through_the_same_desk(log, desk, tmp_path):
    log.append([teacher_row("card stuck in the ATM", "payments", ticket_id="T-1")])
    path = tmp_path / "corrections.tsv"
    path.write_text("ticket_id\ttext\tteam\tauthor\n"
                    "T-1\t\tcards\tana\n"
                    "\ta brand new complaint\taccount\tana\n"
                    "T-2\t\tcards\tana\n"
                    "T-1\t\tmortgages\tana\n", encoding="utf-8")
    report = load_feedback_file(desk, path)
    assert report["stored"] == {"corrected": 1, "added": 1}
    assert report["refused"] == {"unknown_ticket": 1, "unknown_label": 1}
    assert [r["line"] for r in report["first_refusals"]] == [4, 5]
    assert log.answer_for("a brand new complaint").labels == {"team": "account"}



def test_a_file_can_quote_the_answer_it_corrects(log, desk, tmp_path):
    """The TSV's `published_route` / `published_<field>` reach the log like the topic's
    `published`: what lets a correction count against the student's accepted answer."""
    log.append([teacher_row("card stuck in the ATM", "payments", ticket_id="T-1")])
    path = tmp_path / "corrections.tsv"
    path.write_text("ticket_id\ttext\tteam\tpublished_route\tpublished_team\n"
                    "T-1\t\tcards\tteacher\tpayments\n"
                    "T-9\tmy card was eaten\tcards\tstudent\taccount\n"
                    "T-8\tanother card question\tcards\t\taccount\n", encoding="utf-8")
    report = load_feedback_file(desk, path)
    assert report["stored"] == {"corrected": 1, "added": 1}
    assert report["refused"] == {"invalid_feedback": 1}  # a quoted answer without its route
    quoted = dict(log._read("SELECT ticket_id, published FROM feedback"))
    assert json.loads(quoted["T-9"]) == {"route": "student", "fields": {"team": "account"}}
    assert json.loads(quoted["T-1"])["route"] == "teacher"

def test_a_log_from_before_feedback_gets_the_column(tmp_path):
    path = tmp_path / "old.sqlite3"
    with TrainingLog(path) as log:
        log.append([teacher_row("old ticket", "cards")])
    conn = sqlite3.connect(path)  # as an older release wrote it: no labelled_by column
    for table in ("examples", "superseded"):
        conn.execute(f"ALTER TABLE {table} DROP COLUMN labelled_by")
    conn.commit()
    conn.close()
    with TrainingLog(path) as log:
        assert log.answer_for("old ticket").labelled_by == "teacher"
        assert FeedbackDesk(TASK, log, eval_share=EVAL_SHARE).receive(
            feedback("T-1", fields={"team": "account"})).outcome == "corrected"
