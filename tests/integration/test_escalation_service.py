"""Escalation at service level: the teacher lane, audits, a teacher outage, the API key.

Real Tansu broker, the real vLLM student (shared per session), and the gold-label teacher
stand-in over real HTTP. TriageService runs the student consumer and the teacher worker in one
process (`role=all`) and builds the teacher itself from `teacher_base_url` (the production
path), so the escalations topic, retries and the circuit breaker are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import traceback
from typing import Callable

import pytest

from schemas.classification import Classification
from services.stream.app import TriageService
from services.dev.broker import free_port
from services.dev.datasets import LabelledText, load_split
from schemas.training import eval_sample_source
from services.stream.kafka_io import produce, read_topic, ticket_message, unique_keys
from schemas.text import dedup_key as normalise
from services.dev.standin import load_gold, run_standin
from tests.conftest import create_topics

pytestmark = pytest.mark.integration

STANDIN_MODEL = "gold-label-standin"
KEY = "sk-triage-SVC-DISTINCTIVE-7e1d5c3b9a0f2468"
KEY_SECRET_PART = KEY[len("sk-triage-"):]


# --- helpers -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gold() -> dict[str, str]:
    return load_gold()


@pytest.fixture(scope="module")
def test_rows() -> list[LabelledText]:
    return load_split("test")


def pick(rows: list[LabelledText], gold: dict[str, str], n: int, offset: int, prefix: str):
    """n tickets from the test split: distinct texts whose stand-in label is the test gold."""
    seen: set[str] = set()
    chosen: list[tuple[str, LabelledText]] = []
    for row in rows[offset:]:
        key = normalise(row.text)
        if key in seen or gold.get(key) != row.label:
            continue
        seen.add(key)
        chosen.append((f"{prefix}-{len(chosen)}", LabelledText(row.text.strip(), row.label)))
        if len(chosen) == n:
            return chosen
    raise AssertionError("not enough distinct test rows")


async def publish_tickets(settings, tickets) -> None:
    await produce(settings.bootstrap_servers, settings.tickets_topic,
                  [ticket_message(tid, row.text) for tid, row in tickets])


async def results_for(settings, ids: set[str], timeout_s: float = 120,
                      final: Callable[[Classification], bool] = lambda r: True) -> dict[str, Classification]:
    """Read the results topic from the start until every id in `ids` has a result for which
    `final` holds; the latest record per key wins (the topic is a changelog)."""
    wanted = {i.encode() for i in ids}

    def latest(records) -> dict[bytes, Classification]:
        out = {}
        for r in records:
            if r.key in wanted:
                out[r.key] = Classification.model_validate_json(r.value)
        return out

    got = await read_topic(settings.bootstrap_servers, settings.results_topic, timeout_s=timeout_s,
                           until=lambda r: wanted <= unique_keys(r) and all(map(final, latest(r).values())))
    missing = wanted - unique_keys(got)
    assert not missing, f"no result for {sorted(missing)[:5]}"
    return {k.decode(): v for k, v in latest(got).items()}


async def all_results(settings, expected: int, settle_s: float = 3.0) -> list:
    """Everything on the results topic: waits for `expected` records, then `settle_s` more."""
    got = await read_topic(settings.bootstrap_servers, settings.results_topic,
                           until=lambda r: len(r) >= expected, timeout_s=60)
    extra = await read_topic(settings.bootstrap_servers, settings.results_topic,
                             until=lambda r: len(r) > expected, timeout_s=settle_s)
    return extra if len(extra) > len(got) else got


async def eventually(predicate: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def split_threshold(confidences: list[float]) -> float:
    """A threshold in the widest gap of the middle half: some escalate, some do not."""
    c = sorted(confidences)
    n = len(c)
    i = max(range(n // 4, 3 * n // 4), key=lambda j: c[j + 1] - c[j])
    assert c[i + 1] - c[i] > 1e-4, f"no usable gap in {c}"
    return (c[i] + c[i + 1]) / 2


def student_labels(result: Classification) -> dict[str, str]:
    return {name: p.label for name, p in result.student.items()}


def sample(metrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


# --- 1. escalation at a threshold ------------------------------------------------------------
async def test_tickets_below_threshold_go_to_teacher_and_training_log(
    make_settings, student, gold, test_rows
):
    tickets = pick(test_rows, gold, 30, offset=300, prefix="esc")
    text_of = {tid: row.text for tid, row in tickets}
    gold_of = {tid: row.label for tid, row in tickets}
    # Data-driven threshold from the same texts, so some but not all escalate.
    predictions = await student.classify([row.text for _, row in tickets])
    threshold = split_threshold([p.confidence for p in predictions])

    async with run_standin(gold=gold) as server:
        settings = make_settings(
            teacher_base_url=server.base_url, teacher_model=STANDIN_MODEL, teacher_api_key="test-key",
            confidence_threshold=threshold, eval_share=0.0, teacher_max_retries=1,
        )
        await create_topics(settings)
        async with TriageService(settings, classifier=student).running() as service:
            assert service.worker.teacher is not None  # built from settings, not injected
            await publish_tickets(settings, tickets)
            results = await results_for(settings, set(text_of))
            assert await service.worker.idle()
            examples = service.worker.training_log.examples()
            summary = {**service.pipeline.summary(), **service.worker.summary()}
            metrics = service.metrics
        published = await all_results(settings, len(tickets), settle_s=1.0)
        stand_in = server.stats

    escalated = {tid for tid, r in results.items() if r.student["intent"].confidence < threshold}
    assert 0 < len(escalated) < len(tickets), (threshold, len(escalated))
    for tid, result in results.items():
        assert result.ticket_id == tid
        assert result.student and result.student["intent"].label  # the student always answers
        if tid in escalated:
            assert result.route.value == "teacher", tid
            assert result.teacher == {"intent": gold_of[tid]}, tid
            assert result.fields == {"intent": gold_of[tid]}  # the teacher's answer is published
            assert result.model == result.teacher_model == STANDIN_MODEL
            assert result.confidence == 1.0
        else:
            assert result.route.value == "student", tid
            assert result.fields == student_labels(result)
            assert result.teacher is None and result.teacher_model is None
            assert result.model == student.model_name
            assert result.confidence == result.student["intent"].confidence
        assert not result.audited

    # The teacher saw exactly the escalated texts, once each.
    assert set(stand_in["answered"]) == {normalise(text_of[t]) for t in escalated}
    assert stand_in["chat_requests"] == len(escalated)
    # The training log holds exactly the escalated texts, with gold labels, from "live".
    assert {ex.text for ex in examples} == {text_of[t] for t in escalated}
    for ex in examples:
        assert ex.source == "live"
        assert ex.labels == {"intent": gold_of[ex.ticket_id]}
        assert text_of[ex.ticket_id] == ex.text
        assert ex.teacher_model == STANDIN_MODEL
    # One record per ticket: the teacher answered within the deadline, nothing to correct.
    assert sorted(r.key.decode() for r in published) == sorted(text_of)
    assert summary["escalations"] == len(escalated) and summary["threshold"] == threshold
    assert summary["results"] == {"student": len(tickets) - len(escalated)}  # the student's own
    assert summary["teacher_results"] == len(escalated) and summary["unverified"] == 0
    assert sample(metrics, "triage_escalations_total") == len(escalated)
    assert sample(metrics, "triage_teacher_requests_total", outcome="ok") == len(escalated)
    assert sample(metrics, "triage_training_examples_total") == len(escalated)


# --- 2. the evaluation sample's confident tickets are audited ---------------------------------
async def test_audits_sample_confident_tickets_and_measure_accuracy(
    make_settings, student, gold, test_rows
):
    tickets = pick(test_rows, gold, 30, offset=600, prefix="aud")
    text_of = {tid: row.text for tid, row in tickets}
    audited = {tid for tid, text in text_of.items() if eval_sample_source(text, 0.5, 0.5, cold=False)}
    assert 0 < len(audited) < len(tickets)
    # The zero-shot student is nearly always wrong, which would make any accuracy bug look
    # right (0.0). So the teacher here agrees with the student on half the audited tickets.
    predicted = await student.classify([row.text for _, row in tickets])
    teacher_gold = dict(gold)
    for i, ((tid, row), pred) in enumerate(zip(tickets, predicted)):
        if tid in audited and i % 2 == 0:
            teacher_gold[normalise(row.text)] = pred.fields["intent"].label
    gold_of = {tid: teacher_gold[normalise(row.text)] for tid, row in tickets}

    async with run_standin(gold=teacher_gold) as server:
        settings = make_settings(
            teacher_base_url=server.base_url, teacher_model=STANDIN_MODEL, teacher_api_key="test-key",
            confidence_threshold=0.0, eval_share=0.5, teacher_max_retries=1,
        )
        await create_topics(settings)
        async with TriageService(settings, classifier=student).running() as service:
            await publish_tickets(settings, tickets)
            results = await results_for(settings, set(text_of))
            assert await service.worker.idle()  # audits ride the escalations topic
            summary = {**service.pipeline.summary(), **service.worker.summary()}
            examples = service.worker.training_log.examples()
            metrics = service.metrics
        stand_in = server.stats

    for tid, result in results.items():
        assert result.audited == (tid in audited), tid
        assert result.route.value == "student"
        assert result.fields == student_labels(result)  # audited or not: the student's answer
        assert result.teacher is None and result.model == student.model_name
    # The teacher was asked about exactly the audited tickets (and nothing escalated).
    assert set(stand_in["answered"]) == {normalise(text_of[t]) for t in audited}
    assert stand_in["chat_requests"] == len(audited)
    assert summary["escalations"] == 0 and summary["audits"] == len(audited)
    agree = [results[t].fields["intent"] == gold_of[t] for t in audited]
    assert 0 < sum(agree) < len(agree), agree  # so a wrong accuracy cannot pass by luck
    assert summary["audited_samples"] == len(audited)
    assert summary["audited_accuracy"] == pytest.approx(sum(agree) / len(agree))
    low, high = summary["audited_ci95"]
    assert low <= summary["audited_accuracy"] <= high
    assert sample(metrics, "triage_audited_samples") == len(audited)
    assert sample(metrics, "triage_audited_accuracy") == pytest.approx(sum(agree) / len(agree))
    assert sample(metrics, "triage_audits_total") == len(audited)
    # Audit answers are the evaluation sample: logged as such, held out, never trained on.
    assert {ex.ticket_id for ex in examples} == audited
    assert all(ex.source == "sample" and ex.labels == {"intent": gold_of[ex.ticket_id]}
               for ex in examples)


# --- 3. teacher down for 30 s, 5 s deadline: unverified first, corrected later, same keys ----
async def test_teacher_down_30s_unverified_at_the_deadline_then_corrected(
    make_settings, student, gold, test_rows
):
    tickets = pick(test_rows, gold, 12, offset=900, prefix="down")
    text_of = {tid: row.text for tid, row in tickets}
    gold_of = {tid: row.label for tid, row in tickets}
    port = free_port()  # nothing listens there yet: the teacher is down (connection refused)
    settings = make_settings(
        teacher_base_url=f"http://127.0.0.1:{port}/v1", teacher_model=STANDIN_MODEL, teacher_api_key="test-key",
        confidence_threshold=1.0, eval_share=0.0, escalation_deadline_s=5.0,
        teacher_max_retries=1, teacher_timeout_s=0.5, teacher_retry_max_s=2.0,
        teacher_breaker_failures=4, teacher_breaker_reset_s=0.5,
    )
    await create_topics(settings)
    async with TriageService(settings, classifier=student).running() as service:
        down_since = time.monotonic()
        await publish_tickets(settings, tickets)
        first = await results_for(settings, set(text_of), timeout_s=60)
        assert time.monotonic() - down_since < 25  # users got an answer long before the teacher
        for tid, result in first.items():
            assert result.route.value == "unverified", tid
            assert result.fields == student_labels(result)  # the student's answer, flagged
            assert result.latency_ms >= 4_500, result.latency_ms  # not before the deadline
        # The escalations wait in the worker (visible on the dashboard), nothing is logged yet.
        await eventually(lambda: sample(service.metrics, "triage_escalations_waiting") == len(tickets),
                         "escalations waiting gauge", 10)
        assert service.worker.training_log.count() == 0
        await asyncio.sleep(max(0.0, 30 - (time.monotonic() - down_since)))
        async with run_standin(port=port, gold=gold) as server:  # the teacher is back
            final = await results_for(settings, set(text_of), timeout_s=90,
                                      final=lambda r: r.route.value == "teacher")
            assert await service.worker.idle(30)
            answered = list(server.stats["answered"])
        examples = service.worker.training_log.examples()
        summary = service.worker.summary()
        metrics = service.metrics

    for tid, result in final.items():
        assert result.fields == {"intent": gold_of[tid]} and result.teacher_model == STANDIN_MODEL
        assert result.student == first[tid].student  # the student's answer travels along
    # Per key, in topic order: the unverified answer, then the correction; nothing else.
    published = await all_results(settings, 2 * len(tickets), settle_s=1.0)
    routes: dict[str, list[str]] = {}
    for r in published:
        routes.setdefault(r.key.decode(), []).append(json.loads(r.value)["route"])
    assert routes == {tid: ["unverified", "teacher"] for tid in text_of}
    # Nothing lost, nothing asked twice: the teacher answered each text once, all logged as live.
    assert sorted(answered) == sorted(normalise(t) for t in text_of.values())
    assert {ex.text for ex in examples} == set(text_of.values())
    assert all(ex.source == "live" and ex.labels == {"intent": gold_of[ex.ticket_id]} for ex in examples)
    assert summary["corrections"] == len(tickets) and summary["unverified"] == len(tickets)
    assert sample(metrics, "triage_corrections_total") == len(tickets)
    assert sample(metrics, "triage_escalations_waiting") == 0


# --- 4. the API key never reaches a log ------------------------------------------------------
async def test_api_key_absent_from_all_logs(
    make_settings, student, gold, test_rows, caplog, capfd, monkeypatch
):
    for name in (None, "openai", "httpx", "httpcore", "aiokafka", "faststream", "services",
                 "aiohttp"):
        caplog.set_level(logging.DEBUG, logger=name)
    ok_batch = pick(test_rows, gold, 6, offset=1200, prefix="key-ok")
    bad_batch = pick(test_rows, gold, 6, offset=1260, prefix="key-bad")
    text_of = {tid: row.text for tid, row in ok_batch + bad_batch}

    # The production path for the key: the environment, read by Settings.
    monkeypatch.setenv("TRIAGE_TEACHER_API_KEY", KEY)
    async with run_standin(gold=gold, api_key=KEY) as server:
        settings = make_settings(
            teacher_base_url=server.base_url, teacher_model=STANDIN_MODEL, confidence_threshold=1.0, eval_share=0.0,
            teacher_max_retries=3, teacher_timeout_s=2.0,
            teacher_breaker_failures=3, teacher_breaker_reset_s=0.5, escalation_deadline_s=1.0,
            teacher_retry_max_s=1.0,
        )
        assert settings.teacher_api_key.get_secret_value() == KEY
        await create_topics(settings)
        async with TriageService(settings, classifier=student).running() as service:
            log_ = service.worker.training_log
            # Faulty but recoverable: 500s and 429s retried, then answered with the key.
            server.set_faults(script=["error", "rate_limit", "error"])
            await publish_tickets(settings, ok_batch)
            ok = await results_for(settings, {t for t, _ in ok_batch}, final=lambda r: r.route.value == "teacher")
            # An outage: retries, the breaker, unverified at the deadline; then corrections.
            server.set_faults(error_rate=1.0)
            await publish_tickets(settings, bad_batch)
            bad = await results_for(settings, {t for t, _ in bad_batch})
            server.set_faults(error_rate=0.0)
            await results_for(settings, {t for t, _ in bad_batch}, final=lambda r: r.route.value == "teacher")
            assert await service.worker.idle(60)
            teacher = service.worker.teacher
            blobs = [
                repr(teacher), str(teacher.stats()), str(service.pipeline.summary()),
                str(service.worker.summary()), repr(service.worker),
                service.metrics.exposition().decode(), repr(log_.examples()),
                repr(service.pipeline), repr(service),
            ]
        stand_in = server.stats
        published = await all_results(settings, len(text_of) + len(bad_batch), settle_s=0.5)

    # The key was really used (the stand-in answers 401 without it) and faults really happened.
    assert {r.route.value for r in ok.values()} == {"teacher"}
    assert {r.route.value for r in bad.values()} == {"unverified"}
    assert 401 not in stand_in["by_status"]
    assert stand_in["by_status"][500] > 0 and stand_in["by_status"][429] > 0
    # The capture saw DEBUG output of the HTTP client and the service, so absence means something.
    names = {r.name for r in caplog.records}
    assert any(n.startswith(("openai", "httpx", "httpcore")) for n in names), names
    assert any(n.startswith("services") for n in names), names
    assert any(r.levelno == logging.DEBUG for r in caplog.records)

    captured = capfd.readouterr()
    blobs += [caplog.text, captured.out, captured.err,
              repr(settings), str(settings), settings.model_dump_json(), str(settings.model_dump()),
              json.dumps(settings.model_dump(mode="json"))]
    for record in caplog.records:
        blobs.append(record.getMessage())
        blobs.append(repr(record.args))
        if record.exc_info:
            blobs.append("".join(traceback.format_exception(*record.exc_info)))
    blobs += [r.value.decode() for r in published]
    for blob in blobs:
        assert KEY_SECRET_PART not in blob
