"""The teacher worker as its own process (`triage serve --role teacher`), SIGKILLed mid-batch.

Real Tansu broker, the stand-in teacher over HTTP, the real CLI in subprocesses. Escalation
records are produced directly (the student is not needed for the teacher lane), the worker is
killed while teacher calls are in flight, a second worker takes over. Afterwards: every
escalation has a teacher result; after dedup by key (latest record wins) each has exactly one
answer; the training log holds each text once; the group's offsets reach the end of the topic;
a malformed record on the escalations topic is a dead letter, not a stall.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from schemas.classification import Classification, FieldPrediction
from schemas.escalation import Escalation
from schemas.text import dedup_key
from services.dev.datasets import load_split
from services.dev.standin import load_gold, run_standin
from services.stream.kafka_io import produce, read_topic
from services.teacher.training_log import TrainingLog
from tests.conftest import create_topics

pytestmark = pytest.mark.integration

N = 40
CONCURRENCY = 4  # teacher calls in flight per worker: ~10 waves of one second each


def escalations(rows, prefix: str = "kill") -> list[tuple[bytes, bytes]]:
    """One escalation record per row (an unsure student answer, ticket time now)."""
    now_ms = int(time.time() * 1000)
    out = []
    for i, row in enumerate(rows):
        tid = f"{prefix}-{i}"
        student = Classification(
            ticket_id=tid, fields={"intent": "card_arrival"}, confidence=0.1, route="unverified",
            model="student", student={"intent": FieldPrediction(label="card_arrival", confidence=0.1)},
            latency_ms=1.0, engine_ms=1.0)
        request = Escalation(kind="escalation", ticket_id=tid, text=row.text, student_result=student,
                             ticket_time_ms=now_ms)
        out.append((tid.encode(), request.model_dump_json().encode()))
    return out


def start_worker(settings, base_url: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIAGE_", "OPENAI_"))}
    env.update(
        TRIAGE_BOOTSTRAP_SERVERS=settings.bootstrap_servers,
        TRIAGE_ESCALATIONS_TOPIC=settings.escalations_topic,
        TRIAGE_RESULTS_TOPIC=settings.results_topic,
        TRIAGE_DEAD_LETTER_TOPIC=settings.dead_letter_topic,
        TRIAGE_TEACHER_CONSUMER_GROUP=settings.teacher_consumer_group,
        TRIAGE_SESSION_TIMEOUT_MS="3000", TRIAGE_HEARTBEAT_INTERVAL_MS="500",
        TRIAGE_DATA_DIR=str(settings.data_dir), TRIAGE_METRICS_PORT="0",
        TRIAGE_TEACHER_BASE_URL=base_url, TRIAGE_TEACHER_MODEL="gold-label-standin", TRIAGE_TEACHER_API_KEY="test-key",
        TRIAGE_TEACHER_CONCURRENCY=str(CONCURRENCY),
        TRIAGE_ESCALATION_DEADLINE_S="600",  # no unverified records in this test: only answers
        TRIAGE_LOG_FORMAT="text", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
    )
    return subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--role", "teacher"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def committed_offsets(settings) -> dict[int, int]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                                group_id=settings.teacher_consumer_group, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(settings.escalations_topic, p) for p in range(settings.topic_partitions)]
        return {tp.partition: (await consumer.committed(tp)) or 0 for tp in parts}
    finally:
        await consumer.stop()


async def test_worker_killed_mid_batch_loses_nothing_and_answers_once(make_settings):
    gold = load_gold()
    rows, seen = [], set()
    for row in load_split("test")[2000:]:
        key = dedup_key(row.text)
        if key not in seen and gold.get(key) == row.label:
            seen.add(key)
            rows.append(row)
        if len(rows) == N:
            break
    settings = make_settings()
    await create_topics(settings)
    records = escalations(rows)
    gold_of = {key.decode(): row.label for (key, _), row in zip(records, rows)}
    text_of = {key.decode(): row.text for (key, _), row in zip(records, rows)}
    garbage = (b"garbage", b'{"kind": "escalation", "ticket_id": ')  # not an Escalation
    await produce(settings.bootstrap_servers, settings.escalations_topic, records[:N // 2] + [garbage]
                  + records[N // 2:])

    async with run_standin(gold=gold, latency_ms=1000) as server:
        first = start_worker(settings, server.base_url)
        try:
            before_kill = await read_topic(settings.bootstrap_servers, settings.results_topic,
                                           until=lambda r: len(r) >= 8, timeout_s=90)
            assert 8 <= len(before_kill) < N, "kill mid-batch: some answers out, most still to come"
            first.send_signal(signal.SIGKILL)  # no shutdown hook, no last commit
            first.wait(timeout=10)
            asked_before_restart = server.stats["chat_requests"]
            second = start_worker(settings, server.base_url)
            try:
                published = await read_topic(
                    settings.bootstrap_servers, settings.results_topic, timeout_s=120,
                    until=lambda r: {x.key for x in r} >= set(k for k, _ in records))
                # Offsets reach the end once every answer is acknowledged (upkeep commits).
                deadline = time.monotonic() + 30
                while sum((await committed_offsets(settings)).values()) < N + 1:
                    assert time.monotonic() < deadline, await committed_offsets(settings)
                    await asyncio.sleep(0.5)
            finally:
                second.send_signal(signal.SIGTERM)
                err = second.communicate(timeout=30)[1].decode(errors="replace")
            assert second.returncode == 0, err[-2000:]
            stand_in = server.stats
        finally:
            if first.poll() is None:
                first.kill()

    answers: dict[str, list[Classification]] = defaultdict(list)
    for r in published:
        answers[r.key.decode()].append(Classification.model_validate_json(r.value))
    assert set(answers) == set(gold_of)  # no escalation lost
    for tid, results in answers.items():
        assert {r.route.value for r in results} == {"teacher"}, tid
        # Re-published after the restart maybe, but never answered differently: one answer per key.
        assert {tuple(sorted(r.fields.items())) for r in results} == {(("intent", gold_of[tid]),)}, tid
    # The teacher was asked again only for what was in flight at the kill.
    assert stand_in["chat_requests"] <= N + CONCURRENCY
    assert asked_before_restart < N
    # The malformed record is a dead letter with its reason; it did not stall its partition.
    dead = await read_topic(settings.bootstrap_servers, settings.dead_letter_topic,
                            until=lambda r: len(r) >= 1, timeout_s=10)
    # (once per worker that read it before the commit: at-least-once, like everything here)
    assert {d.key for d in dead} == {b"garbage"} and {d.json()["reason"] for d in dead} == {"invalid_escalation"}
    with TrainingLog(settings.training_log_path) as log:
        examples = log.examples()
    assert sorted(e.ticket_id for e in examples) == sorted(gold_of)  # each text logged once
    assert all(e.labels == {"intent": gold_of[e.ticket_id]} and e.text == text_of[e.ticket_id]
               and e.source == "live" for e in examples)
