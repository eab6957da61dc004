"""Domain logic for one batch of consumed records: validate -> student -> outcomes.

No Kafka here: the handler in app.py turns records into `InboundRecord`s, calls
`TicketPipeline.process`, publishes the outcomes and only then commits offsets.
One ticket takes exactly one path: a result, a dead-letter record, or an escalation record
(the teacher worker publishes its result). The teacher is never awaited here: an uncertain
ticket costs this consumer one Kafka record, so confident tickets never wait for the teacher.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

from schemas.classification import Classification, Route
from schemas.dead_letter import DeadLetter
from schemas.escalation import Escalation
from schemas.ticket import Ticket
from services.student.engine import LIVE, Classifier, EngineRejection, StudentPrediction
from services.student.confidence_map import adapter_maps, mapped
from schemas.training import eval_sample_source
from services.teacher.escalation import RollingRate, configured_threshold, unsure_fields
from schemas.forwarding import Router, forwarded_result
from services.stream.validation import Rejection, parse_ticket

if TYPE_CHECKING:
    from services.stream.drift import DriftTracker
    from services.stream.metrics import ServiceMetrics

log = logging.getLogger(__name__)

# An uncalibrated student (base model, or an adapter without a stored threshold, or a field added
# since calibration) is never trusted on its own: everything escalates until a calibrated
# adapter is promoted. Infinite, not 1.0: a confidence can be exactly 1.0 (grammar-forced or
# saturated tokens) and `confidence < 1.0` would let it through.
DEFAULT_UNCALIBRATED_THRESHOLD = math.inf


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
    kind: str  # "result" | "dead_letter" | "escalation" (an escalation or an audit request) | "forward"
    key: bytes | None
    payload: bytes
    record: InboundRecord
    route: str | None = None  # a forward: the task it goes to
    confidence: float | None = None
    topic: str | None = None  # only a forward names its topic (the target task's tickets topic)


@dataclass
class PipelineStats:
    consumed: int = 0
    results: Counter[str] = field(default_factory=Counter)
    dead_letter: Counter[str] = field(default_factory=Counter)
    escalations: int = 0
    audits: int = 0
    sampled: int = 0  # tickets in the evaluation sample (escalated or audited)
    truncated: int = 0


@dataclass
class EscalationConfig:
    threshold_override: float | None = None
    # The evaluation sample (schemas.training): a content-hash share of every ticket; the
    # larger `eval_share_cold` while no calibrated adapter is live (all escalate anyway).
    # 0 here (no sample); the service passes Settings.eval_share / eval_share_cold.
    eval_share: float = 0.0
    eval_share_cold: float = 0.0


class TicketPipeline:
    def __init__(
        self,
        *,
        classifier: Classifier,
        escalation: EscalationConfig | None = None,
        metrics: ServiceMetrics | None = None,
        max_message_bytes: int = 64_000,
        max_text_chars: int = 4_000,
        dead_letter_copy_bytes: int = 64_000,
        router: Router | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        drift: DriftTracker | None = None,
    ) -> None:
        self.classifier = classifier
        self.escalation = escalation or EscalationConfig()
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes
        self.max_text_chars = max_text_chars
        self.dead_letter_copy_bytes = dead_letter_copy_bytes
        self.router = router
        self.clock = clock
        self.wall_clock = wall_clock
        self.stats = PipelineStats()
        self.escalation_rate = RollingRate(window=1000)
        self.drift = drift  # per-window figures vs the adapter's distil (services/stream/drift.py)
        task = getattr(classifier, "task", None)  # the task's extra ticket fields shown to the models
        self.inputs = list(task.inputs) if task is not None else []

    # ---- the batch path ------------------------------------------------------------------
    async def process(self, records: Sequence[InboundRecord]) -> list[Outcome]:
        """Every record's outcomes, in record order: one result, dead-letter or escalation
        each (plus an audit request after some confident results). A ticket the engine cannot
        classify is its own dead-letter; only batch-level failures (engine dead) raise."""
        self.stats.consumed += len(records)
        parsed = [
            parse_ticket(r.value, max_bytes=self.max_message_bytes, max_text_chars=self.max_text_chars,
                         inputs=[i.name for i in self.inputs])
            for r in records
        ]
        outcomes: list[list[Outcome]] = [[] for _ in records]
        valid = [(i, t) for i, t in enumerate(parsed) if isinstance(t, Ticket)]
        for i, item in enumerate(parsed):
            if isinstance(item, Rejection):
                outcomes[i] = [self.dead_letter(records[i], item)]
        if valid:
            # Pinned for the whole batch: a hot-swap while the engine runs must not judge these
            # answers by the new adapter's threshold.
            adapter = self.classifier.live_adapter
            engine_started = self.clock()
            predictions = await self.classifier.classify([t.full_text(self.inputs) for _, t in valid], adapter=adapter)
            engine_s = self.clock() - engine_started
            if self.metrics:
                self.metrics.observe_batch(len(valid), engine_s)
            threshold = self.threshold(adapter)
            cold = self.cold(adapter)
            maps = adapter_maps(adapter)  # the threshold was certified on these maps' output
            for (i, ticket), prediction in zip(valid, predictions):
                if isinstance(prediction, EngineRejection):
                    outcomes[i] = [self.dead_letter(records[i], Rejection(prediction.reason, prediction.detail),
                                                    ticket_id=ticket.id)]
                else:
                    outcomes[i] = self._answer(records[i], ticket, mapped(prediction, maps), threshold, cold)
        return [o for per_record in outcomes for o in per_record]

    def dead_letter(self, record: InboundRecord, rejection: Rejection, *, ticket_id: str | None = None) -> Outcome:
        """The record's dead-letter outcome: reason + bounded copy of the original bytes."""
        self.stats.dead_letter[rejection.reason] += 1
        log.warning("dead-lettered: %s (%s)", rejection.reason, rejection.detail,
                    extra={"topic": record.topic, "partition": record.partition, "ticket_id": ticket_id,
                           "offset": record.offset, "reason": rejection.reason})
        envelope = DeadLetter.of_record(record, copy_limit=self.dead_letter_copy_bytes, reason=rejection.reason,
                                        detail=rejection.detail, ticket_id=ticket_id)
        return Outcome("dead_letter", record.key, envelope.model_dump_json().encode(), record)

    def threshold(self, adapter: Any = LIVE) -> float | dict[str, float]:
        """The escalation threshold for answers of `adapter` (default: the live one): one per
        field when the adapter was calibrated per field, else one for every field."""
        if self.escalation.threshold_override is not None:
            return configured_threshold(self.escalation.threshold_override)
        chosen = self.classifier.live_adapter if adapter is LIVE else adapter
        if chosen is not None and chosen.threshold is not None:
            t = chosen.threshold
            # a field the adapter was not calibrated for (a field added since) is never trusted
            return {"*": DEFAULT_UNCALIBRATED_THRESHOLD, **t} if isinstance(t, dict) else float(t)
        return DEFAULT_UNCALIBRATED_THRESHOLD

    def cold(self, adapter: Any = LIVE) -> bool:
        """Cold start: every ticket escalates (no calibrated adapter is live, or the live one
        certified nothing), so sampling more of them for evaluation costs no teacher call. A
        threshold override is the operator's choice: never cold."""
        if self.escalation.threshold_override is not None:
            return False
        threshold = self.threshold(adapter)
        values = threshold.values() if isinstance(threshold, dict) else [threshold]
        return all(math.isinf(v) for v in values)

    def _answer(self, record: InboundRecord, ticket: Ticket, pred: StudentPrediction,
                threshold: float | dict[str, float], cold: bool = False) -> list[Outcome]:
        scores = pred.scores()
        unsure = unsure_fields(scores, threshold)
        labels = {n: p.label for n, p in pred.fields.items()}
        guard = getattr(self.drift, "guard", None)
        if guard is not None:  # a label the teacher keeps replacing with a never-trained one
            unsure += [n for n in guard.guarded(pred.adapter_id, labels) if n not in unsure]
        escalate = bool(unsure) or not scores
        text = ticket.full_text(self.inputs)
        sample = eval_sample_source(text, self.escalation.eval_share, self.escalation.eval_share_cold, cold=cold)
        if pred.entities is not None and self.metrics:
            for reason, n in pred.entities.dropped.items():
                self.metrics.answer_rejected("student", reason, n)
        if self.metrics:
            for name in unsure:
                self.metrics.field_escalations.labels(name).inc()
        if pred.truncated:
            self.stats.truncated += 1
        self.escalation_rate.record(escalate)
        audit = not escalate and sample is not None  # the sample's confident tickets: an audit
        self.stats.sampled += sample is not None
        if self.drift is not None:
            self.drift.decided(ticket.id, pred.adapter_id, labels,
                               escalate, audited=audit, cold=cold)
        if self.metrics:
            self.metrics.set_escalation_rate(self.escalation_rate.rate())
            if escalate:
                self.metrics.escalated()
            if audit:
                self.metrics.audited()
            if sample is not None:
                self.metrics.sampled("escalated" if escalate else "student")
        result = Classification(
            ticket_id=ticket.id,
            fields=dict(labels),
            entities=list(pred.entities.entities) if pred.entities is not None else None,
            sources={name: "student" for name in scores},
            confidence=pred.confidence,
            # What users get if the teacher misses the deadline: the student's answer, flagged.
            route=Route.unverified if escalate else Route.student,
            model=self.classifier.model_name,
            adapter_id=pred.adapter_id,
            student=pred.fields,
            student_entities=pred.entities,
            audited=audit,
            truncated=pred.truncated,
            latency_ms=max(0.0, (self.clock() - record.received_at) * 1000),
            engine_ms=pred.engine_ms,
            route_chain=ticket.route_chain,
        )
        key = ticket.id.encode()
        if escalate:
            self.stats.escalations += 1
            return [self._escalation(record, ticket, result, "escalation", unsure, sample)]
        self.stats.results[Route.student.value] += 1
        # A router's confident answer: its forward goes out with the result, before the commit.
        forward = self.router.plan(self._as_sent(ticket), result) if self.router else None
        result = forwarded_result(result, forward)
        published = [Outcome("result", key, result.model_dump_json().encode(), record,
                             route=Route.student.value, confidence=pred.confidence)]
        if forward is not None:
            published.append(Outcome("forward", forward.key, forward.payload, record, route=forward.task,
                                     topic=forward.topic))
        if not audit:
            return published
        self.stats.audits += 1
        return [*published, self._escalation(record, ticket, result, "audit", sample=sample)]

    @staticmethod
    def _as_sent(ticket: Ticket) -> dict[str, Any]:
        """The ticket as a producer would send it again (declared inputs included)."""
        return ticket.model_dump(mode="json", exclude_none=True, exclude_defaults=True)

    def _escalation(self, record: InboundRecord, ticket: Ticket, result: Classification, kind: str,
                    unsure: list[str] | None = None, sample: str | None = None) -> Outcome:
        # The deadline runs from the producer's timestamp, but never from later than this batch
        # arrived: a clock ahead (or a made-up CreateTime) must not postpone the promise.
        arrived_ms = int((self.wall_clock() - (self.clock() - record.received_at)) * 1000)
        ticket_time_ms = min(record.timestamp_ms, arrived_ms) if record.timestamp_ms and record.timestamp_ms > 0 \
            else arrived_ms
        request = Escalation(kind=kind, ticket_id=ticket.id, text=ticket.full_text(self.inputs),
                             student_result=result, ticket_time_ms=ticket_time_ms,
                             unsure_fields=unsure or None, sample=sample,
                             ticket=self._as_sent(ticket) if self.router and kind == "escalation" else None)
        return Outcome("escalation", ticket.id.encode(), request.model_dump_json().encode(), record,
                       route=kind, confidence=result.confidence)

    def summary(self) -> dict[str, Any]:
        return {
            "consumed": self.stats.consumed,
            "results": dict(self.stats.results),
            "dead_letter": dict(self.stats.dead_letter),
            "escalations": self.stats.escalations,
            "audits": self.stats.audits,
            "sampled": self.stats.sampled,
            "truncated": self.stats.truncated,
            "threshold": self.threshold(),
        }
