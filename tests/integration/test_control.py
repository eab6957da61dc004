"""`triage promote` / `rollback` with Kafka configured publish a reload command on the control
topic, and a running replica swaps on it at once (its registry poll is set to an hour here,
so nothing else can make it swap)."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from services.settings import Settings
from services.stream.app import TriageService
from services.stream.kafka_io import announce_reload, create_topics, plan_topics
from services.student.registry import AdapterRegistry
from tests.unit.test_reload_command import FakeClassifier, make_adapter

pytestmark = pytest.mark.integration


async def until(predicate, timeout_s: float = 15.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_promote_and_rollback_reach_running_replicas_through_the_control_topic(
        kafka_bootstrap, tmp_path, monkeypatch, capsys):
    from services.cli import main

    suffix = uuid.uuid4().hex[:8]
    topics = {f"TRIAGE_{role.upper()}_TOPIC": f"{role}-{suffix}"
              for role in ("tickets", "results", "dead_letter", "control", "escalations")}
    env = {**topics, "TRIAGE_BOOTSTRAP_SERVERS": kafka_bootstrap, "TRIAGE_REGISTRY_DIR": str(tmp_path / "registry"),
           "TRIAGE_REGISTRY_POLL_S": "3600", "TRIAGE_ROLE": "student", "TRIAGE_METRICS_PORT": "0",
           "TRIAGE_CONSUMER_GROUP": f"triage-{suffix}", "TRIAGE_SESSION_TIMEOUT_MS": "3000",
           "TRIAGE_HEARTBEAT_INTERVAL_MS": "500"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # what the CLI reads; the service gets the same settings
    settings = Settings(_env_file=None)
    await create_topics(kafka_bootstrap, plan_topics(settings))
    registry = AdapterRegistry(settings.registry_dir)
    a = registry.add(make_adapter(tmp_path / "a", b"weights a"))
    fake = FakeClassifier()
    async with TriageService(settings, classifier=fake).running() as service:
        consumer = service.control.consumer  # no group: every replica reads every command
        assert await until(lambda: bool(consumer.assignment()))
        for tp in consumer.assignment():
            await consumer.position(tp)  # "latest" resolved: a command sent now is read

        assert await asyncio.to_thread(main, ["promote", a.adapter_id]) == 0
        assert await until(lambda: fake.swaps == [a.adapter_id])
        assert "reload_adapter sent on control-" in capsys.readouterr().out

        registry.rollback("moved without a command")  # as a hand edit: the hour-long poll would see it
        await announce_reload(kafka_bootstrap, settings.control_topic, task="another-task", adapter_id=None)
        await asyncio.sleep(1.5)
        assert fake.swaps == [a.adapter_id]  # another task's command: not this replica's

        registry.promote(a.adapter_id, "again")
        assert await asyncio.to_thread(main, ["rollback"]) == 0
        assert await until(lambda: fake.swaps == [a.adapter_id, None])
    assert service.metrics.adapter_swaps._value.get() == 2
