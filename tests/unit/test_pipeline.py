"""TicketPipeline with in-memory fakes: routing decisions, one outcome per record."""

import json

import pytest

from schemas.classification import Classification, FieldPrediction
from services.student.engine import StudentPrediction
from services.stream.pipeline import EscalationConfig, InboundRecord, TicketPipeline
from services.teacher.client import TeacherAnswer, TeacherUnavailable
from services.teacher.training_log import TrainingLog


class FakeClassifier:
    model_name = "fake-student"
    live_adapter = None

    def __init__(self, confidences):
        self.confidences = confidences  # text -> confidence

    async def classify(self, texts, *, adapter=None):
        return [
            StudentPrediction(
                fields={"intent": FieldPrediction(label="card_arrival", confidence=self.confidences[t])},
                distribution={"intent": [self.confidences[t]]},
                adapter_id=None,
            )
            for t in texts
        ]

    async def use_adapter(self, adapter):
        self.live_adapter = adapter


class FakeTeacher:
    model = "fake-teacher"

    def __init__(self, fail=False):
        self.fail, self.asked = fail, []

    async def label(self, text):
        self.asked.append(text)
        if self.fail:
            raise TeacherUnavailable("error", "down")
        return TeacherAnswer({"intent": "lost_or_stolen_card"}, self.model, "ph", 10, 2, 0.001, 0.01)


def record(i, value):
    return InboundRecord(value=value, key=str(i).encode(), topic="t", partition=0, offset=i, received_at=0.0)


def ticket(i, text):
    return json.dumps({"id": f"t{i}", "text": text}).encode()


@pytest.fixture
def training_log(tmp_path):
    with TrainingLog(tmp_path / "log.sqlite3") as log:
        yield log


async def test_routes_by_threshold_and_keeps_record_order(training_log):
    teacher = FakeTeacher()
    pipeline = TicketPipeline(
        classifier=FakeClassifier({"sure": 0.9, "unsure": 0.2}), teacher=teacher,
        training_log=training_log, escalation=EscalationConfig(threshold_override=0.5),
    )
    records = [record(0, ticket(0, "sure")), record(1, b"not json"), record(2, ticket(2, "unsure"))]
    outcomes = await pipeline.process(records)
    assert [o.kind for o in outcomes] == ["result", "dead_letter", "result"]
    assert [o.record.offset for o in outcomes] == [0, 1, 2]
    confident = Classification.model_validate_json(outcomes[0].payload)
    escalated = Classification.model_validate_json(outcomes[2].payload)
    assert confident.route.value == "student" and confident.fields["intent"] == "card_arrival"
    assert escalated.route.value == "teacher" and escalated.fields["intent"] == "lost_or_stolen_card"
    assert escalated.student["intent"].label == "card_arrival"  # both answers kept
    assert teacher.asked == ["unsure"]
    assert [e.text for e in training_log.examples()] == ["unsure"]


async def test_teacher_down_publishes_unverified_and_keeps_ticket(training_log):
    pipeline = TicketPipeline(
        classifier=FakeClassifier({"unsure": 0.1}), teacher=FakeTeacher(fail=True),
        training_log=training_log, escalation=EscalationConfig(threshold_override=0.5),
    )
    [outcome] = await pipeline.process([record(0, ticket(0, "unsure"))])
    result = Classification.model_validate_json(outcome.payload)
    assert result.route.value == "unverified" and result.fields["intent"] == "card_arrival"
    assert training_log.pending_count() == 1
    pipeline.teacher.fail = False
    assert await pipeline.drain_backlog() == 1
    assert training_log.pending_count() == 0
    assert [e.source for e in training_log.examples()] == ["backlog"]


async def test_uncalibrated_student_escalates_everything(training_log):
    pipeline = TicketPipeline(classifier=FakeClassifier({"x": 0.99}), teacher=FakeTeacher(), training_log=training_log)
    [outcome] = await pipeline.process([record(0, ticket(0, "x"))])
    assert Classification.model_validate_json(outcome.payload).route.value == "teacher"
