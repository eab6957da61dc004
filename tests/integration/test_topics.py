"""`--create-topics` against a real broker (Tansu): the planned partition counts and the
results topic's compaction config are what the broker then describes; a second run creates
nothing. Tansu stores topic configs and returns them from DescribeConfigs (it accepts and
ignores the replication factor: one broker, memory storage), so the compaction config is
checked as stored, not as a cleaner that runs."""

from __future__ import annotations

import uuid

import pytest

from services.deployment import Deployment
from services.settings import Settings
from services.stream.kafka_io import create_topics, plan_topics
from services.stream.swarm import plan_task_topics

pytestmark = pytest.mark.integration


def settings(bootstrap: str, suffix: str, **values) -> Settings:
    return Settings(_env_file=None, bootstrap_servers=bootstrap, tickets_topic=f"tickets-{suffix}",
                    results_topic=f"results-{suffix}", dead_letter_topic=f"dlq-{suffix}",
                    control_topic=f"control-{suffix}", escalations_topic=f"escalations-{suffix}",
                    feedback_topic=f"feedback-{suffix}", **values)


async def described(bootstrap: str, topics: list[str]) -> tuple[dict[str, int], dict[str, dict[str, str]]]:
    """topic -> partition count, topic -> its non-default configs, as the broker reports them."""
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        partitions = {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics(topics)}
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
        configs = {name: {entry[0]: entry[1] for entry in entries}
                   for response in responses for _code, _msg, _type, name, entries in response.resources}
    finally:
        await admin.close()
    return partitions, configs


async def test_created_topics_have_the_planned_partitions_and_configs(kafka_bootstrap):
    s = settings(kafka_bootstrap, uuid.uuid4().hex[:8], topic_partitions=3)
    plan = plan_topics(s)
    assert await create_topics(kafka_bootstrap, plan) == list(plan)
    partitions, configs = await described(kafka_bootstrap, list(plan))
    assert partitions == {t: spec.partitions for t, spec in plan.items()}
    assert partitions[s.control_topic] == 1 and partitions[s.tickets_topic] == 3
    assert configs[s.results_topic]["cleanup.policy"] == "compact"
    assert configs[s.escalations_topic]["retention.ms"] == "604800000"
    assert "cleanup.policy" not in configs[s.tickets_topic]
    assert await create_topics(kafka_bootstrap, plan) == []  # idempotent


async def test_every_task_of_a_deployment_on_a_real_broker(kafka_bootstrap):
    suffix = uuid.uuid4().hex[:8]
    deployment = Deployment.model_validate({"tasks": [
        {"name": f"desk{suffix}", "task_path": "d.json", "tickets_topic": f"tickets-{suffix}"},
        {"name": f"cards{suffix}", "task_path": "c.json"}]})
    plan = plan_task_topics(settings(kafka_bootstrap, suffix, topic_partitions=2), deployment)
    await create_topics(kafka_bootstrap, plan)
    partitions, configs = await described(kafka_bootstrap, list(plan))
    assert partitions == {t: spec.partitions for t, spec in plan.items()}
    results = [f"triage.desk{suffix}.results", f"triage.cards{suffix}.results"]
    assert all(configs[t]["cleanup.policy"] == "compact" for t in results)
    assert partitions[f"control-{suffix}"] == 1 and partitions[f"tickets-{suffix}"] == 2
