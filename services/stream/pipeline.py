"""Domain logic for one batch of consumed records: validate -> student -> (teacher) -> outcomes.

No Kafka here: the handler in app.py turns records into `InboundRecord`s, calls
`TicketPipeline.process`, publishes the outcomes and only then commits offsets.
One ticket takes exactly one path: a result, or a dead-letter record.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from schemas.classification import Classification, Route
from schemas.dead_letter import DeadLetter
from schemas.ticket import Ticket
from schemas.training import TrainingExample
from services.student.engine import LIVE, Classifier, EngineRejection, StudentPrediction
from services.teacher.escalation import AuditEstimator, RollingRate, should_audit, should_escalate
from services.stream.validation import Rejection, parse_ticket

if TYPE_CHECKING:
    from services.stream.metrics import ServiceMetrics
    from services.teacher.client import Teacher, TeacherAnswer
    from services.teacher.training_log import TrainingLog

log = logging.getLogger(__name__)

# An uncalibrated student (base model, or an adapter without a stored threshold) is never
# trusted on its own: everything escalates until a calibrated adapter is promoted.
DEFAULT_UNCALIBRATED_THRESHOLD = 1.0


@dataclass(frozen=True)
class InboundRecord:
    value: bytes | None
    key: bytes | None
    topic: str
    partition: int
    offset: int
    received_at: float  # time.monotonic() when the batch arrived
    timestamp_ms: int | None = None  # the record's Kafka timestamp (producer's create time)


@dataclass(frozen=True)
class Outcome:
    kind: str  # "result" | "dead_letter"
    key: bytes | None
    payload: bytes
    record: InboundRecord
    route: str | None = None
    confidence: float | None = None


@dataclass
class PipelineStats:
    consumed: int = 0
    results: Counter[str] = field(default_factory=Counter)
    dead_letter: Counter[str] = field(default_factory=Counter)
    escalations: int = 0
    audits: int = 0
    audits_skipped: int = 0  # confident tickets not audited: too many audits in flight
    truncated: int = 0
    teacher_failures: Counter[str] = field(default_factory=Counter)
    examples_logged: int = 0
    backlog_labelled: int = 0


@dataclass
class EscalationConfig:
    threshold_override: float | None = None
    audit_rate: float = 0.0
    audit_salt: str = ""


class TicketPipeline:
    def __init__(
        self,
        *,
        classifier: Classifier,
        teacher: Teacher | None = None,
        training_log: TrainingLog | None = None,
        escalation: EscalationConfig | None = None,
        metrics: ServiceMetrics | None = None,
        max_message_bytes: int = 64_000,
        max_text_chars: int = 4_000,
        dead_letter_copy_bytes: int = 64_000,
        max_inflight_audits: int = 32,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.classifier = classifier
        self.teacher = teacher
        self.training_log = training_log
        self.escalation = escalation or EscalationConfig()
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.max_text_chars = max_text_chars
        self.dead_letter_copy_bytes = dead_letter_copy_bytes
        self.max_inflight_audits = max_inflight_audits
        self.clock = clock
        self.stats = PipelineStats()
        self.audit = AuditEstimator()
        self.escalation_rate = RollingRate(window=1000)
        self._audit_tasks: set[asyncio.Task[None]] = set()
        self._counter_lock = threading.Lock()

    # ---- the batch path ------------------------------------------------------------------
    async def process(self, records: Sequence[InboundRecord]) -> list[Outcome]:
        """One outcome per record, in order. A ticket the engine cannot classify is its own
        dead-letter; only batch-level failures (engine dead) raise."""
        self.stats.consumed += len(records)
        parsed = [
            parse_ticket(r.value, max_bytes=self.max_message_bytes, max_text_chars=self.max_text_chars)
            for r in records
        ]
        outcomes: list[Outcome | None] = [None] * len(records)
        valid = [(i, t) for i, t in enumerate(parsed) if isinstance(t, Ticket)]
        for i, item in enumerate(parsed):
            if isinstance(item, Rejection):
                outcomes[i] = self.dead_letter(records[i], item)
        if valid:
            # Pinned for the whole batch: a hot-swap while the engine runs must not judge these
            # answers by the new adapter's threshold.
            adapter = self.classifier.live_adapter
            engine_started = self.clock()
            predictions = await self.classifier.classify([t.full_text() for _, t in valid], adapter=adapter)
            engine_s = self.clock() - engine_started
            if self.metrics:
                self.metrics.observe_batch(len(valid), engine_s)
            threshold = self.threshold(adapter)
            answerable = []
            for (i, ticket), prediction in zip(valid, predictions):
                if isinstance(prediction, EngineRejection):
                    outcomes[i] = self.dead_letter(records[i], Rejection(prediction.reason, prediction.detail),
                                                   ticket_id=ticket.id)
                else:
                    answerable.append((i, ticket, prediction))
            answered = await asyncio.gather(
                *(self._answer(records[i], t, p, threshold) for i, t, p in answerable)
            )
            for (i, _, _), outcome in zip(answerable, answered):
                outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    def dead_letter(self, record: InboundRecord, rejection: Rejection, *, ticket_id: str | None = None) -> Outcome:
        """The record's dead-letter outcome: reason + bounded copy of the original bytes."""
        self.stats.dead_letter[rejection.reason] += 1
        log.warning("dead-lettered: %s (%s)", rejection.reason, rejection.detail,
                    extra={"topic": record.topic, "partition": record.partition, "ticket_id": ticket_id,
                           "offset": record.offset, "reason": rejection.reason})
        envelope = DeadLetter.of(
            record.value, copy_limit=self.dead_letter_copy_bytes,
            reason=rejection.reason,
            detail=rejection.detail[:1000],
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key_b64=DeadLetter.encode(record.key[:1024]) if record.key is not None else None,
            ticket_id=ticket_id,
        )
        return Outcome("dead_letter", record.key, envelope.model_dump_json().encode(), record)

    def threshold(self, adapter: Any = LIVE) -> float:
        """The escalation threshold for answers of `adapter` (default: the live one)."""
        if self.escalation.threshold_override is not None:
            return self.escalation.threshold_override
        chosen = self.classifier.live_adapter if adapter is LIVE else adapter
        if chosen is not None and chosen.threshold is not None:
            return float(chosen.threshold)
        return DEFAULT_UNCALIBRATED_THRESHOLD

    async def _answer(self, record: InboundRecord, ticket: Ticket, pred: StudentPrediction, threshold: float) -> Outcome:
        student_labels = {name: p.label for name, p in pred.fields.items()}
        escalate = should_escalate(pred.fields, threshold)
        if pred.truncated:
            self.stats.truncated += 1
        self.escalation_rate.record(escalate)
        if self.metrics:
            self.metrics.set_escalation_rate(self.escalation_rate.rate())
            if escalate:
                self.metrics.escalated()
        route, labels, confidence = Route.student, student_labels, pred.confidence
        teacher_answer: TeacherAnswer | None = None
        audited = False
        if escalate:
            self.stats.escalations += 1
            teacher_answer = await self._ask_teacher(ticket, source="live")
            if teacher_answer is not None:
                route, labels, confidence = Route.teacher, teacher_answer.labels, 1.0
            else:
                route = Route.unverified
        elif self.teacher is not None and should_audit(ticket.id, self.escalation.audit_rate, self.escalation.audit_salt):
            if len(self._audit_tasks) >= self.max_inflight_audits:
                self.stats.audits_skipped += 1  # bounded: audits never queue without limit
            else:
                audited = True
        if audited:
            self.stats.audits += 1
            if self.metrics:
                self.metrics.audited()
            task = asyncio.create_task(self._audit(ticket, student_labels))
            self._audit_tasks.add(task)
            task.add_done_callback(self._audit_tasks.discard)
        result = Classification(
            ticket_id=ticket.id,
            fields=labels,
            confidence=confidence,
            route=route,
            model=teacher_answer.model if teacher_answer else self.classifier.model_name,
            adapter_id=pred.adapter_id,
            student=pred.fields,
            teacher=teacher_answer.labels if teacher_answer else None,
            teacher_model=teacher_answer.model if teacher_answer else None,
            audited=audited,
            truncated=pred.truncated,
            latency_ms=max(0.0, (self.clock() - record.received_at) * 1000),
            engine_ms=pred.engine_ms,
        )
        self.stats.results[route.value] += 1
        return Outcome(
            "result", ticket.id.encode(), result.model_dump_json().encode(), record,
            route=route.value, confidence=pred.confidence,
        )

    # ---- teacher paths ----------------------------------------------------------------------
    async def _ask_teacher(self, ticket: Ticket, *, source: str) -> TeacherAnswer | None:
        from services.teacher.client import TeacherUnavailable

        if self.teacher is None:
            await self._keep_for_later(ticket, "no_teacher")
            return None
        try:
            answer = await self.teacher.label(ticket.full_text())
        except TeacherUnavailable as exc:
            self.stats.teacher_failures[exc.reason] += 1
            await self._keep_for_later(ticket, exc.reason, attempted=exc.scope != "teacher")
            return None
        await asyncio.to_thread(self.log_example, ticket.full_text(), answer, source=source, ticket_id=ticket.id)
        return answer

    async def _audit(self, ticket: Ticket, student_labels: dict[str, str]) -> None:
        try:
            answer = await self._ask_teacher(ticket, source="audit")
        except Exception:  # a background task: nobody else would see this
            log.exception("audit of ticket %s failed", ticket.id)
            return
        if answer is None:
            return
        agree = all(answer.labels.get(k) == v for k, v in student_labels.items())
        self.audit.record(agree)
        if self.metrics:
            accuracy, n, _, _ = self.audit.estimate()
            self.metrics.set_audit(accuracy, n)

    async def _keep_for_later(self, ticket: Ticket, reason: str, *, attempted: bool = False) -> None:
        if self.training_log is not None:  # SQLite + fsync: off the event loop
            await asyncio.to_thread(self.training_log.add_pending, ticket.id, ticket.full_text(), reason,
                                    attempted=attempted)

    def log_example(self, text: str, answer: TeacherAnswer, *, source: str, ticket_id: str | None) -> None:
        """Append one teacher answer to the training log (blocking: call it from a thread)."""
        if self.training_log is None:
            return
        example = TrainingExample(
            text=text, labels=answer.labels, teacher_model=answer.model,
            prompt_hash=answer.prompt_hash, source=source, ticket_id=ticket_id,
        )
        added = self.training_log.append([example])
        with self._counter_lock:  # runs in worker threads
            self.stats.examples_logged += added
        if self.metrics and added:
            self.metrics.training_examples_logged(added)

    async def wait_for_audits(self, timeout_s: float = 30.0) -> None:
        if self._audit_tasks:
            await asyncio.wait(set(self._audit_tasks), timeout=timeout_s)

    def summary(self) -> dict[str, Any]:
        accuracy, n, low, high = self.audit.estimate()
        return {
            "consumed": self.stats.consumed,
            "results": dict(self.stats.results),
            "dead_letter": dict(self.stats.dead_letter),
            "escalations": self.stats.escalations,
            "audits": self.stats.audits,
            "audited_accuracy": accuracy,
            "audited_samples": n,
            "audited_ci95": (low, high),
            "teacher_failures": dict(self.stats.teacher_failures),
            "audits_skipped": self.stats.audits_skipped,
            "truncated": self.stats.truncated,
            "examples_logged": self.stats.examples_logged,
            "backlog_labelled": self.stats.backlog_labelled,
            "threshold": self.threshold(),
        }
