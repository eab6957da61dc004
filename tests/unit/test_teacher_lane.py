"""The teacher lane's failure policy, without a broker: a record whose handling keeps failing
for a reason of its own is dead-lettered after bounded attempts (it used to be retried
forever, pinning its partition's commit); an unavailable broker is waited out instead. And the
concrete trigger, a label the router cannot carry, is refused where the router is loaded."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

from schemas.classification import Classification, FieldPrediction
from schemas.dead_letter import DeadLetter
from schemas.escalation import Escalation
from schemas.forwarding import Router
from schemas.task import TaskSpec
from services.settings import Settings
from services.stream import teacher_lane
from services.stream.app import TriageService

LONG = "x" * 201  # RouteHop.label allows 200 characters


@dataclass(frozen=True)
class Record:  # the fields of an aiokafka ConsumerRecord the lane reads
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def router_task() -> TaskSpec:
    return TaskSpec.model_validate({
        "name": "desk", "instructions": "Route the ticket.",
        "fields": [{"name": "desk", "description": "which desk", "labels": ["cards", LONG]}]})


def escalation(label: str) -> Escalation:
    student = Classification(ticket_id="T-1", fields={"desk": label}, confidence=0.1, route="unverified",
                             model="student", student={"desk": FieldPrediction(label=label, confidence=0.1)},
                             latency_ms=1.0, engine_ms=1.0)
    return Escalation(kind="escalation", ticket_id="T-1", text="where is my card", student_result=student,
                      ticket_time_ms=int(time.time() * 1000), ticket={"id": "T-1", "text": "where is my card"})


@pytest.fixture
def lane(tmp_path, monkeypatch):
    """A teacher-only service's worker (no teacher: escalations are answered `unverified` at once),
    its publishes captured instead of sent."""
    settings = Settings(_env_file=None, bootstrap_servers="127.0.0.1:9", metrics_port=0, role="teacher",
                        teacher_base_url="", registry_dir=tmp_path / "registry", data_dir=tmp_path / "data")
    worker = TriageService(settings).worker
    worker.retry_base_s = 0.001
    sent: list[tuple[str, bytes | None, bytes]] = []
    failures: list[BaseException] = []

    async def send(topic, key, payload):
        if failures:
            raise failures.pop(0)
        sent.append((topic, key, payload))

    monkeypatch.setattr(worker, "_send", send)
    return worker, sent, failures


async def handle(worker, request: Escalation):
    tp = TopicPartition(worker.settings.escalations_topic, 0)
    worker.tracker.assign({tp: 0})
    record = Record(tp.topic, 0, 0, b"T-1", request.model_dump_json().encode())
    epoch = worker.tracker.add(tp, 0)
    await asyncio.wait_for(worker._handle_record(record, tp, epoch), timeout=5)
    return tp, record


async def test_a_record_that_keeps_failing_is_dead_lettered_and_releases_its_partition(lane):
    worker, sent, _ = lane
    async with worker.resources():
        # What a router whose label is too long for RouteHop did: plan() raised on every attempt.
        worker.resolver.router = Router(task="desk", field="desk", targets={LONG: "cards"},
                                        topics={"cards": "cards.tickets"})
        tp, record = await handle(worker, escalation(LONG))
    assert [topic for topic, _, _ in sent] == [worker.settings.dead_letter_topic]
    letter = DeadLetter.model_validate_json(sent[0][2])
    assert letter.reason == "escalation_failed" and letter.ticket_id == "T-1"
    assert "ValidationError" in letter.detail and f"after {teacher_lane.RECORD_MAX_ATTEMPTS} attempts" in letter.detail
    assert (letter.source_topic, letter.partition, letter.offset) == (record.topic, 0, 0)
    assert letter.original() == record.value and letter.key_b64 == DeadLetter.encode(b"T-1")
    assert worker.tracker.committable() == {tp: 1}  # the partition's commit moves on


async def test_an_unavailable_broker_is_waited_out_not_dead_lettered(lane):
    worker, sent, failures = lane
    failures.extend(KafkaConnectionError("broker down") for _ in range(teacher_lane.RECORD_MAX_ATTEMPTS + 2))
    async with worker.resources():
        await handle(worker, escalation("cards"))
    assert not failures  # every failure was retried
    [(topic, key, payload)] = sent
    assert topic == worker.settings.results_topic and json.loads(payload)["route"] == "unverified"


def test_a_label_the_router_cannot_carry_is_refused_at_load():
    router = Router(task="desk", field="desk", targets={LONG: "cards", "cards": "cards"},
                    topics={"cards": "cards.tickets"})
    with pytest.raises(ValueError, match="200"):
        router.check(router_task())
    short = Router(task="desk", field="desk", targets={"cards": "cards"}, topics={"cards": "cards.tickets"})
    short.check(router_task())  # the field may hold the long label; only routed labels travel in a hop
