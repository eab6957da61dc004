"""Two teacher workers in one group: the second joins, then leaves, while escalations are in
flight and the teacher is down, then slow.

Real Tansu broker (4 partitions), the gold-label stand-in over HTTP (0.3 s a call; HTTP 500 on
every call while the second worker joins and leaves), two `TriageService(role=teacher)`
instances in this process sharing a training log (as replicas share the triage-data volume).
aiokafka's eager protocol revokes every partition on each join and leave: the old lane
re-read each partition handed back into a second task beside the first, so after the outage
both asked the teacher, and the tasks of partitions that moved kept asking too. Checks: every
escalation answered (no loss), one answer per key (the teacher's, gold), each text logged
once, the group's offsets at the end of the topic, and the teacher paid at most once per
escalation plus the calls in progress at each rebalance (at most a worker's slots; the worker
logs the exact count when it cancels the tasks of partitions that moved, or stops).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import defaultdict

import pytest

from schemas.classification import Classification
from schemas.text import dedup_key
from services.dev.datasets import load_split
from services.dev.standin import load_gold, run_standin
from services.stream.app import TriageService
from services.stream.kafka_io import produce, read_topic
from services.teacher.training_log import TrainingLog
from tests.conftest import committed_total, create_topics, wait_until
from tests.integration.test_teacher_worker_kill import escalations as kill_test_escalations

pytestmark = pytest.mark.integration

N = 48
CONCURRENCY = 4  # teacher calls in flight per worker: N takes ~12 s on one worker

PARTITIONS = 4


def committed(settings):
    """The group's committed offsets over the topic, summed."""
    return committed_total(settings.bootstrap_servers, settings.teacher_consumer_group, settings.escalations_topic,
                           PARTITIONS)


def escalations(rows) -> list[tuple[bytes, bytes]]:
    return kill_test_escalations(rows, prefix="rb")


async def test_a_worker_joining_and_leaving_mid_flight_answers_each_escalation_once(make_settings, caplog):
    gold = load_gold()
    rows, seen = [], set()
    for row in load_split("test")[1000:]:
        key = dedup_key(row.text)
        if key not in seen and gold.get(key) == row.label:
            seen.add(key)
            rows.append(row)
        if len(rows) == N:
            break
    records = escalations(rows)
    gold_of = {key.decode(): row.label for (key, _), row in zip(records, rows)}
    text_key = {key.decode(): dedup_key(row.text) for (key, _), row in zip(records, rows)}

    async with run_standin(gold=gold, latency_ms=300) as server:
        settings = make_settings(role="teacher", topic_partitions=PARTITIONS, teacher_base_url=server.base_url,
                                 teacher_model="gold-label-standin", teacher_api_key="test-key",
                                 teacher_concurrency=CONCURRENCY,
                                 teacher_retry_max_s=1.0,
                                 escalation_deadline_s=600)  # only teacher answers in this test
        await create_topics(settings)
        await produce(settings.bootstrap_servers, settings.escalations_topic, records)
        published: list = []
        done = asyncio.Event()
        reader = asyncio.create_task(read_topic(settings.bootstrap_servers, settings.results_topic,
                                                until=lambda _: done.is_set(), timeout_s=300,
                                                on_message=published.append))
        caplog.set_level(logging.INFO, logger="services.stream.teacher_lane")
        try:
            async with TriageService(settings).running() as a:
                await wait_until(lambda: len(published) >= 6, 90, "A's first answers")
                server.set_faults(error_rate=1.0)  # the outage: every escalation now waits
                async with TriageService(settings).running() as b:  # joins: everything revoked
                    await wait_until(lambda: b.worker.assigned() > 0, 60, "B's assignment")
                    assert 0 < a.worker.assigned() < PARTITIONS
                    await asyncio.sleep(2.0)  # B's tasks wait out the outage too
                # B left (stop: cancel, commit what is finished, leave the group): A takes all back.
                await wait_until(lambda: a.worker.assigned() == PARTITIONS, 60, "A taking every partition back")
                assert len({r.key for r in published}) < N, "the rebalances must happen with work in flight"
                server.set_faults(error_rate=0.0)
                await wait_until(lambda: {r.key for r in published} >= set(map(str.encode, gold_of)), 120,
                                 "every escalation answered")
                deadline = time.monotonic() + 30
                while await committed(settings) < N:
                    assert time.monotonic() < deadline, "offsets did not reach the end of the topic"
                    await asyncio.sleep(0.5)
        finally:
            done.set()
            await reader
        stand_in = server.stats

    answers: dict[str, list[Classification]] = defaultdict(list)
    for r in published:
        answers[r.key.decode()].append(Classification.model_validate_json(r.value))
    assert set(answers) == set(gold_of)  # no escalation lost
    for tid, results in answers.items():  # one answer per key: the teacher's, never another
        assert {(r.route.value, r.fields["intent"]) for r in results} == {("teacher", gold_of[tid])}, tid
    # Paid once per escalation, plus at most the calls in progress when tasks were cancelled
    # (partitions that moved at the join; B's own at its stop).
    cancels = [m for m in caplog.messages if "teacher lane: cancelled" in m]
    in_progress = sum(int(re.search(r"(\d+) teacher calls in progress", m).group(1)) for m in cancels)
    answered = {tid: stand_in["answered"].get(text_key[tid], 0) for tid in gold_of}
    assert all(n >= 1 for n in answered.values())
    assert sum(answered.values()) <= N + 2 * CONCURRENCY, answered  # two rebalances, a worker's slots each
    assert sum(answered.values()) <= N + in_progress, (sum(answered.values()), in_progress, cancels)
    with TrainingLog(settings.training_log_path) as log:
        examples = log.examples()
    assert sorted(e.ticket_id for e in examples) == sorted(gold_of)  # each text logged once
