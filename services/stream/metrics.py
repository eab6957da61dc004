"""Prometheus metrics for the triage service, and the small HTTP server that exposes them.

Nothing runs at import: build a `ServiceMetrics` (it owns its own `CollectorRegistry`, so tests
can build several) and serve it explicitly::

    metrics = ServiceMetrics()
    async with serve_metrics(metrics, settings.metrics_host, settings.metrics_port, metrics.readiness) as port:
        metrics.set_ready(True)          # once the engine is up and the consumer has joined
        ...                              # consume; call the helpers below from the handlers
        metrics.set_ready(False, "shutting down")

Endpoints: `GET /metrics` (Prometheus text format 0.0.4), `GET /healthz` (200 while the event
loop answers: a blocked loop fails the liveness probe), `GET /readyz` (200 when
`readiness()` returns `(True, ...)`, else 503 with the reason). The metric names below are a
contract with deploy/grafana/triage-dashboard.json (tests/unit/test_deploy.py checks it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from services.stream.drift import REASONS as DRIFT_REASONS
from services.teacher.client import TEACHER_OUTCOMES  # the teacher's own outcome names

log = logging.getLogger(__name__)

Route = Literal["student", "teacher", "unverified"]
TokenKind = Literal["prompt", "completion"]
ROUTES: tuple[str, ...] = get_args(Route)
TOKEN_KINDS: tuple[str, ...] = get_args(TokenKind)

# The text format `generate_latest` writes.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BASE_ADAPTER = "base"

# Consume -> result acked: 5 ms .. 60 s.
E2E_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
# One engine batch: a 128-ticket batch takes ~20 s on 2 CPU cores, well under 1 s on a GPU.
ENGINE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
BATCH_BUCKETS = tuple(float(2**i) for i in range(11))  # 1, 2, 4, ..., 1024
CONFIDENCE_BUCKETS = tuple(round(0.05 * i, 2) for i in range(21))  # 0.0, 0.05, ..., 1.0
TEACHER_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0)


def _check(value: str, allowed: tuple[str, ...], what: str) -> str:
    """The canonical plain string (a `str` Enum member becomes its value, not 'Route.x')."""
    for name in allowed:
        if value == name:
            return name
    raise ValueError(f"unknown {what} {value!r}; expected one of {allowed}")


class ServiceMetrics:
    """Every triage metric, on a private registry. Metric objects are public attributes."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        counter = functools.partial(Counter, registry=self.registry)
        gauge = functools.partial(Gauge, registry=self.registry)
        histogram = functools.partial(Histogram, registry=self.registry)
        # --- flow ------------------------------------------------------------------------
        self.tickets_consumed = counter(
            "triage_tickets_consumed_total", "Tickets read from the tickets topic.")
        self.results = counter("triage_results_total", "Results published, by route.", ["route"])
        self.dead_letter = counter(
            "triage_dead_letter_total", "Messages sent to the dead-letter topic.", ["reason"])
        self.e2e_latency = histogram(
            "triage_end_to_end_latency_seconds",
            "Ticket produced -> its first result acked (a teacher correction is not counted again).",
            buckets=E2E_BUCKETS)
        # --- engine ----------------------------------------------------------------------
        self.engine_latency = histogram(
            "triage_engine_latency_seconds", "Wall time of one student engine batch.",
            buckets=ENGINE_BUCKETS)
        self.batch_size = histogram(
            "triage_batch_size", "Tickets per engine batch.", buckets=BATCH_BUCKETS)
        self.confidence = histogram(
            "triage_confidence", "Student confidence (lowest field) per ticket.",
            buckets=CONFIDENCE_BUCKETS)
        # --- escalation and audit --------------------------------------------------------
        self.escalations = counter(
            "triage_escalations_total", "Tickets escalated to the teacher (low confidence).")
        self.audits = counter(
            "triage_audits_total", "Confident tickets of the evaluation sample also sent to the teacher.")
        self.eval_sample = counter(
            "triage_eval_sample_total", "Tickets in the evaluation sample (held out, never trained on), "
            "by whether the student answered them alone (student) or escalated them (escalated): "
            "student / all = the live coverage.", ["route"])
        self.escalation_rate = gauge(
            "triage_escalation_rate", "Rolling share of tickets escalated (set by the app).")
        self.audited_accuracy = gauge(
            "triage_audited_accuracy", "Student accuracy on audited tickets (rolling).")
        self.audited_samples = gauge(
            "triage_audited_samples", "Audited tickets behind triage_audited_accuracy.")
        self.escalations_waiting = gauge(
            "triage_escalations_waiting",
            "Escalations and audits the teacher worker holds (read, not yet answered and committed).")
        self.corrections = counter(
            "triage_corrections_total",
            "Teacher results published after the student's unverified answer (same key).")
        self.field_escalations = counter(
            "triage_field_escalations_total",
            "Fields below their calibrated threshold, per field (a ticket escalates when any is).",
            ["field"])
        self.rejected_answers = counter(
            "triage_rejected_answers_total",
            "Answers or entity spans refused by the task's contract (schemas/answer.py): the "
            "teacher's answer is retried, the student's span dropped; never published or logged.",
            ["source", "reason"])
        # --- teacher ---------------------------------------------------------------------
        self.teacher_requests = counter(
            "triage_teacher_requests_total", "Teacher calls, by outcome.", ["outcome"])
        self.teacher_tokens = counter(
            "triage_teacher_tokens_total", "Teacher tokens, by kind.", ["kind"])
        self.teacher_cost = counter(
            "triage_teacher_cost_usd_total", "Teacher spend in USD (from configured prices).")
        self.teacher_latency = histogram(
            "triage_teacher_latency_seconds", "Wall time of one teacher call, retries included.",
            buckets=TEACHER_BUCKETS)
        # --- adapters, lag, training, readiness -------------------------------------------
        self.live_adapter = gauge(
            "triage_live_adapter_info", "1 for the LoRA adapter now serving ('base' = none).",
            ["adapter_id"])
        self.adapter_swaps = counter("triage_adapter_swaps_total", "Hot-swaps to a new adapter.")
        self.consumer_lag = gauge(
            "triage_consumer_lag", "Messages behind the log end, per assigned partition.",
            ["topic", "partition"])
        self.forwarded = counter(
            "triage_forwarded_total",
            "Tickets a router task forwarded to another task's tickets topic, by target task.", ["to"])
        self.training_examples = counter(
            "triage_training_examples_total", "Examples newly written to the training log.")
        self.feedback = counter(
            "triage_feedback_total", "Feedback records (people's corrections or confirmations), by "
            "outcome: stored (added, corrected, confirmed, outranked) or the dead-letter reason "
            "(services/teacher/feedback.py).", ["outcome"])
        # Quality measured by people (services/teacher/quality.py), set by the feedback consumer.
        quality = ["measure", "scope"]  # student_vs_people | teacher_vs_people | student_vs_teacher; sample | all
        self.agreement = gauge("triage_agreement", "Share of judged tickets that agree (NaN: none judged yet).",
                               quality)
        self.agreement_low = gauge("triage_agreement_low", "Wilson 95% lower bound of triage_agreement.", quality)
        self.agreement_high = gauge("triage_agreement_high", "Wilson 95% upper bound of triage_agreement.", quality)
        self.agreement_samples = gauge("triage_agreement_samples", "Tickets behind triage_agreement.", quality)
        self.human_corrections = gauge(
            "triage_human_corrections", "Tickets where people gave `label` and `who` said `said`, for the "
            "most corrected labels only.", ["who", "field", "label", "said"])
        self.ready = gauge("triage_ready", "1 when this replica is ready to consume.")
        self.engine_info = gauge(
            "triage_engine_info", "1, labelled with the student engine's number format and why it was chosen.",
            ["dtype", "why"])
        self.threshold_refused = gauge(
            "triage_threshold_refused",
            "1 while the live adapter's threshold is refused (certified on another dtype or engine "
            "configuration): every ticket escalates until a distil re-certifies it.")
        # --- failure policy ----------------------------------------------------------------
        self.batch_failures = counter(
            "triage_batch_failures_total", "Batches that failed as a whole and were rewound, by error.",
            ["reason"])
        self.batch_retry_streak = gauge(
            "triage_batch_retry_streak", "Consecutive failed attempts of the current batch (0 = healthy).")
        # --- drift (services/stream/drift.py): the last closed window vs its adapter's distil ---
        self.drift_alert = gauge(
            "triage_drift_alert", "1 while the last closed drift window departs from the live adapter's "
            "distil beyond both Wilson intervals, by reason (escalation, accuracy, novel_labels).", ["reason"])
        self.drift_window = gauge(
            "triage_drift_window", "The last closed drift window's figure (escalation_rate, accuracy = "
            "audited agreement with the teacher, novel_share = teacher labels never trained on) and its "
            "Wilson 95% bounds (bound: value, low, high).", ["figure", "bound"])
        self.drift_baseline = gauge(
            "triage_drift_baseline", "The same figures on the distil's held-out certification rows "
            "(escalation_rate, accuracy), with Wilson 95% bounds.", ["figure", "bound"])
        self.drift_windows = counter(
            "triage_drift_windows_total", "Drift windows closed (every TRIAGE_DRIFT_WINDOW tickets).")
        self.guarded_labels = gauge(
            "triage_guarded_labels", "Student labels whose tickets escalate because the teacher keeps "
            "answering them with labels the adapter never trained on (services/stream/novelty_guard.py).")
        self._ready, self._ready_reason = False, "starting"
        self._readiness_notes: dict[str, str] = {}  # standing facts /readyz tells (no teacher, dtype)
        # Known label values start at 0 so rate() and dashboards see them from the first scrape.
        for route in ROUTES:
            self.results.labels(route=route)
        for outcome in TEACHER_OUTCOMES:
            self.teacher_requests.labels(outcome=outcome)
        for kind in TOKEN_KINDS:
            self.teacher_tokens.labels(kind=kind)
        for reason in DRIFT_REASONS:
            self.drift_alert.labels(reason=reason).set(0)
        self.set_live_adapter(None)

    # --- helpers for call sites ------------------------------------------------------------
    def ticket_consumed(self, n: int = 1) -> None:
        self.tickets_consumed.inc(n)

    def observe_result(
        self, route: Route, confidence: float | None, e2e_seconds: float | None = None
    ) -> None:
        """One published result. `confidence` is the student's (None if it never ran)."""
        self.results.labels(route=_check(route, ROUTES, "route")).inc()
        if confidence is not None:
            self.confidence.observe(confidence)
        if e2e_seconds is not None:
            self.e2e_latency.observe(e2e_seconds)

    def observe_confidence(self, confidence: float | None) -> None:
        """The student's confidence for a ticket whose result another component publishes."""
        if confidence is not None:
            self.confidence.observe(confidence)

    def dead_lettered(self, reason: str) -> None:
        self.dead_letter.labels(reason=reason).inc()

    def observe_batch(self, size: int, engine_seconds: float) -> None:
        self.batch_size.observe(size)
        self.engine_latency.observe(engine_seconds)

    def escalated(self, n: int = 1) -> None:
        self.escalations.inc(n)

    def audited(self, n: int = 1) -> None:
        self.audits.inc(n)

    def sampled(self, route: str) -> None:
        self.eval_sample.labels(route).inc()

    def corrected(self, n: int = 1) -> None:
        self.corrections.inc(n)

    def set_escalations_waiting(self, n: int) -> None:
        self.escalations_waiting.set(n)

    def set_escalation_rate(self, rate: float) -> None:
        self.escalation_rate.set(rate)

    def set_audit(self, accuracy: float, samples: int) -> None:
        self.audited_accuracy.set(accuracy)
        self.audited_samples.set(samples)

    def teacher_request(
        self,
        outcome: str,
        latency_s: float | None = None,
        *,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        cost_usd: float = 0.0,
    ) -> None:
        """One teacher call (or a call skipped by the breaker / budget: no latency then)."""
        self.teacher_requests.labels(outcome=_check(outcome, TEACHER_OUTCOMES, "outcome")).inc()
        if latency_s is not None:
            self.teacher_latency.observe(latency_s)
        if prompt_tokens:
            self.teacher_tokens.labels(kind="prompt").inc(prompt_tokens)
        if completion_tokens:
            self.teacher_tokens.labels(kind="completion").inc(completion_tokens)
        if cost_usd:
            self.teacher_cost.inc(cost_usd)

    def set_live_adapter(self, adapter_id: str | None) -> None:
        """Mark `adapter_id` (None = base model) as live; the previous label set is removed."""
        self.live_adapter.clear()
        self.live_adapter.labels(adapter_id=adapter_id or BASE_ADAPTER).set(1)

    def adapter_swapped(self, adapter_id: str | None) -> None:
        """A hot-swap happened: count it and mark the new adapter live."""
        self.adapter_swaps.inc()
        self.set_live_adapter(adapter_id)

    def set_lag(self, topic: str, partition: int, lag: int) -> None:
        self.consumer_lag.labels(topic=topic, partition=str(partition)).set(max(lag, 0))

    def remove_lag(self, topic: str, partition: int) -> None:
        """Drop a partition's series (call on rebalance when it is revoked)."""
        with contextlib.suppress(KeyError):
            self.consumer_lag.remove(topic, str(partition))

    def answer_rejected(self, source: str, reason: str, n: int = 1) -> None:
        """`n` answers or entity spans of `source` (teacher / student) refused for `reason`."""
        self.rejected_answers.labels(source, reason).inc(n)

    def forwarded_to(self, task: str) -> None:
        self.forwarded.labels(to=task).inc()

    def training_examples_logged(self, n: int = 1) -> None:
        self.training_examples.inc(n)

    def feedback_received(self, outcome: str) -> None:
        self.feedback.labels(outcome=outcome).inc()

    def set_quality(self, report: dict[str, Any]) -> None:
        """Gauges from services.teacher.quality.measure's report (the corrections replaced whole)."""
        for scope in ("sample", "all"):
            for measure, figure in report[scope].items():
                if not isinstance(figure, dict):  # the scope's ticket count
                    continue
                rate = figure["rate"]
                self.agreement.labels(measure, scope).set(float("nan") if rate is None else rate)
                self.agreement_low.labels(measure, scope).set(figure["low"])
                self.agreement_high.labels(measure, scope).set(figure["high"])
                self.agreement_samples.labels(measure, scope).set(figure["n"])
        self.human_corrections.clear()
        for who, labels in report["corrections"].items():
            for item in labels:
                for said, n in list(item["said"].items())[:3]:  # most frequent first: bounded series
                    self.human_corrections.labels(who, item["field"], item["label"], said).set(n)

    def batch_failed(self, reason: str) -> None:
        self.batch_failures.labels(reason=reason).inc()

    def set_retry_streak(self, attempts: int) -> None:
        self.batch_retry_streak.set(attempts)

    def set_ready(self, ready: bool, reason: str = "") -> None:
        self.ready.set(1 if ready else 0)
        self._ready = ready
        self._ready_reason = reason or ("ready" if ready else "not ready")

    def note_readiness(self, note: str, key: str = "teacher") -> None:
        """A fact /readyz appends to every reason without changing readiness itself; one per
        key, an empty note removes it."""
        if note:
            self._readiness_notes[key] = note
        else:
            self._readiness_notes.pop(key, None)

    def set_engine(self, dtype: str, why: str) -> None:
        self.engine_info.clear()
        self.engine_info.labels(dtype=dtype, why=why).set(1)
        self.note_readiness(f"dtype {dtype} ({why})", key="dtype")

    def set_threshold_refused(self, why: str | None) -> None:
        self.threshold_refused.set(1 if why else 0)
        self.note_readiness(why or "", key="threshold")

    def readiness(self) -> tuple[bool, str]:
        """Default readiness callable for `serve_metrics`: follows `set_ready`."""
        notes = "".join(f"; {note}" for note in self._readiness_notes.values())
        return self._ready, self._ready_reason + notes

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# --- HTTP (aiohttp) ---------------------------------------------------------------------------
def metrics_app(metrics: Any, readiness: Callable[[], tuple[bool, str]] | None = None,
                task_readiness: Callable[[str], tuple[bool, str] | None] | None = None) -> Any:
    """/metrics (Prometheus exposition), /healthz (the loop answers), /readyz (`readiness()`),
    and with `task_readiness` (a multi-task process) /readyz/<task>. `metrics`: anything with
    `exposition()` (a ServiceMetrics, or services.stream.metrics_hub.TaskMetricsHub)."""
    from aiohttp import web

    check = readiness or metrics.readiness

    async def metrics_handler(request: web.Request) -> web.Response:
        return web.Response(body=metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        try:
            ok, reason = check()
        except Exception as exc:  # a broken check means "not ready", never a dead server
            ok, reason = False, f"readiness check failed: {exc!r}"
        return web.Response(status=200 if ok else 503, text=f"{reason or ('ready' if ok else 'not ready')}\n")

    async def task_readyz(request: web.Request) -> web.Response:
        assert task_readiness is not None
        state = task_readiness(request.match_info["task"])
        if state is None:
            return web.Response(status=404, text="no such task\n")
        ok, reason = state
        return web.Response(status=200 if ok else 503, text=f"{reason}\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)  # GET also answers HEAD; other methods 405
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if task_readiness is not None:
        app.router.add_get("/readyz/{task}", task_readyz)
    return app


@contextlib.asynccontextmanager
async def serve_metrics(
    metrics: Any,
    host: str,  # Settings.metrics_host: no default here, so no caller binds 0.0.0.0 unasked
    port: int = 9464,
    readiness: Callable[[], tuple[bool, str]] | None = None,
    *,
    task_readiness: Callable[[str], tuple[bool, str] | None] | None = None,
) -> AsyncIterator[int]:
    """Serve /metrics, /healthz, /readyz (and /readyz/<task> with `task_readiness`) on the
    current event loop until the block exits; yields the bound port (port 0 picks a free one).
    `metrics`: a ServiceMetrics or a TaskMetricsHub; `readiness` defaults to `metrics.readiness`."""
    from aiohttp import web

    runner = web.AppRunner(metrics_app(metrics, readiness, task_readiness), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1]
        log.info("metrics server on %s:%d (/metrics /healthz /readyz)", host, bound)
        yield bound
    finally:
        await runner.cleanup()
