"""publish_outcomes: a record the producer refuses becomes that ticket's dead-letter; the rest
of the batch is published once, not again and again."""

import asyncio

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

from schemas.dead_letter import DeadLetter
from services.stream.pipeline import InboundRecord, Outcome, TicketPipeline
from services.stream.publisher import publish_outcomes


class FakeBroker:
    def __init__(self, refuse_over=None, down=False):
        self.refuse_over, self.down, self.sent = refuse_over, down, []

    async def publish(self, payload, topic, *, key, headers, no_confirm):
        if self.refuse_over is not None and len(payload) > self.refuse_over:
            raise MessageSizeTooLargeError("The message is 1200000 bytes when serialized")
        future = asyncio.get_running_loop().create_future()
        if self.down:
            future.set_exception(KafkaConnectionError("broker down"))
        else:
            self.sent.append((topic, key, payload, headers["triage-replica"]))
            future.set_result(None)
        return future


def outcome(i, size):
    record = InboundRecord(b"v" * 10, f"k{i}".encode(), "tickets", 0, i, 0.0)
    return Outcome("result", f"k{i}".encode(), b"r" * size, record, route="student", confidence=0.9)


def pipeline():
    class NoClassifier:
        live_adapter = None
        model_name = "none"

    return TicketPipeline(classifier=NoClassifier(), dead_letter_copy_bytes=5)


async def test_a_refused_record_becomes_its_own_dead_letter():
    broker = FakeBroker(refuse_over=1_000)
    outcomes = [outcome(0, 10), outcome(1, 5_000), outcome(2, 10)]
    published = await publish_outcomes(broker, outcomes, topics={"result": "res", "dead_letter": "dlq"},
                                       replica_id="r1", dead_letter=pipeline().dead_letter)
    assert [o.kind for o in published] == ["result", "dead_letter", "result"]
    assert [(t, k) for t, k, _, _ in broker.sent] == [("res", b"k0"), ("res", b"k2"), ("dlq", b"k1")]
    dead = DeadLetter.model_validate_json(broker.sent[2][2])
    assert dead.reason == "publish_rejected" and "1200000" in dead.detail and dead.offset == 1


async def test_a_broker_failure_fails_the_batch():
    with pytest.raises(KafkaConnectionError):
        await publish_outcomes(FakeBroker(down=True), [outcome(0, 10)],
                               topics={"result": "res", "dead_letter": "dlq"}, replica_id="r1", dead_letter=pipeline().dead_letter)
