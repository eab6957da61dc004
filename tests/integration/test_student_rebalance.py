"""Two student replicas in one group on a real Tansu broker: the second joins, then leaves,
while the first is mid-batch with a backlog.

The soak's kill -9 found tickets answered twice by the surviving replica: its batch in flight
finished after the rebalance had handed it a new assignment, so its commit covered nothing
and the same records came again. The student consumer's rebalance listener now lets the batch
in flight publish and commit before the group rejoins (with TRIAGE_REBALANCE_BATCH_WAIT_S=0,
i.e. without the wait, this test fails: 48 tickets answered twice). Checks: every ticket has exactly one
outcome (a result or an escalation), none twice, and the group's offsets reach the end.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from services.dev.datasets import load_split
from services.stream.app import TriageService
from services.stream.kafka_io import produce, read_topic, ticket_message
from tests.conftest import committed_total, create_topics, wait_until

pytestmark = pytest.mark.integration

N = 320
PARTITIONS = 4


def committed(settings):
    """The group's committed offsets over the topic, summed."""
    return committed_total(settings.bootstrap_servers, settings.consumer_group, settings.tickets_topic, PARTITIONS)


async def test_a_replica_joining_and_leaving_mid_batch_answers_each_ticket_once(make_settings, student):
    # Small batches and a backlog: the first replica is inside a batch at almost any moment,
    # so both rebalances land mid-batch.
    settings = make_settings(role="student", topic_partitions=PARTITIONS, max_batch=48)
    await create_topics(settings)
    rows = load_split("test")[2000:2000 + N]
    keys = [f"rb-{i}" for i in range(N)]
    await produce(settings.bootstrap_servers, settings.tickets_topic,
                  [ticket_message(key, row.text) for key, row in zip(keys, rows)])

    async with TriageService(settings, classifier=student).running() as first:
        await wait_until(lambda: first.pipeline.stats.consumed >= 48, 120, "the first replica's batches")
        async with TriageService(settings, classifier=student).running() as second:
            await wait_until(lambda: second.pipeline.stats.consumed >= 48, 120, "the second replica to take some")
            at_leave = first.pipeline.stats.consumed
        # the second left (a graceful stop): the first takes its partitions back mid-batch
        await wait_until(lambda: first.pipeline.stats.consumed >= at_leave + 48, 120, "the first to go on")
        deadline = time.monotonic() + 300
        while (at_end := await committed(settings)) < N and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
    # Commits follow the broker's acks: once the group is at the end, every outcome is there.
    per_topic = {}
    for topic in (settings.results_topic, settings.escalations_topic):
        got = await read_topic(settings.bootstrap_servers, topic, until=lambda got: False, timeout_s=3)
        per_topic[topic] = Counter(r.key.decode() for r in got)

    answered = set().union(*per_topic.values())
    assert answered == set(keys), f"{N - len(answered)} tickets without an outcome"
    for topic, per_key in per_topic.items():  # a confident ticket may have a result and an audit
        twice = sorted(k for k, n in per_key.items() if n > 1)
        assert not twice, f"{topic}: answered more than once: {twice[:10]} ({len(twice)})"
    assert at_end == N  # every partition committed to its end
