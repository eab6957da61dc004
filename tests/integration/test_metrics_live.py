"""/metrics and /readyz of a running service, scraped over HTTP, move with a real stream.

Real Tansu broker, the real vLLM student (shared fixture), the service's own metrics server
on a free port. Counters are compared before/after producing 20 tickets + 2 malformed ones.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from schemas.classification import Classification
from services.stream.app import TriageService
from services.dev.broker import free_port
from services.dev.datasets import load_split
from services.stream.kafka_io import produce, read_topic, ticket_message, unique_keys
from tests.conftest import create_topics
from tests.integration.scrape import aget, scrape, wait_for

pytestmark = pytest.mark.integration

N_GOOD = 20
MALFORMED = {  # key -> (value, dead-letter reason)
    b"bad-json": (b'{"id": "bad-json", "text": ', "not_json"),
    b"bad-blank": (json.dumps({"id": "bad-blank", "text": "   "}).encode(), "empty_text"),
}


async def test_metrics_and_readiness_follow_a_live_stream(make_settings, student):
    settings = make_settings(metrics_port=free_port(), topic_partitions=2, max_batch=8)
    await create_topics(settings)
    rows = load_split("test")[300 : 300 + N_GOOD]
    good = [ticket_message(f"m-{i}", row.text) for i, row in enumerate(rows)]
    stream = good[:7] + [(k, v) for k, (v, _) in MALFORMED.items()] + good[7:]
    service = TriageService(settings, classifier=student)

    async with service.resources():  # metrics server + engine up; consumer not started yet
        port = service.metrics_port
        assert port == settings.metrics_port
        assert (await aget(port, "/healthz"))[0] == 200
        status, reason = await aget(port, "/readyz")
        assert status == 503, reason  # no partitions yet: not ready
        idle = await scrape(port)
        assert idle.value("triage_ready") == 0
        assert idle.value("triage_live_adapter_info", adapter_id="base") == 1

        await service.app.start()
        try:
            _, reason = await wait_for(
                _ready(port), timeout_s=60, what="/readyz 200 after partition assignment"
            )
            assert "2 partitions assigned" in reason, reason
            before = await wait_for(
                _lag_series(port, settings.tickets_topic, {0, 1}), timeout_s=30,
                what="a triage_consumer_lag series per partition",
            )
            assert before.value("triage_ready") == 1

            await produce(settings.bootstrap_servers, settings.tickets_topic, stream)
            got = await read_topic(settings.bootstrap_servers, settings.results_topic,
                                   until=lambda r: len(unique_keys(r)) >= N_GOOD, timeout_s=180)
            dlq = await read_topic(settings.bootstrap_servers, settings.dead_letter_topic,
                                   until=lambda r: len(r) >= len(MALFORMED), timeout_s=60)
            assert unique_keys(got) == {k for k, _ in good}
            assert unique_keys(dlq) == set(MALFORMED)
            firsts = {}
            for r in got:
                firsts.setdefault(r.key, Classification.model_validate_json(r.value))
            routes = Counter(c.route.value for c in firsts.values())

            # Counters move after the broker acks, a moment after the reader sees the result.
            def moved(s) -> bool:
                return (
                    s.total("triage_results_total") - before.total("triage_results_total") >= N_GOOD
                    and s.total("triage_dead_letter_total") - before.total("triage_dead_letter_total")
                    >= len(MALFORMED)
                )

            after = await wait_for(_scrape_until(port, moved), timeout_s=30, what="counters to move")
            # ...and lag is reported as fully consumed within a watcher tick or two.
            after = await wait_for(
                _scrape_until(port, lambda s: set(s.lag_partitions(settings.tickets_topic).values()) == {0}),
                timeout_s=15, what="consumer lag back to 0 on every partition",
            )
        finally:
            await service.app.stop()

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert delta("triage_tickets_consumed_total") == N_GOOD + len(MALFORMED)
    for route in ("student", "teacher", "unverified"):
        assert delta("triage_results_total", route=route) == routes.get(route, 0), route
    assert delta("triage_results_total", route="teacher") == 0  # no teacher configured
    for _, (_, reason) in MALFORMED.items():
        assert delta("triage_dead_letter_total", reason=reason) == 1, reason
    assert after.total("triage_dead_letter_total") - before.total("triage_dead_letter_total") == 2
    assert delta("triage_end_to_end_latency_seconds_count") == N_GOOD
    assert delta("triage_confidence_count") == N_GOOD
    # Every valid ticket went through the engine exactly once, in one or more batches <= 8.
    batches = delta("triage_batch_size_count")
    assert delta("triage_batch_size_sum") == N_GOOD
    assert N_GOOD / 8 <= batches <= N_GOOD
    assert delta("triage_engine_latency_seconds_count") == batches
    assert after.value("triage_live_adapter_info", adapter_id="base") == 1
    assert len(after.series("triage_live_adapter_info")) == 1
    assert after.lag_partitions(settings.tickets_topic) == {0: 0.0, 1: 0.0}
    # e2e latencies are real (producer timestamp -> result acked), not zeros.
    assert after.value("triage_end_to_end_latency_seconds_sum") > 0


def _ready(port: int):
    async def check():
        status, body = await aget(port, "/readyz")
        return (status, body) if status == 200 else None

    return check


def _lag_series(port: int, topic: str, partitions: set[int]):
    async def check():
        s = await scrape(port)
        return s if set(s.lag_partitions(topic)) == partitions else None

    return check


def _scrape_until(port: int, predicate):
    async def check():
        s = await scrape(port)
        return s if predicate(s) else None

    return check
