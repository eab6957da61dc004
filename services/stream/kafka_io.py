"""Small aiokafka helpers: topic creation, the one producer helper, a topic reader.

Used by the CLI, the demo, benches and tests; the service itself publishes through FastStream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

if TYPE_CHECKING:
    from services.settings import Settings


@dataclass(frozen=True)
class Received:
    key: bytes | None
    value: bytes
    partition: int
    offset: int
    received_at: float  # time.time()

    def json(self) -> Any:
        return json.loads(self.value)


async def produce(
    bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes]], *, chunk: int = 500
) -> dict[bytes | None, float]:
    """Send (key, value) pairs, wait for every broker ack; returns key -> send time."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    await producer.start()
    sent_at: dict[bytes | None, float] = {}
    try:
        batch: list[asyncio.Future[Any]] = []
        for key, value in messages:
            sent_at[key] = time.time()
            batch.append(await producer.send(topic, value=value, key=key))
            if len(batch) >= chunk:
                await asyncio.gather(*batch)
                batch.clear()
        await asyncio.gather(*batch)
    finally:
        await producer.stop()
    return sent_at


def ticket_message(ticket_id: str, text: str, **extra: Any) -> tuple[bytes, bytes]:
    payload = {"id": ticket_id, "text": text, **extra}
    return ticket_id.encode(), json.dumps(payload).encode()


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    until: Callable[[Sequence[Received]], bool],
    timeout_s: float = 120.0,
    on_message: Callable[[Received], None] | None = None,
) -> list[Received]:
    """Read a topic from the beginning (no group, no commits) until `until(received)` or timeout."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    received: list[Received] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not until(received) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=1000)
            now = time.time()
            for records in batches.values():
                for r in records:
                    item = Received(r.key, r.value, r.partition, r.offset, now)
                    received.append(item)
                    if on_message:
                        on_message(item)
    finally:
        await consumer.stop()
    return received


def unique_keys(received: Sequence[Received]) -> set[bytes | None]:
    return {r.key for r in received}


def group_batch_options(settings: Settings) -> dict[str, Any]:
    """FastStream subscriber options shared by the student consumer and the teacher worker:
    batches, manual commits (neither commits what it merely fetched), the group timings."""
    from faststream import AckPolicy

    return dict(
        batch=True,
        max_records=settings.max_batch,
        batch_timeout_ms=settings.batch_timeout_ms,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        ack_policy=AckPolicy.MANUAL,
    )


async def report_lag(consumer: Any, metrics: Any, reported: set[Any]) -> set[Any]:
    """`triage_consumer_lag` for the consumer's assigned partitions (log end - position); the
    series of partitions no longer assigned (`reported` - now) are dropped: after a rebalance
    they are another consumer's to report. Returns the assignment (the next `reported`)."""
    assignment = set(consumer.assignment()) if consumer is not None else set()
    for tp in reported - assignment:
        metrics.remove_lag(tp.topic, tp.partition)
    for tp in assignment:
        high = consumer.highwater(tp)
        if high is not None:
            with contextlib.suppress(Exception):
                metrics.set_lag(tp.topic, tp.partition, high - await consumer.position(tp))
    return assignment


def all_topics(settings: Settings) -> list[str]:
    """Every topic a replica reads or writes, in a stable order."""
    return [settings.tickets_topic, settings.results_topic, settings.dead_letter_topic, settings.control_topic,
            settings.escalations_topic]


async def ensure_topics(bootstrap_servers: str, topics: Iterable[str], partitions: int) -> None:
    """Create missing topics (idempotent). Real Kafka deployments usually pre-create them."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in dict.fromkeys(topics) if t not in existing]
        if missing:
            try:
                await admin.create_topics(
                    [NewTopic(name=t, num_partitions=partitions, replication_factor=1) for t in missing]
                )
            except TopicAlreadyExistsError:
                pass  # another replica won the race
    finally:
        await admin.close()
