"""Feedback on a real broker: people's corrections of published answers reach the training log
as labels that outrank the teacher's, bad feedback is dead-lettered, nothing stalls.

Real Tansu broker; the teacher-role service in this process (`role=teacher`: the teacher worker
and the feedback consumer, no student engine); the FALLIBLE stand-in teacher over HTTP (wrong
on a seeded share of tickets). Escalation records are produced directly (the student is not
needed), the teacher's answers are published and logged; then feedback: the gold label for
every ticket (corrections where the teacher was wrong, confirmations elsewhere), with bad
records first on the same partition, so a stall would hold the good ones back.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest

from schemas.classification import Classification
from schemas.dead_letter import DeadLetter
from schemas.escalation import Escalation
from schemas.text import dedup_key
from services.dev.datasets import load_split
from services.dev.standin import load_gold, run_standin
from services.settings import Settings
from services.stream.app import TriageService
from services.stream.kafka_io import produce, read_topic
from services.teacher.training_log import TrainingLog
from tests.conftest import create_topics
from tests.integration.test_teacher_worker_kill import escalations
from trainer.dataset import rows_from_log, split_heldout

pytestmark = pytest.mark.integration

N = 30
SAMPLED = {0, 1, 2}  # tickets of the evaluation sample: their rows stay held out
BAD = {  # record -> the dead-letter reason it must get
    b"{not json": "not_json",
    json.dumps({"ticket_id": "fb-0", "fields": {}}).encode(): "invalid_feedback",
    json.dumps({"ticket_id": "nobody-knows", "fields": {"intent": "card_arrival"}}).encode(): "unknown_ticket",
    json.dumps({"ticket_id": "fb-1", "fields": {"intent": "not_an_intent"}}).encode(): "unknown_label",
}


def make_settings(bootstrap: str, tmp_path, base_url: str) -> Settings:
    s = uuid.uuid4().hex[:8]
    return Settings(
        _env_file=None, bootstrap_servers=bootstrap, role="teacher",
        tickets_topic=f"tickets-{s}", results_topic=f"results-{s}", dead_letter_topic=f"dlq-{s}",
        control_topic=f"control-{s}", escalations_topic=f"escalations-{s}", feedback_topic=f"feedback-{s}",
        consumer_group=f"triage-{s}", teacher_consumer_group=f"teacher-{s}", feedback_consumer_group=f"feedback-{s}",
        session_timeout_ms=3000, heartbeat_interval_ms=500, topic_partitions=2, metrics_port=0,
        registry_dir=tmp_path / "registry", data_dir=tmp_path / "data",
        teacher_base_url=base_url, teacher_model="gold-label-standin", teacher_concurrency=8,
    )


async def feedback_committed(settings: Settings) -> int:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers,
                                group_id=settings.feedback_consumer_group, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(settings.feedback_topic, p) for p in range(settings.topic_partitions)]
        return sum([(await consumer.committed(tp)) or 0 for tp in parts])
    finally:
        await consumer.stop()


async def test_feedback_outranks_the_teacher_and_bad_feedback_is_dead_lettered(kafka_bootstrap, tmp_path):
    gold = load_gold()
    rows = [r for r in load_split("test") if gold.get(dedup_key(r.text)) == r.label]
    rows = list({dedup_key(r.text): r for r in rows}.values())[:N]
    records = escalations(rows, prefix="fb")
    for i in SAMPLED:  # mark a few as evaluation-sample tickets
        request = Escalation.model_validate_json(records[i][1]).model_copy(update={"sample": "sample"})
        records[i] = (records[i][0], request.model_dump_json().encode())

    async with run_standin(gold=gold, label_error_rate=0.3, seed=1) as teacher:
        settings = make_settings(kafka_bootstrap, tmp_path, teacher.base_url)
        await create_topics(settings)
        service = TriageService(settings)
        async with service.running():
            await produce(settings.bootstrap_servers, settings.escalations_topic, records)
            published = await read_topic(
                settings.bootstrap_servers, settings.results_topic, timeout_s=90,
                until=lambda got: len({r.key for r in got}) >= N)
            teacher_said = {r.key.decode(): Classification.model_validate_json(r.value).fields["intent"]
                            for r in published}
            assert len(teacher_said) == N and all(
                Classification.model_validate_json(r.value).route.value == "teacher" for r in published)
            wrong = {f"fb-{i}" for i, row in enumerate(rows) if teacher_said[f"fb-{i}"] != row.label}
            assert 3 <= len(wrong) <= 18  # the fallible teacher erred (30% of 30 tickets)

            # Bad records first, on one key (one partition), then the gold label for every ticket
            # under the same key: a stall on a bad record would hold every good one back.
            key = b"desk-7"
            good = [json.dumps({"ticket_id": f"fb-{i}", "fields": {"intent": row.label}, "source": "human",
                                "author": "agent-7", "at": "2026-03-01T10:00:00Z"}).encode()
                    for i, row in enumerate(rows)]
            sent = list(BAD) + good + [good[0]]  # the last: a re-delivered correction
            started = time.monotonic()
            await produce(settings.bootstrap_servers, settings.feedback_topic, [(key, v) for v in sent])
            while await feedback_committed(settings) < len(sent):
                assert time.monotonic() - started < 60, "feedback offsets never reached the end: a stall"
                await asyncio.sleep(0.2)
            outcomes = {o: service.metrics.registry.get_sample_value("triage_feedback_total", {"outcome": o})
                        for o in ("corrected", "confirmed", *BAD.values())}
            # The teacher measured by people (services/teacher/quality.py), set after the batch.
            gauge = service.metrics.registry.get_sample_value
            judged = {"measure": "teacher_vs_people", "scope": "all"}
            while gauge("triage_agreement_samples", judged) != N:
                assert time.monotonic() - started < 70, "the agreement gauges never counted the feedback"
                await asyncio.sleep(0.2)
            measured = {scope: gauge("triage_agreement", {"measure": "teacher_vs_people", "scope": scope})
                        for scope in ("all", "sample")}

    # Exactly one outcome per record: counted once each, in the expected mix.
    assert outcomes == {"corrected": len(wrong), "confirmed": N - len(wrong) + 1, **{r: 1.0 for r in BAD.values()}}
    assert measured["all"] == pytest.approx(1 - len(wrong) / N)
    assert measured["sample"] == pytest.approx(1 - len(wrong & {f"fb-{i}" for i in SAMPLED}) / len(SAMPLED))
    dead = await read_topic(settings.bootstrap_servers, settings.dead_letter_topic, timeout_s=20,
                            until=lambda got: len(got) >= len(BAD))
    letters = [DeadLetter.model_validate_json(r.value) for r in dead]
    assert sorted(d.reason for d in letters) == sorted(BAD.values())
    assert all(d.source_topic == settings.feedback_topic and d.original() in BAD and d.detail for d in letters)
    assert {d.original(): d.reason for d in letters} == BAD

    # In the log: every ticket carries the person's label; the sample's rows are still held out.
    with TrainingLog(settings.training_log_path) as log:
        examples = {e.ticket_id: e for e in log.examples()}
        assert all(examples[f"fb-{i}"].labels["intent"] == row.label and examples[f"fb-{i}"].labelled_by == "human"
                   for i, row in enumerate(rows))
        replaced = log._read("SELECT ticket_id, replaced, outcome FROM feedback")
    assert len(replaced) == N  # the re-delivered record is stored once
    assert {t for t, _, o in replaced if o == "corrected"} == wrong
    assert all(json.loads(r)["intent"] == teacher_said[t] for t, r, _ in replaced)  # the teacher's, kept
    trainable, heldout = split_heldout(rows_from_log(settings.training_log_path)[0])
    assert {r.text for r in heldout} == {rows[i].text for i in SAMPLED}  # held out, now gold
    assert all(r.labelled_by == "human" for r in trainable + heldout)
    assert {r.text: r.labels["intent"] for r in trainable + heldout} == {r.text: r.label for r in rows}
