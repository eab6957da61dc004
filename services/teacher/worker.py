"""What the teacher worker does with one escalation record. No Kafka consumer here: the wiring
(services/stream/teacher_lane.py) hands records in and commits offsets when `resolve` returns.

An escalation (`kind="escalation"`), as users see it on the results topic (keyed by ticket id,
latest record wins):
- the teacher answers before the deadline (ticket time + `deadline_s`): one `teacher` result;
- it does not (slow, down, over budget): the student's answer as `unverified` at the deadline,
  then the `teacher` result under the same key when the teacher answers (a correction);
- the teacher refuses this ticket (its answer is invalid, a per-request 4xx) `max_ticket_attempts`
  times: the `unverified` result is final;
- there is no teacher configured: `unverified` at once.
While the teacher is down the escalation keeps waiting (backoff up to `retry_max_s`): it is
never dropped, and its offset is not committed until its result is acknowledged.

An audit (`kind="audit"`: a confident ticket of the evaluation sample) publishes nothing: the
teacher's answer is logged (source "sample": held out) and compared with the confident answer
already published (the live accuracy estimate). A sampled escalation's answer is logged under
its sample source too, so it calibrates instead of training (schemas/training.py).
Audits take at most `audit_slots` of the teacher's concurrency and only when no escalation
waits for a slot, so they never starve escalations.

Every teacher answer is logged before its result is published: a crash in between re-delivers
the escalation and `resolve` republishes the logged answer without asking the teacher again.
Once the broker acknowledged the teacher's result, the escalation is marked answered in the
log: a re-delivery of a record that was answered but not yet committed (its partition's commit
waits for an older record still in flight; a kill -9, a rebalance) publishes nothing again.
A logged answer is reused only where it holds for this ticket's text: the log's dedup key folds
case, so a span of another spelling may not occur here (then the teacher is asked).

A router task forwards the ticket once, on its first published answer (schemas/forwarding.py).
The training log keeps that answer's routing label before it is published: the correction
and a re-delivered escalation (which finds the teacher's answer logged and would otherwise
route on it) name the same `forwarded_to` and send nothing new.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

from schemas.answer import entity_set, fields_holding_for
from schemas.classification import Classification, Route
from schemas.escalation import Escalation
from schemas.forwarding import Forward, Router, forwarded_result
from schemas.task import Entity
from schemas.training import TrainingExample
from services.teacher.client import TeacherUnavailable
from services.teacher.escalation import AuditEstimator
from services.teacher.slots import TeacherSlots

if TYPE_CHECKING:
    from services.teacher.client import Teacher
    from services.teacher.training_log import TrainingLog

log = logging.getLogger(__name__)

# publish(result) -> None once the broker acknowledged it (raises otherwise).
PublishResult = Callable[[Classification], Awaitable[None]]
# send_forward(forward) -> None: a router task's forwarded ticket, acknowledged by the broker.
SendForward = Callable[[Forward], Awaitable[None]]


class WorkerMetrics(Protocol):
    """Where the worker reports (services.stream.metrics.ServiceMetrics is one)."""

    def observe_result(self, route: str, confidence: float | None, e2e_seconds: float | None = None) -> None: ...
    def corrected(self, n: int = 1) -> None: ...
    def forwarded_to(self, task: str) -> None: ...
    def set_audit(self, accuracy: float, samples: int) -> None: ...
    def training_examples_logged(self, n: int = 1) -> None: ...


class _ForwardMemory:
    """TrainingLog's `first_forward` / `forward_sent` for a worker without a log (tests): in
    this process only, so a restarted worker may forward again."""

    def __init__(self) -> None:
        self._first: dict[str, list[Any]] = {}

    def first_forward(self, ticket_id: str, label: str | None, route: str) -> tuple[str | None, str, bool]:
        got = self._first.setdefault(ticket_id, [label, route, False])
        return got[0], got[1], got[2]

    def forward_sent(self, ticket_id: str) -> None:
        self._first[ticket_id][2] = True


@dataclass
class WorkerStats:
    teacher_results: int = 0
    unverified: int = 0
    corrections: int = 0  # teacher results that replaced an unverified one
    reused: int = 0  # answered from the training log (a re-delivery, or a known text)
    redelivered_answered: int = 0  # re-deliveries of escalations answered already: nothing published
    gave_up: Counter[str] = field(default_factory=Counter)  # ticket refused by the teacher
    audits: int = 0
    audits_skipped: int = 0  # no teacher configured
    examples_logged: int = 0
    teacher_failures: Counter[str] = field(default_factory=Counter)


def escalation_key(request: Escalation) -> str:
    """One escalation record, as its re-deliveries carry it: a ticket sent again under its id
    has another ticket time and is answered again."""
    return f"{request.ticket_id}@{request.ticket_time_ms}"


@dataclass
class _Answer:
    labels: dict[str, Any]  # the fields the teacher answered (all, or the unsure ones)
    model: str
    prompt_hash: str
    logged: bool  # already in the training log


def merge_answer(student: Classification, labels: dict[str, Any]) -> dict[str, Any]:
    """The published fields once the teacher answered `labels`: its fields replace the
    student's, the rest stay the student's (a partial escalation); `sources` says who is who
    and `confidence` is the lowest of the student's fields still published (1.0: none)."""
    fields, entities = dict(student.fields), student.entities
    sources = dict(student.sources) or {name: "student" for name in fields}
    for name, value in labels.items():
        if isinstance(value, list):  # the entities field
            entities = [Entity(**e) if isinstance(e, dict) else e for e in value]
        else:
            fields[name] = value
        sources[name] = "teacher"
    kept = []
    for name, source in sources.items():
        if source != "student":
            continue
        if name in student.student:
            kept.append(student.student[name].confidence)
        elif student.student_entities is not None:  # the entities field
            kept.append(student.student_entities.confidence)
    return {"fields": fields, "entities": entities, "sources": sources, "confidence": min(kept, default=1.0)}


def agrees(student: Classification, labels: dict[str, Any]) -> bool:
    """The confident answer equals the teacher's on every field the teacher answered."""
    for name, value in labels.items():
        if isinstance(value, list):
            if entity_set(student.entities or []) != entity_set(value):
                return False
        elif student.fields.get(name) != value:
            return False
    return True


class EscalationResolver:
    def __init__(
        self, *, teacher: Teacher | None, training_log: TrainingLog | None, publish: PublishResult,
        deadline_s: float, slots: TeacherSlots, metrics: WorkerMetrics | None = None,
        max_ticket_attempts: int = 3, retry_base_s: float = 0.5, retry_max_s: float = 10.0,
        wall_clock: Callable[[], float] = time.time,
        router: Router | None = None, send_forward: SendForward | None = None, drift: Any = None,
    ) -> None:
        self.teacher, self.training_log, self.publish = teacher, training_log, publish
        self.router, self.send_forward = router, send_forward
        self._forwards = training_log if training_log is not None else _ForwardMemory()
        self.deadline_s, self.slots, self.metrics = deadline_s, slots, metrics
        self.max_ticket_attempts, self.retry_base_s, self.retry_max_s = max_ticket_attempts, retry_base_s, retry_max_s
        self.wall_clock = wall_clock
        self.stats = WorkerStats()
        self.audit = AuditEstimator()
        self.drift = drift  # services.stream.drift.DriftTracker: teacher answers per window
        self._rng = random.Random()
        self._teacher_back: asyncio.Event | None = None  # set by the first answer after failures

    async def resolve(self, request: Escalation) -> None:
        """Handle one record to its end (see the module docstring). Raises only for a failure
        to publish or log (the caller retries the record, nothing was committed)."""
        if request.kind == "audit":
            await self._audit(request)
        else:
            await self._escalation(request)

    # ---- escalations ----------------------------------------------------------------------
    async def _escalation(self, request: Escalation) -> None:
        if await self._answered(request):
            self.stats.redelivered_answered += 1
            log.info("escalation of ticket %s re-delivered after its teacher result was published: "
                     "nothing published again", request.ticket_id)
            return
        asked = self._fields_to_ask(request)
        answer = await self._known_answer(request.text, asked or self._all_fields(request))
        if answer is None and self.teacher is None:
            await self._publish_unverified(request)
            return
        unverified_sent = False
        if answer is None:
            asking = asyncio.create_task(self._ask(request.text, "escalation", asked))
            try:
                # At most deadline_s from now: a ticket time ahead of this clock (another host's
                # clock, a made-up CreateTime) must not postpone the promise.
                remaining = min(self.deadline_s, request.ticket_time_ms / 1000 + self.deadline_s - self.wall_clock())
                if remaining > 0:
                    await asyncio.wait({asking}, timeout=remaining)
                if not asking.done():  # past the deadline: users get the student's answer now
                    await self._publish_unverified(request)
                    unverified_sent = True
                answer = await asking
            finally:
                asking.cancel()
        if answer is None:  # the teacher refused this ticket: the student's answer stays
            if not unverified_sent:
                await self._publish_unverified(request)
            return
        if not answer.logged:
            await self._log(request, answer, source=request.sample or "live")
        student = request.student_result
        if self.drift is not None:
            self.drift.taught(request.ticket_id, student.adapter_id, answer.labels, student.fields)
        result = student.model_copy(update={
            **merge_answer(student, answer.labels), "route": Route.teacher, "model": answer.model,
            "teacher": answer.labels, "teacher_model": answer.model,
            "latency_ms": self._since_ticket_ms(request),
        })
        await self._publish(request, result)  # a correction names the first answer's forward
        if self.training_log is not None:
            await asyncio.to_thread(self.training_log.mark_answer_published, escalation_key(request))
        self.stats.teacher_results += 1
        self.stats.corrections += int(unverified_sent)
        if self.metrics:
            self.metrics.observe_result(Route.teacher.value, None, None if unverified_sent
                                        else self._since_ticket_ms(request) / 1000)
            if unverified_sent:
                self.metrics.corrected()

    async def _answered(self, request: Escalation) -> bool:
        """This very escalation's teacher result was published already (a re-delivery)."""
        if self.training_log is None:
            return False
        return await asyncio.to_thread(self.training_log.answer_published, escalation_key(request))

    async def _publish_unverified(self, request: Escalation) -> None:
        result = request.student_result.model_copy(update={
            "route": Route.unverified, "latency_ms": self._since_ticket_ms(request)})
        await self._publish(request, result)
        self.stats.unverified += 1
        if self.metrics:
            self.metrics.observe_result(Route.unverified.value, None, self._since_ticket_ms(request) / 1000)

    async def _publish(self, request: Escalation, result: Classification) -> None:
        """Publish one of the ticket's answers. A router task forwards on the first one only:
        its routing label is recorded before it is published, and every later answer (the
        correction, a re-delivery's) is published with that forward and sends it no more."""
        forward, sent = None, True
        if self.router is not None and request.ticket is not None:
            label, route, sent = await asyncio.to_thread(
                self._forwards.first_forward, request.ticket_id, result.fields.get(self.router.field),
                result.route.value)
            forward = self.router.forward(request.ticket, request.ticket_id, label, route)
        await self.publish(forwarded_result(result, forward))
        if forward is not None and not sent and self.send_forward is not None:
            await self.send_forward(forward)
            await asyncio.to_thread(self._forwards.forward_sent, request.ticket_id)
            if self.metrics:
                self.metrics.forwarded_to(forward.task)

    # ---- audits ---------------------------------------------------------------------------
    async def _audit(self, request: Escalation) -> None:
        answer = await self._known_answer(request.text, self._all_fields(request))
        if answer is None and self.teacher is None:
            self.stats.audits_skipped += 1
            return
        if answer is None:
            answer = await self._ask(request.text, "audit")
            if answer is None:
                return
            # An audit from before the evaluation sample (no `sample`) was a confident ticket
            # only: logged as "audit", it trains rather than bias the held-out slice.
            await self._log(request, answer, source=request.sample or "audit")
        self.stats.audits += 1
        agree = agrees(request.student_result, answer.labels)
        self.audit.record(agree)
        if self.drift is not None:
            student = request.student_result
            self.drift.taught(request.ticket_id, student.adapter_id, answer.labels, student.fields, agree)
        if self.metrics:
            accuracy, n, _, _ = self.audit.estimate()
            self.metrics.set_audit(accuracy, n)

    # ---- the teacher and the log ----------------------------------------------------------
    def _fields_to_ask(self, request: Escalation) -> list[str] | None:
        """The unsure fields when the teacher finds asking for those alone cheaper, else None
        (all fields: a complete training example)."""
        choose = getattr(self.teacher, "fields_for", None)
        if choose is None or not request.unsure_fields:
            return None
        return choose(request.text, request.unsure_fields)

    async def _ask(self, text: str, kind: str, fields: list[str] | None = None) -> _Answer | None:
        """The teacher's answer, waiting out outages; None when it refuses this very ticket."""
        assert self.teacher is not None
        refused, waits = 0, 0
        while True:
            async with self.slots.hold(kind):
                try:
                    got = await (self.teacher.label(text, fields) if fields else self.teacher.label(text))
                    self._teacher_answered()
                    return _Answer(got.labels, got.model, got.prompt_hash, logged=False)
                except TeacherUnavailable as exc:
                    self.stats.teacher_failures[exc.reason] += 1
                    scope = exc.scope
                    if scope == "ticket":
                        refused += 1
                        if refused >= self.max_ticket_attempts:
                            self.stats.gave_up[exc.reason] += 1
                            log.warning("the teacher refused a ticket %d times (%s); its student answer "
                                        "stays unverified", refused, exc)
                            return None
            waits += 1
            delay = min(self.retry_max_s, self.retry_base_s * 2 ** min(waits - 1, 16))
            delay = self._rng.uniform(delay / 2, delay)  # jitter: no thundering herd
            if scope == "ticket":  # this ticket's own problem: back off whatever the others get
                await asyncio.sleep(delay)
            else:  # the teacher is out: retry at the backoff, or as soon as any call gets through
                await self._teacher_back_or(delay)

    async def _teacher_back_or(self, timeout_s: float) -> None:
        """Wait `timeout_s`, or less: until a call of this worker gets an answer again. After an
        outage the backlog goes to the teacher once the breaker's probe succeeds, not up to
        `retry_max_s` later (the soak's outage lag)."""
        if self._teacher_back is None:
            self._teacher_back = asyncio.Event()
        back = self._teacher_back
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await back.wait()

    def _teacher_answered(self) -> None:
        if self._teacher_back is not None:
            self._teacher_back.set()
            self._teacher_back = None

    @staticmethod
    def _all_fields(request: Escalation) -> list[str]:
        student = request.student_result
        return list(student.sources or student.fields)

    async def _known_answer(self, text: str, fields: list[str]) -> _Answer | None:
        """The logged answer when it covers `fields` for this very text: a partial one may
        not, nor entities whose spans do not occur in it as a fresh answer's must."""
        if self.training_log is None:
            return None
        known = await asyncio.to_thread(self.training_log.answer_for, text)
        labels = fields_holding_for(known.labels, text) if known is not None else {}
        if known is None or not set(fields) <= set(labels):
            return None
        self.stats.reused += 1
        return _Answer(labels, known.teacher_model, known.prompt_hash, logged=True)

    async def _log(self, request: Escalation, answer: _Answer, *, source: str) -> None:
        if self.training_log is None:
            return
        example = TrainingExample(text=request.text, labels=answer.labels, teacher_model=answer.model,
                                  prompt_hash=answer.prompt_hash, source=source,
                                  ticket_id=request.ticket_id)
        added = await asyncio.to_thread(self.training_log.append, [example])  # SQLite + fsync
        self.stats.examples_logged += added
        if self.metrics and added:
            self.metrics.training_examples_logged(added)

    def _since_ticket_ms(self, request: Escalation) -> float:
        return max(0.0, self.wall_clock() * 1000 - request.ticket_time_ms)

    def summary(self) -> dict[str, object]:
        accuracy, n, low, high = self.audit.estimate()
        s = self.stats
        return {
            "teacher_results": s.teacher_results, "unverified": s.unverified, "corrections": s.corrections,
            "reused": s.reused, "redelivered_answered": s.redelivered_answered,
            "gave_up": dict(s.gave_up), "audits": s.audits,
            "audits_skipped": s.audits_skipped, "examples_logged": s.examples_logged,
            "teacher_failures": dict(s.teacher_failures),
            "audited_accuracy": accuracy, "audited_samples": n, "audited_ci95": (low, high),
        }
