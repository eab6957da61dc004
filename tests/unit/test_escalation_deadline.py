"""The 'answer within the deadline' promise runs from the ticket's time, clamped to when it was
consumed: a producer clock ahead (or a made-up CreateTime) must not postpone it."""

import asyncio
import json
import time

from schemas.classification import Classification, FieldPrediction
from schemas.escalation import Escalation
from services.stream.pipeline import EscalationConfig, InboundRecord, TicketPipeline
from services.student.engine import StudentPrediction
from services.teacher.worker import EscalationResolver, TeacherSlots

HOUR_MS = 3_600_000


class UnsureStudent:
    model_name, live_adapter, task = "fake-student", None, None

    async def classify(self, texts, *, adapter=None):
        return [StudentPrediction(fields={"intent": FieldPrediction(label="card_arrival", confidence=0.1)},
                                  distribution={"intent": [0.1]}, adapter_id=None) for _ in texts]


async def escalation_time(timestamp_ms):
    wall, mono = 1_000.0, 50.0  # the batch arrived at wall-clock 1,000 s (monotonic 50 s)
    pipeline = TicketPipeline(classifier=UnsureStudent(), escalation=EscalationConfig(threshold_override=0.5),
                              clock=lambda: mono, wall_clock=lambda: wall)
    value = json.dumps({"id": "t1", "text": "where is my card"}).encode()
    record = InboundRecord(value=value, key=b"t1", topic="t", partition=0, offset=0, received_at=mono,
                           timestamp_ms=timestamp_ms)
    [outcome] = await pipeline.process([record])
    return Escalation.model_validate_json(outcome.payload).ticket_time_ms


async def test_a_create_time_in_the_future_counts_from_consumption():
    assert await escalation_time(1_000_000 + HOUR_MS) == 1_000_000
    assert await escalation_time(999_000) == 999_000  # a past CreateTime is the ticket's time
    assert await escalation_time(None) == 1_000_000  # none: when the batch arrived


class DownTeacher:
    async def label(self, text, fields=None):
        await asyncio.sleep(3600)  # never answers within the test


async def test_the_worker_publishes_unverified_at_the_deadline_whatever_the_ticket_time_says():
    student = Classification(ticket_id="T-1", fields={"intent": "card_arrival"}, confidence=0.1,
                             route="unverified", model="student",
                             student={"intent": FieldPrediction(label="card_arrival", confidence=0.1)},
                             latency_ms=1.0, engine_ms=1.0)
    # An escalation written by an older producer (or another host) an hour ahead of this clock.
    request = Escalation(kind="escalation", ticket_id="T-1", text="where is my card", student_result=student,
                         ticket_time_ms=int(time.time() * 1000) + HOUR_MS)
    published: list[Classification] = []

    async def publish(result):
        published.append(result)

    resolver = EscalationResolver(teacher=DownTeacher(), training_log=None, publish=publish, deadline_s=0.3,
                                  slots=TeacherSlots(2, 0))
    task = asyncio.create_task(resolver.resolve(request))
    try:
        started = time.monotonic()
        while not published and time.monotonic() - started < 3.0:
            await asyncio.sleep(0.02)
        assert [r.route.value for r in published] == ["unverified"]
        assert time.monotonic() - started < 1.5  # about deadline_s, not an hour
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
