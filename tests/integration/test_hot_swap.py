"""Promotion -> the running service answers with the new adapter, without a restart or loss."""

from __future__ import annotations

import asyncio
import json

import pytest

from schemas.classification import Classification
from services.stream.app import TriageService
from services.dev.datasets import load_split
from services.stream.kafka_io import produce, read_topic, ticket_message, unique_keys
from services.student.registry import AdapterRegistry
from tests.conftest import create_topics, make_lora

pytestmark = pytest.mark.integration


async def _stream(settings, ids_and_texts):
    await produce(settings.bootstrap_servers, settings.tickets_topic,
                  [ticket_message(tid, text) for tid, text in ids_and_texts])


async def test_promotion_hot_swaps_without_restart_or_loss_and_rollback_restores(
    make_settings, student, student_model_path, tmp_path
):
    settings = make_settings(max_batch=4, registry_poll_s=0.3)
    await create_topics(settings)
    registry = AdapterRegistry(settings.registry_dir)
    make_lora(student_model_path, tmp_path / "cand", seed=1)
    rows = load_split("test")[400:430]
    first, second, third = rows[:10], rows[10:20], rows[20:30]
    try:
        async with TriageService(settings, classifier=student).running() as service:
            await _stream(settings, [(f"pre-{i}", r.text) for i, r in enumerate(first)])
            # Promote while the first tickets may still be in flight.
            ref = registry.add(tmp_path / "cand")
            registry.promote(ref.adapter_id, reason="test")
            for _ in range(100):
                if getattr(student.live_adapter, "adapter_id", None) == ref.adapter_id:
                    break
                await asyncio.sleep(0.1)
            assert student.live_adapter.adapter_id == ref.adapter_id
            await _stream(settings, [(f"post-{i}", r.text) for i, r in enumerate(second)])
            got = await read_topic(settings.bootstrap_servers, settings.results_topic,
                                   until=lambda r: len(unique_keys(r)) >= 20, timeout_s=180)
            registry.rollback(reason="test rollback")
            for _ in range(100):
                if student.live_adapter is None:
                    break
                await asyncio.sleep(0.1)
            assert student.live_adapter is None
            await _stream(settings, [(f"back-{i}", r.text) for i, r in enumerate(third)])
            got = await read_topic(settings.bootstrap_servers, settings.results_topic,
                                   until=lambda r: len(unique_keys(r)) >= 30, timeout_s=180)
            swaps = service.metrics.adapter_swaps._value.get()
    finally:
        await student.use_adapter(None)
    results = {r.key.decode(): Classification.model_validate_json(r.value) for r in got}
    assert len(results) == 30  # nothing lost across two swaps
    assert all(results[f"post-{i}"].adapter_id == ref.adapter_id for i in range(10))
    assert all(results[f"post-{i}"].route.value == "student" for i in range(10))  # its threshold
    assert all(results[f"back-{i}"].adapter_id is None for i in range(10))
    assert {results[f"pre-{i}"].adapter_id for i in range(10)} <= {None, ref.adapter_id}
    assert swaps == 2
    assert [h["event"] for h in registry.history()] == ["promote", "rollback"]
    assert json.loads((settings.registry_dir / "current.json").read_text())["adapter_id"] is None
