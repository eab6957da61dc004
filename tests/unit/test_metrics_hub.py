"""One process, several tasks: one exposition with a `task` label, readiness per task."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from services.stream.metrics import ServiceMetrics, serve_metrics
from services.stream.metrics_hub import TaskMetricsHub
from tests.integration.scrape import Samples, aget


def hub() -> TaskMetricsHub:
    a, b, broken = ServiceMetrics(), ServiceMetrics(), ServiceMetrics()
    a.observe_result("student", 0.9, 0.1)
    a.observe_result("student", 0.8, 0.1)
    b.observe_result("teacher", None, None)
    b.forwarded_to("a")
    a.set_ready(True, "engine warm")
    b.set_ready(False, "waiting for partition assignment")
    broken.set_ready(False, "task failed to load: FileNotFoundError")
    return TaskMetricsHub({"a": a, "b": b, "broken": broken}, {"broken": "FileNotFoundError: x.json"})


def test_one_family_per_metric_and_every_series_labelled_by_task():
    text = hub().exposition().decode()
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))  # one HELP/TYPE per family, all tasks' samples in it
    samples = Samples.parse(text)
    assert samples.value("triage_results_total", route="student", task="a") == 2
    assert samples.value("triage_results_total", route="teacher", task="b") == 1
    assert samples.value("triage_forwarded_total", to="a", task="b") == 1
    assert samples.value("triage_ready", task="broken") == 0
    assert all(dict(labels).get("task") for (name, labels) in samples)


def test_a_task_that_failed_to_load_does_not_hold_the_others_back():
    h = hub()
    assert h.task_readiness("broken") == (False, "task failed to load: FileNotFoundError: x.json")
    assert h.task_readiness("a") == (True, "engine warm") and h.task_readiness("nope") is None
    ok, why = h.readiness()
    assert not ok and "b: not ready" in why  # b is loaded and not ready yet
    h.metrics["b"].set_ready(True, "ready")
    ok, why = h.readiness()
    assert ok and "broken: FAILED" in why


async def test_readyz_per_task_over_http():
    h = hub()
    async with serve_metrics(h, "127.0.0.1", 0, h.readiness, task_readiness=h.task_readiness) as port:
        assert (await aget(port, "/readyz/a"))[0] == 200
        status, body = await aget(port, "/readyz/broken")
        assert status == 503 and "FileNotFoundError" in body
        assert (await aget(port, "/readyz/nope"))[0] == 404
        assert (await aget(port, "/readyz"))[0] == 503  # b is not ready
        status, body = await aget(port, "/metrics")
        assert status == 200 and 'task="b"' in body


def test_readiness_reason_lists_every_task_and_histograms_keep_their_series():
    a = ServiceMetrics()
    a.set_ready(True, "engine warm")
    a.observe_batch(3, 0.2)
    h = TaskMetricsHub({"a": a}, {"gone": "ValueError: bad spec"})  # no ServiceMetrics for "gone"
    assert h.readiness() == (True, "a: ready (engine warm); gone: FAILED (task failed to load: ValueError: bad spec)")
    assert TaskMetricsHub({}, {"gone": "x"}).readiness()[0] is False  # nothing loaded: not ready
    samples = Samples.parse(h.exposition().decode())
    assert samples.value("triage_batch_size_bucket", le="4.0", task="a") == 1
    assert samples.value("triage_batch_size_count", task="a") == 1
    assert samples.value("triage_engine_latency_seconds_sum", task="a") == 0.2
