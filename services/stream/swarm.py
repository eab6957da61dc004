"""Several tasks in one process: one Kafka connection, one vLLM engine, one adapter per task.

    TRIAGE_DEPLOYMENT_PATH=deploy/tasks.json triage serve

Each task of the deployment (services/deployment.py) is a `TriageService` with its own
topics, consumer groups, pipeline, teacher worker, registry and training log; they share the
broker connection and a `StudentEngine` (multi-LoRA: every task's requests carry its own
adapter, and vLLM batches them into the same forward passes). A hot-swap, promotion or
rollback moves one task's adapter and nothing else.

A task whose TaskSpec (or route) fails to load is left out: its readiness (`/readyz/<task>`,
`triage_ready{task=...}`) is false with the reason, while the other tasks serve. Failures of
the shared parts (the engine dying, the broker) are the process's: it stops for a restart.
"""

from __future__ import annotations

import logging
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from typing import Any, AsyncIterator

from faststream import FastStream
from faststream.kafka import KafkaBroker

from schemas.task import TaskSpec
from services.deployment import Deployment
from services.settings import Settings
from services.stream.app import TriageService, consuming
from services.stream.kafka_io import TopicSpec, merge_plans, plan_topics

log = logging.getLogger(__name__)


class SwarmService:
    def __init__(self, settings: Settings, deployment: Deployment, *, teacher: Any | None = None,
                 engine: Any | None = None) -> None:
        """`teacher`: one injected teacher for every task, `engine`: a started StudentEngine
        (tests); normally each task builds its own teacher client and the process its engine."""
        from services.stream.metrics import ServiceMetrics

        if settings.embedded_broker:
            raise ValueError("TRIAGE_BOOTSTRAP_SERVERS is empty: start a broker (triage demo does)")
        self.settings, self.deployment = settings, deployment.check_unique(settings)  # the file's error: stop
        self.broker = KafkaBroker(settings.bootstrap_servers, acks="all", logger=log)
        self.services: dict[str, TriageService] = {}
        self.failed: dict[str, str] = {}  # task -> why it is not running
        self.metrics: dict[str, ServiceMetrics] = {}
        inputs = {}  # task -> the ticket fields it declares: what a router may forward to it as is
        for entry in deployment.tasks:
            try:
                spec = TaskSpec.from_file(deployment.task_settings(settings, entry.name).task_path)
                inputs[entry.name] = frozenset(i.name for i in spec.inputs)
            except Exception:
                pass  # reported below, when the task itself is built
        for entry in deployment.tasks:
            metrics = self.metrics[entry.name] = ServiceMetrics()
            try:
                task_settings = deployment.task_settings(settings, entry.name).model_copy(update={"metrics_port": 0})
                self.services[entry.name] = TriageService(
                    task_settings, broker=self.broker, metrics=metrics, name=entry.name, teacher=teacher,
                    router=deployment.router(settings, entry.name, inputs))
            except Exception as exc:  # this task only: the others still serve
                why = f"{type(exc).__name__}: {str(exc)[:300]}"
                self.failed[entry.name] = why
                metrics.set_ready(False, f"task failed to load: {why}")
                log.error("task %s failed to load and is not served: %s", entry.name, why)
        self.engine: Any = engine
        self.metrics_port: int | None = None
        self.app = FastStream(self.broker, lifespan=self._lifespan, logger=log)
        for service in self.services.values():
            if service.worker is not None:  # before the consumers close: commit what is finished
                self.app.on_shutdown(service.worker.stop)

    @property
    def exit_code(self) -> int:
        return max((s.exit_code for s in self.services.values()), default=1)

    def hub(self) -> Any:
        from services.stream.metrics_hub import TaskMetricsHub

        return TaskMetricsHub(self.metrics, self.failed)

    @asynccontextmanager
    async def resources(self) -> AsyncIterator[SwarmService]:
        from services.student.engine import EngineConfig

        s = self.settings
        async with AsyncExitStack() as stack:
            if s.metrics_port:
                from services.stream.metrics import serve_metrics

                hub = self.hub()
                self.metrics_port = await stack.enter_async_context(
                    serve_metrics(hub, s.metrics_host, s.metrics_port, hub.readiness, task_readiness=hub.task_readiness))
            if self.engine is None and any(service.runs_student for service in self.services.values()):
                from services.student.shared_engine import StudentEngine

                config = EngineConfig.from_settings(s)
                if s.max_loras is None:
                    config = replace(config, max_loras=self.deployment.engine_loras())
                self.engine = await stack.enter_async_context(StudentEngine.started(config))
            for name, service in self.services.items():
                service.shared_engine = self.engine
                await stack.enter_async_context(service.resources())
                log.info("task %s serving %s -> %s (adapter %s)", name, service.settings.tickets_topic,
                         service.settings.results_topic, _adapter_id(service))
            yield self

    @asynccontextmanager
    async def _lifespan(self) -> AsyncIterator[None]:
        async with self.resources():
            yield

    @asynccontextmanager
    async def running(self) -> AsyncIterator[SwarmService]:
        """Run in the current event loop (tests, demo): resources, then consume."""
        async with consuming(self.resources(), self.app):
            yield self


def _adapter_id(service: TriageService) -> str:
    pipeline = service.pipeline
    adapter = pipeline.classifier.live_adapter if pipeline is not None else None
    return getattr(adapter, "adapter_id", None) or "base model"


def plan_task_topics(settings: Settings, deployment: Deployment) -> dict[str, TopicSpec]:
    """Every task's topics as `plan_topics` makes them (each task's results compacted; the
    control topic, process-wide, one partition), as one plan for `--create-topics`."""
    deployment.check_unique(settings)  # before anything is created
    return merge_plans(plan_topics(deployment.task_settings(settings, entry.name, with_key=False))
                       for entry in deployment.tasks)


def all_task_topics(settings: Settings, deployment: Deployment) -> list[str]:
    """Every topic of every task (the demo, tests)."""
    return list(plan_task_topics(settings, deployment))
