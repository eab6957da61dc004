"""Small aiokafka helpers for producers and readers outside the service (CLI, demo, tests)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence


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
