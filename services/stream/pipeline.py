"""Domain logic for one batch of consumed records: validate -> student -> (teacher) -> outcomes.

No Kafka here: the handler in app.py turns records into `InboundRecord`s, calls
`TicketPipeline.process`, publishes the outcomes and only then commits offsets.
One ticket takes exactly one path: a result, or a dead-letter record.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from schemas.classification import Classification, Route
from schemas.dead_letter import DeadLetter
from schemas.ticket import Ticket
from schemas.training import TrainingExample
from services.student.engine import Classifier, StudentPrediction
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
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.classifier = classifier
        self.teacher = teacher
        self.training_log = training_log
        self.escalation = escalation or EscalationConfig()
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.max_text_chars = max_text_chars
        self.clock = clock
        self.stats = PipelineStats()
        self.audit = AuditEstimator()
        self.escalation_rate = RollingRate(window=1000)
        self._audit_tasks: set[asyncio.Task[None]] = set()

    # ---- the batch path ------------------------------------------------------------------
    async def process(self, records: Sequence[InboundRecord]) -> list[Outcome]:
        self.stats.consumed += len(records)
        parsed = [
            parse_ticket(r.value, max_bytes=self.max_message_bytes, max_text_chars=self.max_text_chars)
            for r in records
        ]
        outcomes: list[Outcome | None] = [None] * len(records)
        valid = [(i, t) for i, t in enumerate(parsed) if isinstance(t, Ticket)]
        for i, item in enumerate(parsed):
            if isinstance(item, Rejection):
                outcomes[i] = self._dead_letter(records[i], item)
        if valid:
            engine_started = self.clock()
            predictions = await self.classifier.classify([t.full_text() for _, t in valid])
            engine_s = self.clock() - engine_started
            if self.metrics:
                self.metrics.observe_batch(len(valid), engine_s)
            answered = await asyncio.gather(
                *(self._answer(records[i], t, p) for (i, t), p in zip(valid, predictions))
            )
            for (i, _), outcome in zip(valid, answered):
                outcomes[i] = outcome
        return [o for o in outcomes if o is not None]

    def _dead_letter(self, record: InboundRecord, rejection: Rejection) -> Outcome:
        self.stats.dead_letter[rejection.reason] += 1
        log.warning("dead-lettered: %s (%s)", rejection.reason, rejection.detail,
                    extra={"topic": record.topic, "partition": record.partition,
                           "offset": record.offset, "reason": rejection.reason})
        envelope = DeadLetter(
            reason=rejection.reason,
            detail=rejection.detail,
            source_topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key_b64=DeadLetter.encode(record.key) if record.key is not None else None,
            original_b64=DeadLetter.encode(record.value),
        )
        return Outcome("dead_letter", record.key, envelope.model_dump_json().encode(), record)

    def threshold(self) -> float:
        if self.escalation.threshold_override is not None:
            return self.escalation.threshold_override
        live = self.classifier.live_adapter
        if live is not None and live.threshold is not None:
            return float(live.threshold)
        return DEFAULT_UNCALIBRATED_THRESHOLD

    async def _answer(self, record: InboundRecord, ticket: Ticket, pred: StudentPrediction) -> Outcome:
        student_labels = {name: p.label for name, p in pred.fields.items()}
        escalate = should_escalate(pred.fields, self.threshold())
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
            audited = True
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
            self._keep_for_later(ticket, "no_teacher")
            return None
        try:
            answer = await self.teacher.label(ticket.full_text())
        except TeacherUnavailable as exc:
            self.stats.teacher_failures[exc.reason] += 1
            self._keep_for_later(ticket, exc.reason)
            return None
        self._log_example(ticket.full_text(), answer, source=source, ticket_id=ticket.id)
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

    def _keep_for_later(self, ticket: Ticket, reason: str) -> None:
        if self.training_log is not None:
            self.training_log.add_pending(ticket.id, ticket.full_text(), reason)

    def _log_example(self, text: str, answer: TeacherAnswer, *, source: str, ticket_id: str | None) -> None:
        if self.training_log is None:
            return
        example = TrainingExample(
            text=text, labels=answer.labels, teacher_model=answer.model,
            prompt_hash=answer.prompt_hash, source=source, ticket_id=ticket_id,
        )
        added = self.training_log.append([example])
        self.stats.examples_logged += added
        if self.metrics and added:
            self.metrics.training_examples_logged(added)

    async def drain_backlog(self, limit: int = 64, concurrency: int = 4) -> int:
        """Label tickets the teacher missed (outage, budget). Returns how many got labelled.

        Small concurrency so live escalations keep most of the teacher's slots after an
        outage; a pass stops at the first failure instead of hammering a teacher that is
        still down (each failure would also count against the circuit breaker).
        """
        from services.teacher.client import TeacherUnavailable

        if self.teacher is None or self.training_log is None:
            return 0
        pending = self.training_log.pending(limit)
        done: list[str] = []
        for start in range(0, len(pending), concurrency):
            chunk = pending[start : start + concurrency]
            answers = await asyncio.gather(
                *(self.teacher.label(text) for _, text in chunk), return_exceptions=True
            )
            failed = False
            for (ticket_id, text), answer in zip(chunk, answers):
                if isinstance(answer, TeacherUnavailable):
                    failed = True
                elif isinstance(answer, BaseException):
                    raise answer
                else:
                    self._log_example(text, answer, source="backlog", ticket_id=ticket_id)
                    done.append(ticket_id)
            if failed:
                break
        if done:
            self.training_log.resolve_pending(done)
            self.stats.backlog_labelled += len(done)
        return len(done)

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
            "examples_logged": self.stats.examples_logged,
            "backlog_labelled": self.stats.backlog_labelled,
            "threshold": self.threshold(),
        }
