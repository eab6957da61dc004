"""The teacher worker's Kafka side: escalations topic -> `EscalationResolver` -> results topic.

Its own consumer group (`TRIAGE_TEACHER_CONSUMER_GROUP`), so it scales on its own lag, in its
own Deployment (`triage serve --role teacher`) or inside the student's process (`--role all`,
the default on a laptop and in the demo).

Unlike the student consumer, it does not work batch by batch: a teacher call takes a second or,
during an outage, minutes, and one slow answer must not hold the others. Every record becomes
a task at once; offsets are committed per partition up to the lowest record still in flight
(`OffsetTracker`), so a crash re-delivers, never skips. At most `teacher_max_waiting` records
are held: past it the partitions are paused (the rest waits in Kafka; lag grows, the alert
fires) and resumed when there is room again.

Rebalances (`_Rebalance`): a revoke commits the finished prefix and suspends the partition;
its tasks run on. The assignment that follows keeps the partitions handed straight back (their
re-read records are skipped while the first copy is in flight: one teacher call per record)
and cancels the tasks of the others, whose new owner redoes them from the committed position.
A record the consumer handed out before the rebalance but this worker sees after it is
dropped (`_current`): it comes again from the new fetch position.

A record whose handling keeps failing for a reason of its own (not the broker or the disk
being unavailable) is dead-lettered after `RECORD_MAX_ATTEMPTS` (`escalation_failed`), so it
cannot pin its partition's commit or loop forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator

from aiokafka import ConsumerRebalanceListener
from faststream.kafka.annotations import KafkaMessage
from pydantic import ValidationError

from schemas.classification import Classification
from schemas.escalation import Escalation
from services.stream.kafka_io import group_batch_options, report_lag
from services.stream.offsets import OffsetTracker
from services.stream.publisher import HEADERS
from services.teacher.worker import EscalationResolver, TeacherSlots

log = logging.getLogger(__name__)

COMMIT_EVERY_S = 0.5
# Attempts of one record whose failure is its own (a bug, a value the schemas refuse, a record
# the producer refuses) before it is dead-lettered; unavailability is retried without a count.
RECORD_MAX_ATTEMPTS = 4
NO_TEACHER = "none configured — escalations are published unverified and nothing is labelled"


class TeacherWorker:
    def __init__(self, broker: Any, settings: Any, task: Any, metrics: Any, *, replica_id: str,
                 teacher: Any | None = None, training_log: Any | None = None, router: Any | None = None,
                 drift: Any | None = None) -> None:
        self.broker, self.settings, self.task, self.metrics = broker, settings, task, metrics
        self.router = router  # a router task: forwards each ticket after its first answer
        self.drift = drift  # services.stream.drift.DriftTracker, fed each teacher answer
        self.replica_id = replica_id
        self._injected = {"teacher": teacher, "training_log": training_log}
        self.tracker = OffsetTracker()
        self.resolver: EscalationResolver | None = None
        self._tasks: dict[asyncio.Task[None], Any] = {}  # task -> its record's partition
        self.retry_base_s = 0.5  # a failed record's backoff: base * 2^n, at most 30 s
        self._paused = False
        self._stopping = False
        # Manual commits: explicit per-partition offsets (`_commit`), never "all fetched".
        self.subscriber = broker.subscriber(
            settings.escalations_topic, group_id=settings.teacher_consumer_group,
            listener=_Rebalance(self), **group_batch_options(settings))
        self.subscriber(self._handle_batch)

    @property
    def teacher(self) -> Any:
        return self.resolver.teacher if self.resolver else None

    @property
    def training_log(self) -> Any:
        return self.resolver.training_log if self.resolver else None

    # ---- lifecycle --------------------------------------------------------------------------
    @asynccontextmanager
    async def resources(self) -> AsyncIterator[TeacherWorker]:
        s = self.settings
        async with AsyncExitStack() as stack:
            training_log = self._injected["training_log"]
            if training_log is None:
                from services.teacher.training_log import TrainingLog

                training_log = TrainingLog(s.training_log_path)
                stack.callback(training_log.close)
            teacher = self._injected["teacher"]
            if teacher is None and s.teacher_base_url:
                from services.teacher.client import build_teacher

                teacher = build_teacher(s, self.task, self.metrics)
                stack.push_async_callback(teacher.aclose)
            if teacher is None:  # legitimate (student only), but never silent: a log line and /readyz
                log.warning("teacher: %s (set TRIAGE_TEACHER_BASE_URL to ask one)", NO_TEACHER)
                self.metrics.note_readiness(f"teacher: {NO_TEACHER}")
            self.resolver = EscalationResolver(
                teacher=teacher, training_log=training_log, publish=self._publish_result,
                deadline_s=s.escalation_deadline_s,
                slots=TeacherSlots(s.teacher_concurrency, max(1, s.teacher_concurrency // 4)),
                metrics=self.metrics, retry_max_s=s.teacher_retry_max_s,
                router=self.router, send_forward=self._send_forward, drift=self.drift,
            )
            upkeep = asyncio.create_task(self._upkeep(), name="teacher-lane-upkeep")
            try:
                yield self
            finally:
                upkeep.cancel()
                await self._cancel_all()

    async def stop(self) -> None:
        """Before the consumer closes: stop taking records, commit what is finished."""
        self._stopping = True
        await self._cancel_all()
        with contextlib.suppress(Exception):
            await self._commit()

    async def _cancel_all(self) -> None:
        await self._cancel(list(self._tasks), "the worker stops")

    async def _cancel(self, tasks: list[asyncio.Task[None]], why: str) -> None:
        """Cancel and wait; one log line with the teacher calls in progress (the calls a new
        owner may pay for again)."""
        if not tasks:
            return
        calls = self.resolver.slots.busy("escalation") + self.resolver.slots.busy("audit") if self.resolver else 0
        log.info("teacher lane: cancelled %d escalations (%s; %d teacher calls in progress)",
                 len(tasks), why, min(calls, len(tasks)))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # ---- records in -------------------------------------------------------------------------
    async def _handle_batch(self, msg: KafkaMessage) -> None:
        from aiokafka import TopicPartition

        raw = msg.raw_message if isinstance(msg.raw_message, tuple) else (msg.raw_message,)
        by_partition: dict[Any, list[Any]] = {}
        for record in raw:
            by_partition.setdefault(TopicPartition(record.topic, record.partition), []).append(record)
        current = {tp: await self._current(tp) for tp in by_partition}
        # No await from here on: a rebalance cannot slip between the ownership check and the add.
        for partition, records in by_partition.items():
            for record in records:
                if self._stopping:
                    return
                if record.offset >= current[partition]:
                    continue  # handed out before a rebalance: it comes again from the new position
                epoch = self.tracker.add(partition, record.offset)
                if epoch is None:
                    continue  # not ours now, or a re-read while its first copy is in flight/done here
                task = asyncio.create_task(self._handle_record(record, partition, epoch))
                self._tasks[task] = partition
                task.add_done_callback(self._forget_task)
        self.metrics.set_escalations_waiting(self.tracker.inflight())
        self._pause_if_full()

    async def _current(self, partition: Any) -> int:
        """The consumer's position: records below it were handed out in its current fetch
        session; -1 (none current) when the partition is not assigned."""
        consumer = self.subscriber.consumer
        try:
            return await consumer.position(partition) if consumer is not None else -1
        except Exception:  # IllegalStateError: revoked meanwhile
            return -1

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    async def _handle_record(self, record: Any, partition: Any, epoch: int) -> None:
        assert self.resolver is not None
        request: Escalation | None = None
        try:
            request = Escalation.model_validate_json(record.value or b"")
        except ValidationError as exc:
            invalid = str(exc)[:1000]
        ticket = request.ticket_id if request is not None else None
        failures, waits, failed = 0, 0, ""
        while True:  # the record stays uncommitted until it has an acknowledged outcome
            try:
                if request is None:
                    await self._dead_letter(record, "invalid_escalation", invalid)
                elif failures >= RECORD_MAX_ATTEMPTS:
                    await self._dead_letter(record, "escalation_failed", failed, ticket_id=ticket)
                else:
                    await self.resolver.resolve(request)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                waits += 1
                counted = not _unavailable(exc)
                failures += counted
                failed = f"{type(exc).__name__}: {str(exc)[:900]} (after {failures} attempts)"
                log.error("escalation record (ticket %s) failed (%s: %s); attempt %d of %d%s", ticket,
                          type(exc).__name__, str(exc)[:300], failures, RECORD_MAX_ATTEMPTS,
                          "" if counted else " (unavailable: retried without a count)",
                          exc_info=exc if waits == 1 else None,
                          extra={"topic": record.topic, "partition": record.partition, "offset": record.offset})
                await asyncio.sleep(min(30.0, self.retry_base_s * 2 ** min(waits - 1, 6)))
        self.tracker.done(partition, record.offset, epoch)
        self.metrics.set_escalations_waiting(self.tracker.inflight())

    async def _publish_result(self, result: Classification) -> None:
        await self._send(self.settings.results_topic, result.ticket_id.encode(), result.model_dump_json().encode())

    async def _send_forward(self, forward: Any) -> None:
        await self._send(forward.topic, forward.key, forward.payload)

    async def _send(self, topic: str, key: bytes | None, payload: bytes) -> None:
        headers = {**HEADERS, "triage-replica": self.replica_id}
        future = await self.broker.publish(payload, topic, key=key, headers=headers, no_confirm=True)
        await future  # acknowledged by the broker, or raises

    async def _dead_letter(self, record: Any, reason: str, detail: str, *, ticket_id: str | None = None) -> None:
        from schemas.dead_letter import DeadLetter

        log.warning("dead-lettered an escalation record: %s (%s)", reason, detail[:200],
                    extra={"topic": record.topic, "partition": record.partition, "offset": record.offset})
        envelope = DeadLetter.of_record(record, copy_limit=self.settings.dead_letter_copy_bytes,
                                        reason=reason, detail=detail, ticket_id=ticket_id)
        await self._send(self.settings.dead_letter_topic, record.key, envelope.model_dump_json().encode())
        self.metrics.dead_lettered(reason)

    # ---- offsets, backpressure, lag ----------------------------------------------------------
    def _pause_if_full(self) -> None:
        consumer = self.subscriber.consumer
        if consumer is None:
            return
        full = self.tracker.inflight() >= self.settings.teacher_max_waiting
        if full and not self._paused:
            log.warning("teacher worker holds %d escalations: pausing consumption (they wait in Kafka)",
                        self.tracker.inflight())
        if full:
            consumer.pause(*consumer.assignment())  # also pauses partitions assigned meanwhile
        elif self._paused:
            consumer.resume(*consumer.paused())
        self._paused = full

    async def _commit(self, only: Any = None) -> None:
        consumer = self.subscriber.consumer
        if consumer is None:
            return
        assigned = set(consumer.assignment()) if only is None else set(only)
        positions = {tp: pos for tp, pos in self.tracker.committable().items() if tp in assigned}
        if positions:
            await consumer.commit(positions)
            self.tracker.mark_committed(positions)

    async def _upkeep(self) -> None:
        reported: set[Any] = set()
        while True:
            await asyncio.sleep(COMMIT_EVERY_S)
            consumer = self.subscriber.consumer
            if consumer is None:
                continue
            try:
                await self._commit()
            except Exception as exc:  # a rebalance in progress: the next round commits
                log.info("commit deferred: %s", exc)
            self._pause_if_full()
            self.metrics.set_escalations_waiting(self.tracker.inflight())
            reported = await report_lag(consumer, self.metrics, reported)

    async def idle(self, timeout_s: float = 60.0) -> bool:
        """Wait until every escalation on the topic so far is answered and committed (tests,
        the demo); False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            consumer = self.subscriber.consumer
            assignment = list(consumer.assignment()) if consumer is not None else []
            if assignment and not self._tasks and not self.tracker.inflight():
                with contextlib.suppress(Exception):
                    ends = await consumer.end_offsets(assignment)
                    committed = [await consumer.committed(tp) or 0 for tp in assignment]
                    if all(c >= ends[tp] for tp, c in zip(assignment, committed)):
                        return True
            await asyncio.sleep(0.1)
        return False

    def assigned(self) -> int:
        consumer = self.subscriber.consumer
        return len(consumer.assignment()) if consumer is not None else 0

    def summary(self) -> dict[str, object]:
        return {**(self.resolver.summary() if self.resolver else {}), "waiting": self.tracker.inflight()}


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """aiokafka rebalance listener (see the module docstring): a revoke commits the finished
    prefix and suspends; the assignment keeps what came back and cancels the rest."""

    def __init__(self, worker: TeacherWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        with contextlib.suppress(Exception):
            await self.worker._commit(only=revoked)
        self.worker.tracker.revoke(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        w = self.worker
        consumer = w.subscriber.consumer
        positions = {}
        for tp in assigned:  # aiokafka refreshes committed offsets before calling this
            with contextlib.suppress(Exception):  # revoked again meanwhile: not ours
                positions[tp] = await consumer.position(tp)
        dropped = set(w.tracker.assign(positions))
        doomed = [task for task, tp in w._tasks.items() if tp in dropped]  # before any await
        kept = w.tracker.inflight(positions)  # handed straight back: their tasks run on
        log.info("teacher lane: assigned %d partitions; %d escalations in flight kept, %d on partitions "
                 "now elsewhere", len(positions), kept, len(doomed))
        w._pause_if_full()
        await w._cancel(doomed, "their partitions were assigned elsewhere")
        w.metrics.set_escalations_waiting(w.tracker.inflight())


def _unavailable(exc: BaseException) -> bool:
    """The broker or the disk is unavailable (retry as long as it takes), as opposed to a
    failure of this record's own (bounded, then dead-lettered)."""
    from aiokafka import errors

    if isinstance(exc, (OSError, TimeoutError, sqlite3.OperationalError, errors.KafkaTimeoutError)):
        return True
    return isinstance(exc, errors.KafkaError) and bool(getattr(exc, "retriable", False))
