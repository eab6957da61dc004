"""Tickets on a real Tansu broker -> the real vLLM student -> results / dead-letter topics."""

from __future__ import annotations

import asyncio
import json

import pytest

from schemas.classification import Classification
from schemas.dead_letter import DeadLetter
from services.stream.app import TriageService
from services.dev.datasets import load_split
from services.stream.kafka_io import produce, read_topic, ticket_message, unique_keys
from tests.conftest import create_topics

pytestmark = pytest.mark.integration


def _tickets(n: int, offset: int = 0):
    rows = load_split("test")[offset : offset + n]
    return [(f"t-{offset + i}", row) for i, row in enumerate(rows)]


async def test_round_trip_publishes_one_strict_result_per_ticket(make_settings, student, task):
    settings = make_settings()
    await create_topics(settings)
    tickets = _tickets(12)
    async with TriageService(settings, classifier=student).running():
        await produce(settings.bootstrap_servers, settings.tickets_topic,
                      [ticket_message(tid, row.text) for tid, row in tickets])
        got = await read_topic(settings.bootstrap_servers, settings.results_topic,
                               until=lambda r: len(unique_keys(r)) >= len(tickets), timeout_s=120)
    results = {r.key.decode(): Classification.model_validate_json(r.value) for r in got}
    assert set(results) == {tid for tid, _ in tickets}
    labels = set(task.fields[0].labels)
    for tid, result in results.items():
        assert result.ticket_id == tid
        assert result.fields["intent"] in labels
        assert 0.0 < result.student["intent"].confidence <= 1.0
        assert result.model == student.model_name
        assert result.route.value in {"student", "teacher", "unverified"}
        assert result.latency_ms > 0
    # Strict JSON: every published value re-parses with no unknown fields.
    assert all(set(json.loads(r.value)) <= set(Classification.model_fields) for r in got)


async def test_malformed_input_goes_to_dead_letter_with_reason(make_settings, student):
    settings = make_settings()
    await create_topics(settings)
    good = [ticket_message(tid, row.text) for tid, row in _tickets(6, offset=100)]
    bad = {
        b"bad-utf8": (b"\xff\xfe{not utf8", "not_utf8"),
        b"bad-json": (b'{"id": "x", "text": ', "not_json"),
        b"bad-missing": (json.dumps({"text": "no id here"}).encode(), "invalid_schema"),
        b"bad-empty": (json.dumps({"id": "e1", "text": "   "}).encode(), "empty_text"),
        b"bad-long": (json.dumps({"id": "l1", "text": "x" * 5000}).encode(), "text_too_long"),
        b"bad-array": (b"[1, 2, 3]", "invalid_schema"),
        b"bad-null": (b"", "empty_message"),
    }
    stream = []
    for i, (key, (value, _)) in enumerate(bad.items()):  # interleave good and bad
        stream.append((key, value))
        if i < len(good):
            stream.append(good[i])
    async with TriageService(settings, classifier=student).running():
        await produce(settings.bootstrap_servers, settings.tickets_topic, stream)
        dlq = await read_topic(settings.bootstrap_servers, settings.dead_letter_topic,
                               until=lambda r: len(r) >= len(bad), timeout_s=120)
        results = await read_topic(settings.bootstrap_servers, settings.results_topic,
                                   until=lambda r: len(unique_keys(r)) >= len(good), timeout_s=120)
    letters = {r.key: DeadLetter.model_validate_json(r.value) for r in dlq}
    assert set(letters) == set(bad)
    for key, (value, reason) in bad.items():
        assert letters[key].reason == reason, key
        assert letters[key].detail
        assert letters[key].original() == value  # original bytes, losslessly
        assert letters[key].source_topic == settings.tickets_topic
    assert unique_keys(results) == {k for k, _ in good}


async def test_service_stopped_mid_stream_and_restarted_loses_nothing(make_settings, student):
    # Small batches and enough tickets that the stop lands mid-stream even on a fast engine
    # (bf16 classified 60 tickets in batches of 8 before the reader's first fetch).
    settings = make_settings(max_batch=4)
    await create_topics(settings)
    tickets = _tickets(160, offset=200)
    await produce(settings.bootstrap_servers, settings.tickets_topic,
                  [ticket_message(tid, row.text) for tid, row in tickets])
    async with TriageService(settings, classifier=student).running():
        # Stop as soon as some (not all) results are out.
        partial = await read_topic(settings.bootstrap_servers, settings.results_topic,
                                   until=lambda r: len(r) >= 10, timeout_s=120)
    assert len(unique_keys(partial)) < len(tickets)
    async with TriageService(settings, classifier=student).running():
        final = await read_topic(settings.bootstrap_servers, settings.results_topic,
                                 until=lambda r: len(unique_keys(r)) >= len(tickets), timeout_s=180)
    assert unique_keys(final) == {tid.encode() for tid, _ in tickets}
    await asyncio.sleep(0)
