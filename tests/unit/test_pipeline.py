"""TicketPipeline with in-memory fakes: routing decisions, one outcome per record."""

import json

import pytest

from schemas.classification import Classification, FieldPrediction
from services.student.engine import StudentPrediction
from services.stream.pipeline import EscalationConfig, InboundRecord, TicketPipeline
from services.teacher.backlog import drain_backlog
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
    labelled = lambda tid, text, answer: pipeline.log_example(text, answer, source="backlog", ticket_id=tid)  # noqa: E731
    assert (await drain_backlog(pipeline.teacher, training_log, on_labelled=labelled)).labelled == 1
    assert training_log.pending_count() == 0
    assert [e.source for e in training_log.examples()] == ["backlog"]


async def test_uncalibrated_student_escalates_everything(training_log):
    pipeline = TicketPipeline(classifier=FakeClassifier({"x": 0.99}), teacher=FakeTeacher(), training_log=training_log)
    [outcome] = await pipeline.process([record(0, ticket(0, "x"))])
    assert Classification.model_validate_json(outcome.payload).route.value == "teacher"


# ---- issue 9: no input stops the stream -------------------------------------------------------
from schemas.dead_letter import DeadLetter  # noqa: E402
from services.student.engine import LIVE, EngineRejection  # noqa: E402


class ScriptedClassifier:
    """Per-text outcomes: a float confidence, 'reject', or 'truncated:<confidence>'."""

    model_name = "fake-student"

    def __init__(self, script, live=None, swap_to=None):
        self.script, self.live_adapter, self.swap_to = script, live, swap_to
        self.adapters_used = []

    async def classify(self, texts, *, adapter=LIVE):
        self.adapters_used.append(adapter)
        if self.swap_to is not None:  # a hot-swap lands while the engine runs
            self.live_adapter = self.swap_to
        out = []
        for t in texts:
            step = self.script[t]
            if step == "reject":
                out.append(EngineRejection("engine_rejected", "VLLMValidationError: too long"))
                continue
            truncated = isinstance(step, str) and step.startswith("truncated:")
            conf = float(step.split(":")[1]) if truncated else step
            out.append(StudentPrediction(
                fields={"intent": FieldPrediction(label="card_arrival", confidence=conf)},
                distribution={"intent": [conf]}, adapter_id=getattr(adapter, "adapter_id", None),
                truncated=truncated))
        return out


class Ref:
    def __init__(self, adapter_id, threshold):
        self.adapter_id, self.threshold = adapter_id, threshold


async def test_an_engine_rejection_is_that_tickets_dead_letter_not_the_batchs(training_log):
    pipeline = TicketPipeline(classifier=ScriptedClassifier({"a": 0.9, "bad": "reject", "c": 0.9}),
                              teacher=FakeTeacher(), training_log=training_log,
                              escalation=EscalationConfig(threshold_override=0.5))
    outcomes = await pipeline.process([record(i, ticket(i, t)) for i, t in enumerate(["a", "bad", "c"])])
    assert [o.kind for o in outcomes] == ["result", "dead_letter", "result"]
    dead = DeadLetter.model_validate_json(outcomes[1].payload)
    assert dead.reason == "engine_rejected" and dead.ticket_id == "t1" and dead.offset == 1
    assert dead.original() == ticket(1, "bad") and not dead.original_truncated
    assert pipeline.stats.dead_letter == {"engine_rejected": 1}


async def test_truncated_predictions_are_flagged_in_the_result(training_log):
    pipeline = TicketPipeline(classifier=ScriptedClassifier({"long": "truncated:0.9"}),
                              escalation=EscalationConfig(threshold_override=0.5))
    [outcome] = await pipeline.process([record(0, ticket(0, "long"))])
    result = Classification.model_validate_json(outcome.payload)
    assert result.truncated and result.route.value == "student"
    assert pipeline.summary()["truncated"] == 1


async def test_threshold_is_the_pinned_adapters_not_the_one_swapped_in_meanwhile():
    """Base model (uncalibrated: threshold 1.0) classifies; a calibrated adapter (0.2) is
    swapped in while the engine runs. The batch must be judged by the base model's rule."""
    clf = ScriptedClassifier({"x": 0.6}, live=None, swap_to=Ref("a-0000000000000001", 0.2))
    pipeline = TicketPipeline(classifier=clf, teacher=None)
    [outcome] = await pipeline.process([record(0, ticket(0, "x"))])
    result = Classification.model_validate_json(outcome.payload)
    assert clf.adapters_used == [None]  # pinned explicitly, not LIVE
    assert result.route.value == "unverified"  # escalated (no teacher here), not "student"
    assert result.adapter_id is None


def test_dead_letter_records_are_bounded_but_keep_size_and_hash():
    import hashlib

    pipeline = TicketPipeline(classifier=ScriptedClassifier({}), max_message_bytes=1000,
                              dead_letter_copy_bytes=100)
    big = b"x" * 900_000
    [outcome] = asyncio_run(pipeline.process([record(0, big)]))
    dead = DeadLetter.model_validate_json(outcome.payload)
    assert dead.reason == "too_large" and dead.original_truncated
    assert dead.original_size == 900_000 and dead.original_sha256 == hashlib.sha256(big).hexdigest()
    assert dead.original() == big[:100]
    assert len(outcome.payload) < 2_000  # far below the producer's 1 MiB request limit


def asyncio_run(coro):
    import asyncio

    return asyncio.new_event_loop().run_until_complete(coro)


async def test_audits_are_bounded_in_flight():
    import asyncio

    class SlowTeacher(FakeTeacher):
        async def label(self, text):
            await asyncio.sleep(0.2)
            return await super().label(text)

    texts = [f"t{i}" for i in range(10)]
    pipeline = TicketPipeline(classifier=ScriptedClassifier({t: 0.99 for t in texts}), teacher=SlowTeacher(),
                              escalation=EscalationConfig(threshold_override=0.5, audit_rate=1.0),
                              max_inflight_audits=3)
    outcomes = await pipeline.process([record(i, ticket(i, t)) for i, t in enumerate(texts)])
    assert len(pipeline._audit_tasks) <= 3
    assert sum(Classification.model_validate_json(o.payload).audited for o in outcomes) == 3
    assert pipeline.summary()["audits_skipped"] == 7
    await pipeline.wait_for_audits()


async def test_training_log_writes_happen_off_the_event_loop(training_log, monkeypatch):
    import threading

    loop_thread = threading.get_ident()
    seen = []
    original = training_log.append

    def spy(examples):
        seen.append(threading.get_ident())
        return original(examples)

    monkeypatch.setattr(training_log, "append", spy)
    pipeline = TicketPipeline(classifier=ScriptedClassifier({"u": 0.1}), teacher=FakeTeacher(),
                              training_log=training_log, escalation=EscalationConfig(threshold_override=0.5))
    await pipeline.process([record(0, ticket(0, "u"))])
    assert seen and all(t != loop_thread for t in seen)
