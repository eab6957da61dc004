"""The one wiring place: settings (+ optional overrides) -> a runnable FastStream service.

    faststream run services.stream.app:create_app --factory     # or: triage serve

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

from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage

from schemas.task import TaskSpec
from services.student.engine import Classifier, EngineConfig, VllmClassifier
from services.stream.pipeline import EscalationConfig, InboundRecord, Outcome, TicketPipeline
from services.logs import configure_logging, log_context
from services.settings import Settings

log = logging.getLogger(__name__)


class TriageService:
    """Owns the broker, the subscriber and the resources one replica needs."""

    def __init__(
        self,
        settings: Settings,
        *,
        classifier: Classifier | None = None,
        teacher: Any | None = None,
        training_log: Any | None = None,
        metrics: Any | None = None,
    ) -> None:
        if settings.embedded_broker:
            raise ValueError("TRIAGE_BOOTSTRAP_SERVERS is empty: start a broker (triage demo does)")
        self.settings = settings
        self.task = TaskSpec.from_file(settings.task_path)
        self._injected = {"classifier": classifier, "teacher": teacher, "training_log": training_log}
        if metrics is None:
            from services.stream.metrics import ServiceMetrics

            metrics = ServiceMetrics()
        self.metrics = metrics
        self.pipeline: TicketPipeline | None = None
        self.metrics_port: int | None = None
        # Who answered: sent as the `triage-replica` header on every outcome (pod name in k8s).
        self.replica_id = f"{socket.gethostname()}:{os.getpid()}"
        self._swap_lock = asyncio.Lock()
        self.exit_code = 0  # what `triage serve` exits with: non-zero when this replica broke
        self._failing_since: float | None = None  # first failure of the current retry streak
        # acks="all": a result counts as published only once every in-sync replica has it.
        self.broker = KafkaBroker(settings.bootstrap_servers, acks="all", logger=log)
        self.subscriber = self.broker.subscriber(
            settings.tickets_topic,
            group_id=settings.consumer_group,
            batch=True,
            max_records=settings.max_batch,
            batch_timeout_ms=settings.batch_timeout_ms,
            auto_offset_reset="earliest",
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            ack_policy=AckPolicy.MANUAL,  # commit only after every outcome is acknowledged
        )
        self.subscriber(self._handle_batch)
        # No group: every replica sees every control message (hot-swap now, not at next poll).
        self.control = self.broker.subscriber(settings.control_topic, auto_offset_reset="latest")
        self.control(self._handle_control)
        self.app = FastStream(self.broker, lifespan=self._lifespan, logger=log)

    # ---- lifecycle ---------------------------------------------------------------------------
    @asynccontextmanager
    async def resources(self) -> AsyncIterator[TicketPipeline]:
        s = self.settings
        async with AsyncExitStack() as stack:
            self.metrics.set_ready(False, "starting engine")
            if s.metrics_port:
                from services.stream.metrics import serve_metrics

                self.metrics_port = await stack.enter_async_context(
                    serve_metrics(self.metrics, "0.0.0.0", s.metrics_port)
                )
            classifier = self._injected["classifier"]
            if classifier is None:
                classifier = await stack.enter_async_context(
                    VllmClassifier.started(EngineConfig.from_settings(s), self.task, self._current_adapter())
                )
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
            self.pipeline = TicketPipeline(
                classifier=classifier,
                teacher=teacher,
                training_log=training_log,
                escalation=EscalationConfig(s.confidence_threshold, s.audit_rate),
                metrics=self.metrics,
                max_message_bytes=s.max_message_bytes,
                max_text_chars=s.max_text_chars,
            )
            self.metrics.set_live_adapter(getattr(classifier.live_adapter, "adapter_id", None))
            stack.push_async_callback(self.pipeline.wait_for_audits)
            background = [
                asyncio.create_task(self._watch_registry(), name="registry-watch"),
                asyncio.create_task(self._drain_backlog_forever(), name="backlog-drain"),
                asyncio.create_task(self._watch_consumer(), name="consumer-watch"),
            ]
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
        async with self.resources():
            await self.app.start()
            try:
                yield self
            finally:
                await self.app.stop()

    # ---- the hot path --------------------------------------------------------------------
    async def _handle_batch(self, msg: KafkaMessage) -> None:
        assert self.pipeline is not None
        arrived = time.monotonic()
        raw = msg.raw_message if isinstance(msg.raw_message, tuple) else (msg.raw_message,)
        records = [
            InboundRecord(r.value, r.key, r.topic, r.partition, r.offset, arrived) for r in raw
        ]
        self.metrics.ticket_consumed(len(records))
        with log_context(topic=records[0].topic, partition=_span({r.partition for r in records}),
                         offsets=_span({r.offset for r in records}),
                         adapter_id=getattr(self.pipeline.classifier.live_adapter, "adapter_id", None)):
            try:
                outcomes = await self.pipeline.process(records)
                await self._publish(outcomes)
            except Exception as exc:
                await self._batch_failed(msg, len(records), exc)
                return
        self._failing_since = None
        await msg.ack()  # commit: every record of this batch has an acknowledged outcome
        now_wall = time.time()
        for outcome, record in zip(outcomes, raw):
            if outcome.kind == "dead_letter":
                self.metrics.dead_lettered(_reason(outcome))
            else:
                e2e = max(0.0, now_wall - record.timestamp / 1000) if record.timestamp else None
                self.metrics.observe_result(outcome.route, outcome.confidence, e2e)

    async def _batch_failed(self, msg: KafkaMessage, size: int, exc: BaseException) -> None:
        """Rewind and retry later: one log line per failed attempt, the traceback only for the
        first failure of a streak."""
        first = self._failing_since is None
        if first:
            self._failing_since = time.monotonic()
        log.error("batch of %d failed (%s: %s); rewinding to retry", size, type(exc).__name__,
                  str(exc)[:300], exc_info=exc if first else None)
        await msg.nack()  # seek back: the same records come again, nothing is skipped
        if type(exc).__name__ == "EngineDeadError":
            # Crash-only: a dead vLLM engine does not come back in-process. Stop cleanly
            # (nothing of this batch was committed) and let the orchestrator restart us.
            log.critical("student engine is dead; shutting down for a restart")
            self.metrics.set_ready(False, "engine dead")
            self.exit_code = 1
            os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(1.0)

    async def _publish(self, outcomes: list[Outcome]) -> None:
        s = self.settings
        pending = []
        for outcome in outcomes:
            topic = s.results_topic if outcome.kind == "result" else s.dead_letter_topic
            pending.append(
                await self.broker.publish(
                    outcome.payload, topic, key=outcome.key,
                    headers={"content-type": "application/json", "triage-replica": self.replica_id},
                    no_confirm=True,
                )
            )
        await asyncio.gather(*pending)  # broker acks for all, or raise

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
            if getattr(wanted, "adapter_id", None) == getattr(live, "adapter_id", None):
                return False
            try:
                await self.pipeline.classifier.use_adapter(wanted)
            except Exception:
                log.exception("hot-swap to %s failed; keeping %s", wanted, live)
                return False
            new_id = getattr(wanted, "adapter_id", None)
            log.info("hot-swapped adapter %s -> %s", getattr(live, "adapter_id", None), new_id)
            self.metrics.adapter_swapped(new_id)
            return True

    async def _handle_control(self, body: Any) -> None:
        if isinstance(body, dict) and body.get("action") == "reload_adapter":
            await self.reload_adapter()

    async def _watch_registry(self) -> None:
        while True:
            await asyncio.sleep(self.settings.registry_poll_s)
            with contextlib.suppress(Exception):
                await self.reload_adapter()

    # ---- background: backlog, lag, readiness ---------------------------------------------
    async def _drain_backlog_forever(self) -> None:
        assert self.pipeline is not None
        while True:
            await asyncio.sleep(2.0)
            try:
                while await self.pipeline.drain_backlog() > 0:
                    pass
            except Exception:
                log.exception("backlog drain failed; will retry")

    async def _watch_consumer(self) -> None:
        reported: set[Any] = set()
        while True:
            consumer = getattr(self.subscriber, "consumer", None)
            assignment = set(consumer.assignment()) if consumer is not None else set()
            for tp in reported - assignment:  # revoked by a rebalance: not ours to report
                self.metrics.remove_lag(tp.topic, tp.partition)
            reported = assignment
            if assignment:
                self.metrics.set_ready(True, f"engine warm; {len(assignment)} partitions assigned")
                for tp in assignment:
                    high = consumer.highwater(tp)
                    if high is not None:
                        with contextlib.suppress(Exception):
                            self.metrics.set_lag(tp.topic, tp.partition, high - await consumer.position(tp))
            else:
                self.metrics.set_ready(False, "waiting for partition assignment")
            await asyncio.sleep(1.0)


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
