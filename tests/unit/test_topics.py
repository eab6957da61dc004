"""`triage serve --create-topics` creates the topics the docs describe: the plan (pure) and
the admin call's error handling (a fake admin client)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from services.deployment import Deployment
from services.settings import Settings
from services.stream import kafka_io
from services.stream.kafka_io import TopicSpec, create_topics, merge_plans, plan_topics
from services.stream.swarm import all_task_topics, plan_task_topics

REPO = Path(__file__).resolve().parents[2]
COMPACT = ("cleanup.policy", "compact")


def settings(**values) -> Settings:
    return Settings(_env_file=None, **values)


def test_one_task_plan_compacts_results_and_keeps_control_one_partition():
    s = settings(topic_partitions=6, topic_replication=3)
    plan = plan_topics(s)
    assert list(plan) == kafka_io.all_topics(s) == [
        "triage.tickets", "triage.results", "triage.dead-letter", "triage.control", "triage.escalations",
        "triage.feedback"]
    assert COMPACT in plan["triage.results"].config
    assert plan["triage.control"] == TopicSpec(1, 3)
    for topic in ("triage.tickets", "triage.dead-letter", "triage.escalations", "triage.feedback"):
        assert plan[topic].partitions == 6 and COMPACT not in plan[topic].config
    assert {spec.replication for spec in plan.values()} == {3}
    assert settings().topic_replication == 1  # one broker (dev, compose) unless told


def test_one_name_for_two_roles_is_refused():
    with pytest.raises(ValueError, match="must differ"):
        plan_topics(settings(results_topic="triage.tickets"))


def test_the_plan_is_what_the_kubernetes_topics_declare():
    """deploy/k8s/kafka-topics.yaml (Strimzi) and `--create-topics` at production settings agree."""
    plan = plan_topics(settings(topic_partitions=4, topic_replication=3))
    declared = {d["metadata"]["name"]: d["spec"] for d in yaml.safe_load_all((REPO / "deploy/k8s/kafka-topics.yaml").read_text())}
    assert set(declared) == set(plan)
    for topic, spec in plan.items():
        k8s = declared[topic]
        assert (k8s["partitions"], k8s["replicas"]) == (spec.partitions, spec.replication), topic
        assert {k: str(v) for k, v in k8s.get("config", {}).items()} == dict(spec.config), topic


def test_every_task_of_a_deployment_gets_the_same_treatment():
    deployment = Deployment.from_file(REPO / "deploy" / "tasks.json")
    plan = plan_task_topics(settings(topic_partitions=3), deployment)
    assert list(plan) == all_task_topics(settings(topic_partitions=3), deployment)
    results = [t for t in plan if t.endswith("results")]
    assert len(results) == len(deployment.tasks)  # triage.<task>.results for each
    assert all(COMPACT in plan[t].config for t in results)
    assert plan["triage.control"] == TopicSpec(1, 1)  # process-wide: one topic, one partition
    assert sum(COMPACT in spec.config for spec in plan.values()) == len(results)
    others = set(plan) - set(results) - {"triage.control"}
    assert others and all(plan[t].partitions == 3 for t in others)


def test_a_topic_two_tasks_plan_differently_is_an_error():
    assert merge_plans([{"a": TopicSpec(2)}, {"a": TopicSpec(2)}]) == {"a": TopicSpec(2)}
    with pytest.raises(ValueError, match="'a' is planned twice"):
        merge_plans([{"a": TopicSpec(2)}, {"a": TopicSpec(2, config=(COMPACT,))}])
    deployment = Deployment.model_validate({"tasks": [  # task b's results are task a's tickets
        {"name": "a", "task_path": "a.json"}, {"name": "b", "task_path": "b.json", "results_topic": "triage.a.tickets"}]})
    with pytest.raises(ValueError, match="triage.a.tickets"):
        plan_task_topics(settings(), deployment)


class FakeResponse:
    def __init__(self, topic_errors):
        self.topic_errors = topic_errors


class FakeAdmin:
    existing: dict[str, int] = {}
    answer: dict[str, tuple[int, str | None]] = {}
    created: list = []

    def __init__(self, bootstrap_servers):
        pass

    async def start(self):
        pass

    async def close(self):
        pass

    async def list_topics(self):
        return list(self.existing)

    async def describe_topics(self, topics):
        return [{"topic": t, "partitions": [{}] * self.existing[t]} for t in topics]

    async def create_topics(self, new_topics):
        FakeAdmin.created += new_topics
        return FakeResponse([(t.name, *self.answer.get(t.name, (0, None))) for t in new_topics])


@pytest.fixture
def admin(monkeypatch):
    import aiokafka.admin

    monkeypatch.setattr(aiokafka.admin, "AIOKafkaAdminClient", FakeAdmin)
    FakeAdmin.existing, FakeAdmin.answer, FakeAdmin.created = {}, {}, []
    return FakeAdmin


async def test_create_topics_sends_the_plan_and_skips_what_exists(admin, caplog):
    admin.existing = {"triage.control": 4}  # made by an older triage, one partition per data topic
    plan = plan_topics(settings(topic_partitions=2, topic_replication=3))
    created = await create_topics("broker:9092", plan)
    assert created == [t for t in plan if t != "triage.control"]
    sent = {t.name: t for t in admin.created}
    assert sent["triage.results"].topic_configs["cleanup.policy"] == "compact"
    assert {(t.num_partitions, t.replication_factor) for t in sent.values()} == {(2, 3)}
    assert "triage.control exists with 4 partitions, planned 1" in caplog.text  # said, not changed


async def test_a_topic_the_broker_refuses_is_an_error_not_silence(admin):
    # Real Kafka answers per topic in the response (aiokafka raises nothing): e.g. replication
    # 3 on a one-broker cluster.
    admin.answer = {"triage.results": (38, "Replication factor: 3 larger than available brokers: 1.")}
    with pytest.raises(RuntimeError, match="triage.results.*InvalidReplicationFactor.*larger than available"):
        await create_topics("broker:9092", plan_topics(settings(topic_replication=3)))
    admin.answer = {"triage.results": (36, "already exists")}  # another replica won the race: fine
    assert "triage.results" in await create_topics("broker:9092", plan_topics(settings()))
