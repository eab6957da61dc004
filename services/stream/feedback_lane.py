"""The feedback topic's consumer: people's corrections -> `FeedbackDesk` -> the training log.

Its own consumer group (`TRIAGE_FEEDBACK_CONSUMER_GROUP`), run beside the teacher worker
(`--role teacher` and `--role all`): that is the process that writes the training log.
Batch by batch, like the student consumer: every record gets exactly one outcome (stored in
the log, or a dead-letter record with its reason), and the batch's offsets are committed only
after every outcome is durable (the log's transaction, the broker's ack). A bad record never
stalls the partition: what the desk refuses, and a record whose handling fails for a reason of
its own, is dead-lettered. Only an unavailable log or broker rewinds the batch and retries it
(the log stores a re-delivered record once: `record_key`).

After a batch that stored something (and once at start) it re-reads the quality people
measure (services/teacher/quality.py) into the `triage_agreement*` gauges: a small read of the
feedback rows; a failure of it is logged and never holds feedback back.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator

from faststream.kafka.annotations import KafkaMessage

from schemas.dead_letter import DeadLetter
from services.stream.kafka_io import group_batch_options
from services.stream.publisher import HEADERS
from services.stream.teacher_lane import _unavailable as unavailable  # one rule for both lanes
from services.teacher.feedback import FeedbackDesk, Verdict
from services.teacher.quality import quality_from_log

log = logging.getLogger(__name__)

RETRY_MAX_S = 30.0


class FeedbackLane:
    def __init__(self, broker: Any, settings: Any, task: Any, metrics: Any, *, replica_id: str,
                 training_log: Any | None = None) -> None:
        self.broker, self.settings, self.task, self.metrics = broker, settings, task, metrics
        self.replica_id = replica_id
        self._injected_log = training_log
        self.desk: FeedbackDesk | None = None
        self._failed_attempts = 0
        self.subscriber = broker.subscriber(settings.feedback_topic, group_id=settings.feedback_consumer_group,
                                            **group_batch_options(settings))
        self.subscriber(self._handle_batch)

    @asynccontextmanager
    async def resources(self) -> AsyncIterator[FeedbackLane]:
        async with AsyncExitStack() as stack:
            training_log = self._injected_log
            if training_log is None:
                from services.teacher.training_log import TrainingLog

                training_log = TrainingLog(self.settings.training_log_path)
                stack.callback(training_log.close)
            self.desk = FeedbackDesk(self.task, training_log, eval_share=self.settings.eval_share)
            await self._measure()
            yield self

    async def _handle_batch(self, msg: KafkaMessage) -> None:
        assert self.desk is not None
        raw = msg.raw_message if isinstance(msg.raw_message, tuple) else (msg.raw_message,)
        verdicts: list[Verdict] = []
        try:
            for record in raw:
                verdict = await self._judge(record)
                if verdict.refused:
                    await self._dead_letter(record, verdict)
                verdicts.append(verdict)
        except Exception as exc:  # the log or the broker is unavailable: rewind, nothing committed
            self._failed_attempts += 1
            log.error("feedback batch of %d failed (%s: %s); attempt %d, rewinding to retry", len(raw),
                      type(exc).__name__, str(exc)[:300], self._failed_attempts,
                      exc_info=exc if self._failed_attempts == 1 else None)
            await msg.nack()
            await asyncio.sleep(min(RETRY_MAX_S, 0.5 * 2 ** min(self._failed_attempts - 1, 6)))
            return
        self._failed_attempts = 0
        await msg.ack()  # every record of the batch has a durable outcome
        for verdict in verdicts:
            self.metrics.feedback_received(verdict.outcome)
        if any(not v.refused for v in verdicts):
            await self._measure()

    async def _measure(self) -> None:
        assert self.desk is not None
        entity_field = self.task.entity_field.name if self.task.entity_field is not None else None
        try:
            report = await asyncio.to_thread(quality_from_log, self.desk.training_log.path, entity_field)
            self.metrics.set_quality(report)
        except Exception as exc:  # the gauges go stale; the feedback itself is stored
            log.warning("could not measure quality from feedback: %s: %s", type(exc).__name__, str(exc)[:300])

    async def _judge(self, record: Any) -> Verdict:
        """The desk's verdict; a failure of the record's own (not the log being unavailable)
        is dead-lettered as `feedback_failed` instead of retried forever."""
        assert self.desk is not None
        try:
            return await asyncio.to_thread(self.desk.receive, record.value)
        except Exception as exc:
            if unavailable(exc):
                raise
            log.exception("feedback record failed; dead-lettering it",
                          extra={"topic": record.topic, "partition": record.partition, "offset": record.offset})
            return Verdict("feedback_failed", f"{type(exc).__name__}: {str(exc)[:900]}")

    async def _dead_letter(self, record: Any, verdict: Verdict) -> None:
        log.warning("dead-lettered a feedback record: %s (%s)", verdict.outcome, verdict.detail[:200],
                    extra={"topic": record.topic, "partition": record.partition, "offset": record.offset})
        envelope = DeadLetter.of_record(record, copy_limit=self.settings.dead_letter_copy_bytes,
                                        reason=verdict.outcome, detail=verdict.detail or verdict.outcome,
                                        ticket_id=verdict.ticket_id)
        headers = {**HEADERS, "triage-replica": self.replica_id}
        future = await self.broker.publish(envelope.model_dump_json().encode(), self.settings.dead_letter_topic,
                                           key=record.key, headers=headers, no_confirm=True)
        await future  # acknowledged by the broker, or raises (the batch is retried)
        self.metrics.dead_lettered(verdict.outcome)
