"""The one wiring place: settings (+ optional overrides) -> a runnable FastStream service.

    faststream run services.stream.app:create_app --factory     # or: triage serve

`TRIAGE_ROLE` picks what this process runs: the student consumer (tickets -> results or
escalations), the teacher worker (escalations -> teacher -> results + training log), or both.
Heavy resources (vLLM engine, teacher client, training log, metrics server) are created in
an async context manager before consuming starts and closed in `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, AsyncIterator

from faststream import FastStream
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage

from schemas.forwarding import Router
from schemas.task import TaskSpec
from services.student.calibration_record import as_served, record_mismatch
from services.student.engine import Classifier, EngineConfig
from services.student.shared_engine import started_classifier
from services.stream.drift_log import drift_tracker
from services.stream.feedback_lane import FeedbackLane
from services.stream.kafka_io import InFlightBatch, commit_before_revoke, group_batch_options, report_lag
from services.stream.pipeline import EscalationConfig, InboundRecord, Outcome, TicketPipeline
from services.stream.teacher_lane import TeacherWorker
from services.logs import configure_logging, log_context
from services.settings import Settings

log = logging.getLogger(__name__)


class TriageService:
    """Owns the broker, the subscribers and the resources one replica needs."""

    def __init__(
        self,
        settings: Settings,
        *,
        classifier: Classifier | None = None,
        teacher: Any | None = None,
        training_log: Any | None = None,
        metrics: Any | None = None,
        broker: KafkaBroker | None = None,
        router: Router | None = None,
        name: str | None = None,
    ) -> None:
        """`broker`, `router`, `name`: a task of a multi-task process (services/stream/swarm.py),
        which owns the broker, the engine (`shared_engine`) and the metrics server."""
        if settings.embedded_broker:
            raise ValueError("TRIAGE_BOOTSTRAP_SERVERS is empty: start a broker (triage demo does)")
        self.settings = settings
        self.task = TaskSpec.from_file(settings.task_path)
        self.name = name or self.task.name
        if router is not None:
            router.check(self.task)
        self.router = router
        self.runs_student = settings.role in ("all", "student")
        self._injected = {"classifier": classifier}
        self.shared_engine: Any = None  # set by the multi-task process before `resources()`
        if metrics is None:
            from services.stream.metrics import ServiceMetrics

            metrics = ServiceMetrics()
        self.metrics = metrics
        # windows of the stream vs the live adapter's distil: a metric, a log line, `triage status`
        self.drift = drift_tracker(settings, metrics, unit="tickets" if self.runs_student else "teacher", name=self.name)
        self.pipeline: TicketPipeline | None = None
        self.metrics_port: int | None = None
        # Who answered: sent as the `triage-replica` header on every outcome (pod name in k8s).
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}"
        self._swap_lock = asyncio.Lock()
        self.exit_code = 0  # what `triage serve` exits with: non-zero when this replica broke
        self._failed_attempts = 0  # consecutive failed attempts of the current batch
        self._dead: str | None = None  # why this replica stopped itself (readiness stays false)
        self._refused: str | None = None  # the adapter id whose last swap failed (logged once)
        # acks="all": a result counts as published only once every in-sync replica has it.
        self.broker = broker or KafkaBroker(settings.bootstrap_servers, acks="all", logger=log)
        self.subscriber: Any = None
        if self.runs_student:
            # Manual commits: only after every outcome of the batch is acknowledged.
            self._in_flight = InFlightBatch()
            self.subscriber = self.broker.subscriber(
                settings.tickets_topic, group_id=settings.consumer_group, **group_batch_options(settings),
                listener=commit_before_revoke(self._in_flight, settings.rebalance_batch_wait_s))
            self.subscriber(self._handle_batch)
            # No group: every replica sees every control message (hot-swap now, not at next poll).
            self.control = self.broker.subscriber(settings.control_topic, auto_offset_reset="latest")
            self.control(self._handle_control)
        self.worker: TeacherWorker | None = None
        self.feedback: FeedbackLane | None = None  # people's corrections, beside the log's writer
        if settings.role in ("all", "teacher"):
            self.worker = TeacherWorker(self.broker, settings, self.task, metrics, replica_id=self.replica_id,
                                        teacher=teacher, training_log=training_log, router=router,
                                        drift=self.drift)
            self.feedback = FeedbackLane(self.broker, settings, self.task, metrics, replica_id=self.replica_id,
                                         training_log=training_log)
        self.app: Any = None
        if broker is None:  # a task of a multi-task process runs in that process's app
            self.app = FastStream(self.broker, lifespan=self._lifespan, logger=log)
            if self.worker is not None:  # before the consumer closes: commit what is finished
                self.app.on_shutdown(self.worker.stop)

    # ---- lifecycle ---------------------------------------------------------------------------
    @asynccontextmanager
    async def resources(self) -> AsyncIterator[TicketPipeline | None]:
        s = self.settings
        async with AsyncExitStack() as stack:
            self.metrics.set_ready(False, "starting engine")
            if s.metrics_port:
                from services.stream.metrics import serve_metrics

                self.metrics_port = await stack.enter_async_context(
                    serve_metrics(self.metrics, s.metrics_host, s.metrics_port)
                )
            if self.worker is not None:
                await stack.enter_async_context(self.worker.resources())
            if self.feedback is not None:
                await stack.enter_async_context(self.feedback.resources())
            background = []
            if self.runs_student:
                classifier = self._injected["classifier"]
                if classifier is None:
                    if self.shared_engine is not None:
                        classifier = self.shared_engine.classifier(self.task)
                    else:  # a single-task process: an engine of its own
                        classifier = await stack.enter_async_context(
                            started_classifier(EngineConfig.from_settings(s), self.task))
                    wanted = None
                    try:
                        wanted = self._current_adapter()
                        await classifier.use_adapter(wanted)
                    except Exception:
                        # A broken adapter, or one trained for another version of the task (a
                        # label changed), must not stop the service (nor the other tasks): this
                        # task serves the base model (uncalibrated: its tickets escalate) and
                        # the registry watch retries the adapter at every poll.
                        self._refused = getattr(wanted, "adapter_id", None)
                        log.exception("task %s: the registry's current adapter failed to load; serving "
                                      "the base model until it loads", self.name)
                self.pipeline = TicketPipeline(
                    classifier=classifier,
                    escalation=EscalationConfig(s.confidence_threshold, s.eval_share, s.eval_share_cold),
                    metrics=self.metrics,
                    max_message_bytes=s.max_message_bytes,
                    max_text_chars=s.max_text_chars,
                    dead_letter_copy_bytes=s.dead_letter_copy_bytes,
                    router=self.router,
                    drift=self.drift,
                )
                self.metrics.set_live_adapter(getattr(classifier.live_adapter, "adapter_id", None))
                self._note_engine(classifier)
                background.append(asyncio.create_task(self._watch_registry(), name="registry-watch"))
            background.append(asyncio.create_task(self._watch_consumer(), name="consumer-watch"))
            try:
                yield self.pipeline
            finally:
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                self.metrics.set_ready(False, "stopped")

    @asynccontextmanager
    async def _lifespan(self) -> AsyncIterator[None]:
        async with self.resources():
            yield

    @asynccontextmanager
    async def running(self) -> AsyncIterator[TriageService]:
        """Run in the current event loop (tests, demo): resources, then consume."""
        async with consuming(self.resources(), self.app):
            yield self

    # ---- the hot path --------------------------------------------------------------------
    async def _handle_batch(self, msg: KafkaMessage) -> None:
        with self._in_flight.running():  # a rebalance waits for this batch's commit
            await self._handle_batch_in_flight(msg)

    async def _handle_batch_in_flight(self, msg: KafkaMessage) -> None:
        assert self.pipeline is not None
        arrived = time.monotonic()
        raw = msg.raw_message if isinstance(msg.raw_message, tuple) else (msg.raw_message,)
        records = [
            InboundRecord(r.value, r.key, r.topic, r.partition, r.offset, arrived, r.timestamp) for r in raw
        ]
        self.metrics.ticket_consumed(len(records))
        with log_context(topic=records[0].topic, partition=_span({r.partition for r in records}),
                         offsets=_span({r.offset for r in records}),
                         adapter_id=getattr(self.pipeline.classifier.live_adapter, "adapter_id", None)):
            try:
                outcomes = await self.pipeline.process(records)
                outcomes = await self._publish(outcomes)
            except Exception as exc:
                await self._batch_failed(msg, len(records), exc)
                return
        self._failed_attempts = 0
        self.metrics.set_retry_streak(0)
        await msg.ack()  # commit: every record of this batch has an acknowledged outcome
        now_wall = time.time()
        for outcome in outcomes:
            record = outcome.record
            if outcome.kind == "dead_letter":
                self.metrics.dead_lettered(_reason(outcome))
            elif outcome.kind == "result":
                e2e = max(0.0, now_wall - record.timestamp_ms / 1000) if record.timestamp_ms else None
                self.metrics.observe_result(outcome.route, outcome.confidence, e2e)
            elif outcome.kind == "forward":
                self.metrics.forwarded_to(outcome.route)
            elif outcome.route == "escalation":  # its result comes from the teacher worker
                self.metrics.observe_confidence(outcome.confidence)

    async def _batch_failed(self, msg: KafkaMessage, size: int, exc: BaseException) -> None:
        """Rewind and retry with exponential backoff; past the cap (or with a dead engine),
        crash-only: stop, uncommitted, and let the orchestrator restart the replica. One log
        line per failed attempt, the traceback only for the first failure of a streak."""
        s = self.settings
        self._failed_attempts += 1
        reason = type(exc).__name__
        self.metrics.batch_failed(reason)
        self.metrics.set_retry_streak(self._failed_attempts)
        log.error("batch of %d failed (%s: %s); attempt %d of %d, rewinding to retry", size, reason,
                  str(exc)[:300], self._failed_attempts, s.batch_max_attempts,
                  exc_info=exc if self._failed_attempts == 1 else None, extra={"attempt": self._failed_attempts})
        await msg.nack()  # seek back: the same records come again, nothing is skipped
        if _engine_dead(exc):
            # A dead vLLM engine does not come back in-process: no point in backing off.
            self._crash("student engine is dead")
        elif self._failed_attempts >= s.batch_max_attempts:
            self._crash(f"batch failed {self._failed_attempts} times in a row ({reason})")
        else:
            await asyncio.sleep(min(s.batch_retry_max_s, s.batch_retry_base_s * 2 ** (self._failed_attempts - 1)))

    def _crash(self, why: str) -> None:
        log.critical("%s; shutting down for a restart (nothing of the batch was committed)", why)
        self._dead = why
        self.metrics.set_ready(False, why)
        self.exit_code = 1
        os.kill(os.getpid(), signal.SIGTERM)

    async def _publish(self, outcomes: list[Outcome]) -> list[Outcome]:
        from services.stream.publisher import publish_outcomes

        assert self.pipeline is not None
        return await publish_outcomes(
            self.broker, outcomes, replica_id=self.replica_id,
            topics={"result": self.settings.results_topic, "dead_letter": self.settings.dead_letter_topic,
                    "escalation": self.settings.escalations_topic},
            dead_letter=self.pipeline.dead_letter,
        )

    # ---- adapters ------------------------------------------------------------------------
    def _registry(self) -> Any:
        from services.student.registry import AdapterRegistry

        return AdapterRegistry(self.settings.registry_dir)

    def _current_adapter(self) -> Any:
        try:
            return self._registry().current()
        except FileNotFoundError:
            return None

    async def reload_adapter(self) -> bool:
        """Swap to the registry's current adapter if it changed. True if a swap happened."""
        assert self.pipeline is not None
        async with self._swap_lock:
            wanted = await asyncio.to_thread(self._current_adapter)
            live = self.pipeline.classifier.live_adapter
            # The same id with a new threshold (registry.add re-calibrated it) is a swap too;
            # compared as served (a threshold certified on another engine is refused).
            served = as_served(wanted, getattr(self.pipeline.classifier, "config", None))
            if all(getattr(served, k, None) == getattr(live, k, None) for k in ("adapter_id", "threshold")):
                return False
            try:
                await self.pipeline.classifier.use_adapter(wanted)
            except Exception:
                # Retried at every poll (a load can fail transiently); the traceback once per id.
                again = self._refused == getattr(wanted, "adapter_id", None)
                self._refused = getattr(wanted, "adapter_id", None)
                log.log(logging.DEBUG if again else logging.ERROR, "hot-swap to %s failed; keeping %s",
                        wanted, live, exc_info=not again)
                return False
            self._refused = None
            new_id = getattr(wanted, "adapter_id", None)
            log.info("hot-swapped adapter %s -> %s", getattr(live, "adapter_id", None), new_id)
            self.metrics.adapter_swapped(new_id)
            self._note_calibration()
            return True

    def _note_engine(self, classifier: Any) -> None:
        """The serving dtype: in the log, a metric label and /readyz (bench figures name it)."""
        config = getattr(classifier, "config", None)
        if config is None:  # an injected test classifier
            return
        log.info("task %s: student engine dtype %s (%s)", self.name, config.dtype, config.dtype_why)
        self.metrics.set_engine(config.dtype, config.dtype_why)
        self._note_calibration()

    def _note_calibration(self) -> None:
        """A live adapter whose threshold was refused (certified on another engine) is said on
        /readyz and as a metric until one certified here is live."""
        assert self.pipeline is not None
        classifier = self.pipeline.classifier  # as_served keeps the stored record in .meta
        self.metrics.set_threshold_refused(record_mismatch(classifier.live_adapter, getattr(classifier, "config", None)))

    async def _handle_control(self, body: Any) -> None:
        """`triage promote|rollback|distill` publish a reload command (kafka_io.reload_command)
        once `current` moved: swap now instead of at the next registry poll. A command for
        another task of the process is not this one's."""
        if isinstance(body, dict) and body.get("action") == "reload_adapter" and body.get("task") in (None, self.name):
            await self.reload_adapter()

    async def _watch_registry(self) -> None:
        while True:
            await asyncio.sleep(self.settings.registry_poll_s)
            with contextlib.suppress(Exception):
                await self.reload_adapter()

    # ---- background: lag, readiness ---------------------------------------------------------
    async def _watch_consumer(self) -> None:
        reported: set[Any] = set()
        while self.subscriber is None:  # teacher worker only: ready once it has partitions
            assigned = self.worker.assigned() if self.worker is not None else 0
            self.metrics.set_ready(bool(assigned), f"teacher worker; {assigned} partitions assigned"
                                   if assigned else "waiting for partition assignment")
            await asyncio.sleep(1.0)
        while True:
            reported = assignment = await report_lag(getattr(self.subscriber, "consumer", None),
                                                     self.metrics, reported)
            if self._dead is not None:
                self.metrics.set_ready(False, self._dead)  # never ready again: a restart is due
            elif assignment:
                self.metrics.set_ready(True, f"engine warm; {len(assignment)} partitions assigned")
            else:
                self.metrics.set_ready(False, "waiting for partition assignment")
            if self._dead is not None:
                return
            await asyncio.sleep(1.0)


@asynccontextmanager
async def consuming(resources: Any, app: FastStream) -> AsyncIterator[None]:
    """Enter `resources` (an async context manager), then start the app's subscribers in the
    current event loop; stop them before the resources close."""
    async with resources:
        await app.start()
        try:
            yield
        finally:
            await app.stop()


def _engine_dead(exc: BaseException | None) -> bool:
    """vLLM's EngineDeadError (a subclass, or the cause of a wrapper) anywhere in the chain;
    by name, so the stream needs no vLLM import."""
    for _ in range(8):  # a bounded walk: a cause chain can be cyclic
        if exc is None:
            return False
        if any(t.__name__ == "EngineDeadError" for t in type(exc).__mro__):
            return True
        exc = exc.__cause__
    return False


def _span(values: set[int]) -> str:
    return str(min(values)) if len(values) == 1 else f"{min(values)}-{max(values)}"


def _reason(outcome: Outcome) -> str:
    import json

    return json.loads(outcome.payload).get("reason", "unknown")


def build_app(settings: Settings, **overrides: Any) -> FastStream:
    return TriageService(settings, **overrides).app


def create_app() -> FastStream:
    """Factory for `faststream run services.stream.app:create_app --factory`."""
    settings = Settings()
    configure_logging(settings.log_level, settings.log_format)
    return build_app(settings)
