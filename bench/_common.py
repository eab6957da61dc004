"""Plumbing shared by the benchmarks: engine, embedded broker, the service, producers, a
results collector, percentiles. Loopback traffic only; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

log = logging.getLogger("bench")


def setup(level: str = "WARNING") -> None:
    """Quiet logs and offline model loading, before anything heavy is imported."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("bench").setLevel(logging.INFO)
    for noisy in ("aiokafka", "faststream", "services", "vllm", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)  # FastStream logs every batch at INFO


def say(msg: str) -> None:
    print(msg, flush=True)


def texts(n: int, *, offset: int = 0, split: str = "test") -> list[str]:
    """`n` BANKING77 ticket texts from `offset`, wrapping around the split if needed."""
    from services.dev.datasets import load_split

    rows = load_split(split)
    return [rows[(offset + i) % len(rows)].text for i in range(n)]


def base_settings(**overrides: Any) -> Any:
    """Service settings for a bench run: defaults + overrides, no .env, no environment."""
    from services.settings import Settings

    return Settings(_env_file=None, **overrides)


def served_dtype(settings: Any) -> str:
    """The dtype the engine serves in (`dtype = auto` resolved for this machine)."""
    from services.student.hardware import resolve_dtype

    return resolve_dtype(settings.dtype)[0]


def machine() -> dict[str, Any]:
    """What a figure depends on: cores, the CPU's vector flags (AVX2 / AVX512-BF16 / AMX), GPU."""
    from services.student.hardware import vector_flags

    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                            "platform": platform.platform(), "cpu_flags": vector_flags()}
    try:
        import torch

        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - informational only
        pass
    return info


@asynccontextmanager
async def engine(settings: Any, registry: str | None = None) -> AsyncIterator[Any]:
    """The real vLLM student with the service's own engine settings: the base model, or the
    current adapter of `registry` (e.g. one `triage distill` promoted)."""
    from schemas.task import TaskSpec
    from services.student.engine import EngineConfig
    from services.student.shared_engine import started_classifier
    from services.student.model_store import ensure_student_model
    from services.student.registry import AdapterRegistry

    ensure_student_model(settings.model_path)
    task = TaskSpec.from_file(settings.task_path)
    adapter = AdapterRegistry(Path(registry)).current() if registry else None
    if registry and adapter is None:
        raise SystemExit(f"{registry}: no current adapter")
    async with started_classifier(EngineConfig.from_settings(settings), task, adapter) as classifier:
        yield classifier


async def reset_prefix_cache(classifier: Any) -> bool:
    """Drop vLLM's prefix cache so a second pass over the same prompts gets no free hits.

    Reaches into the classifier's engine: a benchmark concern, not part of the port.
    False (and a warning) if the engine could not reset it.
    """
    engine_ = getattr(classifier, "_engine", None)
    done = False
    if engine_ is not None and hasattr(engine_, "reset_prefix_cache"):
        done = bool(await engine_.reset_prefix_cache())
    if not done:
        log.warning("prefix cache NOT reset: a repeated pass may be faster than a fresh one")
    return done


def model_texts(raw: Sequence[str]) -> list[str]:
    """What the service hands the engine for each ticket (validated, stripped)."""
    from schemas.ticket import Ticket

    return [Ticket(id="x", text=t).full_text() for t in raw]


@dataclass
class Collector:
    """Reads the results topic (no group) and keeps the first arrival time per key."""

    bootstrap: str
    topic: str
    first_seen: dict[bytes, float] = field(default_factory=dict)
    first_route: dict[bytes, str] = field(default_factory=dict)  # route of the first result
    total: int = 0
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> Collector:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=self.bootstrap,
                                    auto_offset_reset="earliest", enable_auto_commit=False,
                                    fetch_max_wait_ms=50)
        await consumer.start()
        self._task = asyncio.create_task(self._run(consumer))
        return self

    async def _run(self, consumer: Any) -> None:
        try:
            while not self._stop.is_set():
                batches = await consumer.getmany(timeout_ms=50, max_records=5000)
                now = time.time()
                for records in batches.values():
                    for r in records:
                        self.total += 1
                        if r.key not in self.first_seen:
                            self.first_seen[r.key] = now
                            self.first_route[r.key] = json.loads(r.value).get("route", "?")
        finally:
            await consumer.stop()

    async def wait_for(self, keys: set[bytes], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if keys <= self.first_seen.keys():
                return True
            await asyncio.sleep(0.05)
        return keys <= self.first_seen.keys()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


@asynccontextmanager
async def service(
    bootstrap: str, classifier: Any, workdir: Path, **overrides: Any
) -> AsyncIterator[tuple[Any, Collector]]:
    """A TriageService on fresh topics (4 partitions) + a results collector, once ready.

    By default no teacher and confidence_threshold 0.0: nothing escalates, every ticket is
    answered by the student, so the figures are the serving path's alone.
    """
    from services.stream.app import TriageService
    from services.stream.kafka_io import create_topics, plan_topics

    suffix = uuid.uuid4().hex[:8]
    values: dict[str, Any] = dict(
        bootstrap_servers=bootstrap,
        tickets_topic=f"bench-tickets-{suffix}",
        results_topic=f"bench-results-{suffix}",
        dead_letter_topic=f"bench-dlq-{suffix}",
        control_topic=f"bench-control-{suffix}",
        escalations_topic=f"bench-escalations-{suffix}",
        consumer_group=f"bench-{suffix}",
        teacher_consumer_group=f"bench-teacher-{suffix}",
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
        topic_partitions=4,
        metrics_port=0,
        confidence_threshold=0.0,
        eval_share=0.0,
        teacher_base_url="",
        registry_dir=workdir / f"registry-{suffix}",
        data_dir=workdir / f"data-{suffix}",
    )
    values.update(overrides)
    settings = base_settings(**values)
    await create_topics(bootstrap, plan_topics(settings))
    svc = TriageService(settings, classifier=classifier)
    collector = await Collector(bootstrap, settings.results_topic).start()
    try:
        async with svc.running():
            deadline = time.monotonic() + 60
            while not svc.metrics.readiness()[0]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"service not ready: {svc.metrics.readiness()[1]}")
                await asyncio.sleep(0.1)
            yield svc, collector
    finally:
        await collector.stop()


def ticket_messages(prefix: str, raw: Sequence[str]) -> list[tuple[bytes, bytes]]:
    from services.stream.kafka_io import ticket_message

    return [ticket_message(f"{prefix}-{i}", t) for i, t in enumerate(raw)]


async def _producer(bootstrap: str, linger_ms: int) -> Any:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=linger_ms, acks="all")
    await producer.start()
    return producer


async def produce_burst(bootstrap: str, topic: str, messages: Sequence[tuple[bytes, bytes]]) -> dict[bytes, float]:
    """Send everything as fast as the producer takes it; key -> send time (time.time())."""
    from services.stream.kafka_io import produce

    return await produce(bootstrap, topic, messages)


async def produce_at_rate(
    bootstrap: str, topic: str, messages: Sequence[tuple[bytes, bytes]], rate: float
) -> dict[bytes, float]:
    """Send message i at t0 + i/rate (open loop: a slow service doesn't slow the producer)."""
    producer = await _producer(bootstrap, linger_ms=0)
    sent_at: dict[bytes, float] = {}
    try:
        futures = []
        t0 = time.monotonic()
        for i, (key, value) in enumerate(messages):
            delay = t0 + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent_at[key] = time.time()
            futures.append(await producer.send(topic, value=value, key=key))
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent_at


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 1))))  # ceil(q * n)
    return ordered[rank - 1]


def write_json(path: str | None, report: dict[str, Any]) -> None:
    text = json.dumps(report, indent=2, default=str)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
        say(f"wrote {path}")
    else:
        say(text)
