"""Small aiokafka helpers: topic creation, the one producer helper, a topic reader.

Used by the CLI, the demo, benches and tests; the service itself publishes through FastStream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

if TYPE_CHECKING:
    from services.settings import Settings

log = logging.getLogger(__name__)


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
        max_records=settings.engine_max_batch,
        batch_timeout_ms=settings.batch_timeout_ms,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        fetch_max_wait_ms=settings.fetch_max_wait_ms,
        ack_policy=AckPolicy.MANUAL,
    )


class InFlightBatch:
    """Whether the student consumer is inside a batch (from receipt to commit)."""

    def __init__(self) -> None:
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def running(self) -> Any:
        self._idle.clear()
        try:
            yield
        finally:
            self._idle.set()

    async def finished(self, timeout_s: float) -> bool:
        """True once no batch is in flight; False if one still is after `timeout_s`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True


def commit_before_revoke(batch: InFlightBatch, timeout_s: float) -> Any:
    """A rebalance listener for the student consumer: a revoke waits (up to `timeout_s`) for
    the batch in flight to publish and commit. aiokafka calls it before rejoining, while the
    old assignment stands and heartbeats go on, so that commit lands. Without the wait the
    batch finished under the new assignment, its commit covered nothing, and its records came
    again from the last commit: answered twice (46 keys at the soak's kill -9)."""
    from aiokafka import ConsumerRebalanceListener

    class CommitBeforeRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
        async def on_partitions_revoked(self, revoked: Any) -> None:
            if not await batch.finished(timeout_s):
                log.warning("rebalance: the batch in flight did not finish within %.0f s; its tickets "
                            "will be answered again by whoever gets their partitions", timeout_s)

        async def on_partitions_assigned(self, assigned: Any) -> None:
            return None

    return CommitBeforeRevoke()


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


def reload_command(task: str | None, adapter_id: str | None) -> bytes:
    """The control-topic message that makes running replicas reload the registry's `current`
    adapter now (`TriageService._handle_control`); `task` None: every task."""
    return json.dumps({"action": "reload_adapter", "task": task, "adapter_id": adapter_id}).encode()


async def announce_reload(bootstrap_servers: str, control_topic: str, *, task: str | None,
                          adapter_id: str | None, timeout_s: float = 10.0) -> None:
    """Publish `reload_command` and wait for the broker's ack (at most `timeout_s`)."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all",
                                request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(producer.start(), timeout_s)
        await asyncio.wait_for(producer.send_and_wait(
            control_topic, reload_command(task, adapter_id), key=(task or "").encode(),
            headers=[("content-type", b"application/json")]), timeout_s)
    finally:
        await producer.stop()


def tell_replicas(settings: Settings, *, task: str | None, adapter_id: str | None,
                  timeout_s: float = 10.0) -> tuple[bool, str]:
    """After `current` moved (promote, rollback, distill): with Kafka configured, send the
    reload command so replicas swap now; else (or if the send fails) they pick the pointer up
    at their next registry poll. Returns (sent, a line for the user); never raises: the
    pointer has moved either way."""
    later = f"replicas pick it up within TRIAGE_REGISTRY_POLL_S ({settings.registry_poll_s:g} s)"
    if settings.embedded_broker:
        return False, f"{later} (TRIAGE_BOOTSTRAP_SERVERS is not set: no reload command sent)"
    try:
        asyncio.run(announce_reload(settings.bootstrap_servers, settings.control_topic, task=task,
                                    adapter_id=adapter_id, timeout_s=timeout_s))
    except Exception as exc:  # broker down: the registry poll still delivers the change
        return False, f"could not send reload_adapter on {settings.control_topic} ({exc or type(exc).__name__}); {later}"
    return True, f"reload_adapter sent on {settings.control_topic}: running replicas swap now"


def all_topics(settings: Settings) -> list[str]:
    """Every topic a replica reads or writes, in a stable order."""
    return list(plan_topics(settings))


@dataclass(frozen=True)
class TopicSpec:
    """How `triage serve --create-topics` creates one topic."""

    partitions: int
    replication: int = 1
    config: tuple[tuple[str, str], ...] = ()  # Kafka topic configs (name, value)


# The results topic is a changelog keyed by ticket id (the latest record wins: a teacher's
# correction replaces the unverified answer): compacted, every record kept a day first.
RESULTS_TOPIC_CONFIG = (("cleanup.policy", "compact"), ("min.compaction.lag.ms", "86400000"))
# Escalations wait here while the teacher is down: keep a week.
ESCALATIONS_TOPIC_CONFIG = (("retention.ms", "604800000"),)


def dead_letter_topic_config(settings: Settings) -> tuple[tuple[str, str], ...]:
    """Dead-letter records (and their bounded copies of the original) exist only here: the
    topic's retention is their retention policy (TRIAGE_DEAD_LETTER_RETENTION_DAYS, 30 by default)."""
    return (("retention.ms", str(int(settings.dead_letter_retention_days * 86_400_000))),)


def plan_topics(settings: Settings) -> dict[str, TopicSpec]:
    """One task's topics as the docs describe them (deploy/k8s/kafka-topics.yaml): data topics
    with `topic_partitions`, the results topic compacted, the control topic one partition (swap
    commands stay ordered, every replica reads all of it), all at `topic_replication`."""
    n, rf = settings.topic_partitions, settings.topic_replication
    roles = {
        settings.tickets_topic: TopicSpec(n, rf),
        settings.results_topic: TopicSpec(n, rf, RESULTS_TOPIC_CONFIG),
        settings.dead_letter_topic: TopicSpec(n, rf, dead_letter_topic_config(settings)),
        settings.control_topic: TopicSpec(1, rf),
        settings.escalations_topic: TopicSpec(n, rf, ESCALATIONS_TOPIC_CONFIG),
        settings.feedback_topic: TopicSpec(n, rf),
    }
    if len(roles) != 6:  # one name for two roles would give a topic two conflicting specs
        raise ValueError("the tickets, results, dead-letter, control, escalations and feedback topics must differ")
    return roles


def merge_plans(plans: Iterable[dict[str, TopicSpec]]) -> dict[str, TopicSpec]:
    """Several tasks' plans as one; a topic two tasks plan differently is an error."""
    merged: dict[str, TopicSpec] = {}
    for plan in plans:
        for topic, spec in plan.items():
            if merged.setdefault(topic, spec) != spec:
                raise ValueError(f"topic {topic!r} is planned twice, differently: {merged[topic]} vs {spec}")
    return merged


async def create_topics(bootstrap_servers: str, plan: dict[str, TopicSpec]) -> list[str]:
    """Create the plan's missing topics; returns those created. Idempotent: an existing topic
    is left as it is (a partition count that differs from the plan is logged, not changed:
    partitions can only be added, and that moves keys)."""
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError, for_code

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in plan if t not in existing]
        if missing:
            response = await admin.create_topics([
                NewTopic(name=t, num_partitions=plan[t].partitions, replication_factor=plan[t].replication,
                         topic_configs=dict(plan[t].config)) for t in missing])
            # Per-topic errors come back in the response, not as exceptions.
            for topic, code, *message in response.topic_errors:
                error = for_code(code)
                if code and error is not TopicAlreadyExistsError:  # already: another replica won the race
                    raise RuntimeError(f"creating topic {topic!r} ({plan[topic]}): {error.__name__}"
                                       f" {message[0] if message and message[0] else ''}".rstrip())
        present = [t for t in plan if t in existing]
        for described in await admin.describe_topics(present) if present else []:
            topic, partitions = described["topic"], len(described["partitions"])
            if partitions != plan[topic].partitions:
                log.warning("topic %s exists with %d partitions, planned %d: left as it is", topic,
                            partitions, plan[topic].partitions)
        return missing
    finally:
        await admin.close()


async def ensure_topics(bootstrap_servers: str, topics: Iterable[str], partitions: int) -> None:
    """Create missing topics, all alike (tests, benches); the service's topics: `create_topics`."""
    await create_topics(bootstrap_servers, {t: TopicSpec(partitions) for t in dict.fromkeys(topics)})
