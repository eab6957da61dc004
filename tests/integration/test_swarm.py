"""Several tasks in one process on one engine (issue 13), through a real broker.

One SwarmService with five tasks: a router (`desk`, base model, some answers confident, some
escalated) in front of two BANKING77 specialists (`a` with its own LoRA adapter, `b` on the
base model), a task whose TaskSpec does not exist and one whose registry holds an adapter
trained for another TaskSpec. Checked: the broken task fails only its own readiness, the
foreign adapter only falls back to the base model for its task; the router forwards every
ticket exactly once, with the chain in the specialist's result; promoting `a`'s adapter moves
`a` and leaves `b`'s results unchanged (same adapter, same labels), although their requests
share engine steps.
"""

from __future__ import annotations

import asyncio
import json
import math
import uuid
from collections import Counter
from pathlib import Path

import pytest

from schemas.classification import Classification
from services.deployment import Deployment
from services.dev.datasets import load_split
from services.stream.kafka_io import ensure_topics, produce, read_topic, ticket_message
from services.stream.swarm import SwarmService, all_task_topics
from services.student.registry import AdapterRegistry
from tests.conftest import make_lora

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


async def _wait(condition, timeout_s: float = 90.0) -> bool:
    for _ in range(int(timeout_s / 0.2)):
        if condition():
            return True
        await asyncio.sleep(0.2)
    return condition()


async def _results(bootstrap: str, topic: str, want: set[str]) -> dict[str, Classification]:
    got = await read_topic(bootstrap, topic, until=lambda r: want <= {x.key.decode() for x in r}, timeout_s=240)
    return {r.key.decode(): Classification.model_validate_json(r.value) for r in got}  # latest per key


async def test_tasks_share_one_engine_without_touching_each_other(make_settings, student_engine,
                                                                   student_model_path, tmp_path):
    sfx = uuid.uuid4().hex[:6]
    desk, a, b, broken, foreign = (f"{n}-{sfx}" for n in ("desk", "a", "b", "broken", "foreign"))
    intents = str(REPO / "schemas/tasks/banking77.json")
    deployment = Deployment.model_validate({"tasks": [
        {"name": desk, "task_path": str(REPO / "schemas/tasks/banking77_desk.json"),
         # base model: an override splits the answers into confident ones and escalations
         "settings": {"confidence_threshold": 0.5, "eval_share": 0.0},
         "route": {"field": "desk", "to": {"cards": a, "payments": b, "account": b}}},
        {"name": a, "task_path": intents, "settings": {"eval_share": 0.0}},
        {"name": b, "task_path": intents, "settings": {"eval_share": 0.0}},
        {"name": broken, "task_path": str(tmp_path / "no-such-task.json")},
        # its registry's adapter was trained for another TaskSpec: it cannot load
        {"name": foreign, "task_path": str(REPO / "schemas/tasks/banking77_desk.json"),
         "registry_dir": str(tmp_path / "registry-a")},
    ]})
    settings = make_settings(max_batch=16, registry_poll_s=0.3, escalation_deadline_s=0.0)
    await ensure_topics(settings.bootstrap_servers, all_task_topics(settings, deployment), 2)
    topic = {t.name: deployment.task_settings(settings, t.name) for t in deployment.tasks}
    registry_a = AdapterRegistry(topic[a].registry_dir)
    assert topic[a].registry_dir != tmp_path / "registry-a"
    registry_foreign = AdapterRegistry(tmp_path / "registry-a")
    make_lora(student_model_path, tmp_path / "a1", seed=1)
    make_lora(student_model_path, tmp_path / "a2", seed=2)
    first = registry_a.add(tmp_path / "a1")
    registry_a.promote(first.adapter_id, reason="test")
    registry_foreign.promote(registry_foreign.add(tmp_path / "a1").adapter_id, reason="test")
    texts = [r.text for r in load_split("test")[:12]]
    routed = [r.text for r in load_split("test")[100:124]]
    bootstrap = settings.bootstrap_servers

    swarm = SwarmService(settings, deployment, engine=student_engine)
    assert set(swarm.failed) == {broken} and "no-such-task.json" in swarm.failed[broken]
    hub = swarm.hub()
    async with swarm.running():
        assert await _wait(lambda: all(hub.task_readiness(n)[0] for n in (desk, a, b, foreign))), hub.readiness()
        # a task whose adapter cannot load serves the base model; the others keep theirs
        assert swarm.services[foreign].pipeline.classifier.live_adapter is None
        ok, why = hub.task_readiness(broken)
        assert not ok and "task failed to load" in why  # ... and only that task: the others are ready
        assert hub.readiness()[0], hub.readiness()

        await produce(bootstrap, topic[desk].tickets_topic,
                      [ticket_message(f"r-{i}", t) for i, t in enumerate(routed)])
        for name in (a, b):
            await produce(bootstrap, topic[name].tickets_topic,
                          [ticket_message(f"{name}-1-{i}", t) for i, t in enumerate(texts)])
        before = {name: await _results(bootstrap, topic[name].results_topic, {f"{name}-1-{i}" for i in range(12)})
                  for name in (a, b)}

        second = registry_a.add(tmp_path / "a2")
        registry_a.promote(second.adapter_id, reason="test")
        live = lambda name: swarm.services[name].pipeline.classifier.live_adapter  # noqa: E731
        assert await _wait(lambda: getattr(live(a), "adapter_id", None) == second.adapter_id)
        assert live(b) is None
        for name in (a, b):
            await produce(bootstrap, topic[name].tickets_topic,
                          [ticket_message(f"{name}-2-{i}", t) for i, t in enumerate(texts)])
        after = {name: await _results(bootstrap, topic[name].results_topic, {f"{name}-2-{i}" for i in range(12)})
                 for name in (a, b)}
        router_results = await _results(bootstrap, topic[desk].results_topic, {f"r-{i}" for i in range(24)})
        forwarded = {name: await read_topic(bootstrap, topic[name].tickets_topic, timeout_s=5,
                                            until=lambda r: False) for name in (a, b)}
        specialist = {name: await _results(bootstrap, topic[name].results_topic,
                                           {r.key.decode() for r in forwarded[name] if r.key.startswith(b"r-")})
                      for name in (a, b)}

    # Promotion of a moved a, and only a: b answers the same tickets the same way.
    assert {before[a][f"{a}-1-{i}"].adapter_id for i in range(12)} == {first.adapter_id}
    assert {after[a][f"{a}-2-{i}"].adapter_id for i in range(12)} == {second.adapter_id}
    for i in range(12):
        old, new = before[b][f"{b}-1-{i}"], after[b][f"{b}-2-{i}"]
        assert old.adapter_id is None and new.adapter_id is None
        assert old.fields == new.fields  # same labels; the confidence up to fp32 batch-shape noise
        assert math.isclose(old.student["intent"].confidence, new.student["intent"].confidence, rel_tol=1e-3)

    # The router: every ticket answered once and forwarded exactly once, where its label says.
    to = {"cards": a, "payments": b, "account": b}
    sent = Counter(r.key.decode() for name in (a, b) for r in forwarded[name] if r.key.startswith(b"r-"))
    assert sent == Counter({f"r-{i}": 1 for i in range(24)})
    for name in (a, b):
        for record in forwarded[name]:
            if not record.key.startswith(b"r-"):
                continue
            tid = record.key.decode()
            answer = router_results[tid]
            assert answer.forwarded_to == name == to[answer.fields["desk"]]
            [hop] = json.loads(record.value)["route_chain"]
            assert hop == {"task": desk, "field": "desk", "label": answer.fields["desk"],
                           "route": answer.route.value, "to": name}
            assert [h.task for h in specialist[name][tid].route_chain] == [desk]
    print("router routes:", Counter(r.route.value for r in router_results.values()))
