"""Shared fixtures: a real Tansu broker, the real student engine (one per session), settings.

Integration tests share ONE vLLM engine: it takes ~50 s to start on 2 CPU cores.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def kafka_bootstrap():
    from services.dev.broker import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield broker.bootstrap_servers


@pytest.fixture(scope="session")
def student_model_path() -> Path:
    from services.student.model_store import ensure_student_model

    return ensure_student_model()


@pytest.fixture(scope="session")
def task():
    from schemas.task import TaskSpec, default_task_path

    return TaskSpec.from_file(default_task_path())


@pytest.fixture(scope="session")
async def student_engine(student_model_path):
    """The real vLLM engine on SmolLM2-135M (multi-LoRA: room for several tasks' adapters)."""
    from services.student.engine import EngineConfig
    from services.student.shared_engine import StudentEngine

    config = EngineConfig(model_path=student_model_path, max_num_seqs=128, max_loras=4)
    async with StudentEngine.started(config) as engine:
        yield engine


@pytest.fixture(scope="session")
async def student(student_engine, task):
    """The BANKING77 classifier on the shared engine, base model (no adapter)."""
    return student_engine.classifier(task)


@pytest.fixture
def make_settings(kafka_bootstrap, tmp_path, student_model_path):
    """Settings isolated per test: own topics, group, registry and data dirs."""
    from services.settings import Settings

    def factory(**overrides):
        suffix = uuid.uuid4().hex[:8]
        values = dict(
            bootstrap_servers=kafka_bootstrap,
            tickets_topic=f"tickets-{suffix}",
            results_topic=f"results-{suffix}",
            dead_letter_topic=f"dlq-{suffix}",
            control_topic=f"control-{suffix}",
            escalations_topic=f"escalations-{suffix}",
            consumer_group=f"triage-{suffix}",
            teacher_consumer_group=f"teacher-{suffix}",
            session_timeout_ms=3000,
            heartbeat_interval_ms=500,
            topic_partitions=2,
            metrics_port=0,
            model_path=student_model_path,
            registry_dir=tmp_path / "registry",
            data_dir=tmp_path / "data",
            registry_poll_s=0.5,
        )
        values.update(overrides)
        return Settings(_env_file=None, **values)

    return factory


async def create_topics(settings) -> None:
    """The topics as `triage serve --create-topics` makes them (results compacted, control 1 partition)."""
    from services.stream import kafka_io

    await kafka_io.create_topics(settings.bootstrap_servers, kafka_io.plan_topics(settings))


def make_lora(model_path, out_dir, seed: int, task=None, threshold: float | None = 0.0, rank: int = 8) -> None:
    """A real PEFT LoRA adapter with random (non-zero) weights, registrable and servable for
    `task` (default BANKING77): its metadata carries the compact prompt's fingerprint, as the
    trainer writes it. threshold 0.0 = calibrated to accept everything."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from schemas.task import TaskSpec, default_task_path
    from services.student.prompting import PromptStyle, build_all_codes, prompt_fingerprint
    from services.student.calibration_record import engine_record
    from services.student.engine import EngineConfig
    from services.student.registry import write_meta

    task = task or TaskSpec.from_file(default_task_path())
    codes = build_all_codes(task, AutoTokenizer.from_pretrained(model_path))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out_dir)
    write_meta(out_dir, {
        "base_model": str(model_path), "prompt_style": "compact",
        "task": {"name": task.name,
                 "prompt_fingerprint": prompt_fingerprint(task, PromptStyle.compact, list(codes.values()))},
        # certified, as the trainer records it, on the engine the tests serve with (dtype auto)
        "threshold": None if threshold is None else {
            "value": threshold, "engine": engine_record(EngineConfig(model_path=Path(model_path)))},
    })


async def wait_until(condition, timeout_s: float, what: str) -> None:
    """Poll `condition` every 50 ms; fail the test after `timeout_s`."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def committed_total(bootstrap: str, group_id: str, topic: str, partitions: int) -> int:
    """Sum of a group's committed offsets over a topic's partitions (0 where none)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group_id, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        return sum([(await consumer.committed(tp)) or 0 for tp in parts])
    finally:
        await consumer.stop()
