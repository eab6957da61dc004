"""services.stream.metrics: the metric contract, the helpers, and the HTTP endpoints over real sockets."""

from __future__ import annotations

import asyncio
import enum
import urllib.error
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from services.stream.metrics import ROUTES, ServiceMetrics, serve_metrics

# The names other code and the Grafana dashboard rely on (family name -> type).
CONTRACT = {
    "triage_tickets_consumed": "counter",
    "triage_results": "counter",
    "triage_dead_letter": "counter",
    "triage_end_to_end_latency_seconds": "histogram",
    "triage_engine_latency_seconds": "histogram",
    "triage_batch_size": "histogram",
    "triage_confidence": "histogram",
    "triage_escalations": "counter",
    "triage_audits": "counter",
    "triage_eval_sample": "counter",
    "triage_escalation_rate": "gauge",
    "triage_audited_accuracy": "gauge",
    "triage_audited_samples": "gauge",
    "triage_escalations_waiting": "gauge",
    "triage_corrections": "counter",
    "triage_teacher_requests": "counter",
    "triage_teacher_tokens": "counter",
    "triage_teacher_cost_usd": "counter",
    "triage_teacher_latency_seconds": "histogram",
    "triage_live_adapter_info": "gauge",
    "triage_adapter_swaps": "counter",
    "triage_consumer_lag": "gauge",
    "triage_training_examples": "counter",
    "triage_ready": "gauge",
    "triage_engine_info": "gauge",
    "triage_threshold_refused": "gauge",
    "triage_batch_failures": "counter",
    "triage_batch_retry_streak": "gauge",
    "triage_drift_alert": "gauge",
    "triage_drift_window": "gauge",
    "triage_drift_baseline": "gauge",
    "triage_drift_windows": "counter",
    "triage_guarded_labels": "gauge",
    "triage_field_escalations": "counter",
    "triage_rejected_answers": "counter",
    "triage_forwarded": "counter",
    "triage_feedback": "counter",
    "triage_agreement": "gauge",
    "triage_agreement_low": "gauge",
    "triage_agreement_high": "gauge",
    "triage_agreement_samples": "gauge",
    "triage_human_corrections": "gauge",
}


def _get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read().decode()


async def get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    return await asyncio.to_thread(_get, port, path, method)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Exposition text -> {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict, name: str, **labels: str) -> float:
    return parsed[(name, tuple(sorted(labels.items())))]


def test_registry_holds_exactly_the_contract() -> None:
    metrics = ServiceMetrics()
    families = {f.name: f.type for f in metrics.registry.collect()}
    assert families == CONTRACT


def test_instances_are_independent_and_leave_the_global_registry_alone() -> None:
    before = set(REGISTRY._names_to_collectors)  # noqa: SLF001
    a, b = ServiceMetrics(), ServiceMetrics()  # a shared registry would raise "Duplicated timeseries"
    a.ticket_consumed(5)
    assert a.tickets_consumed._value.get() == 5  # noqa: SLF001
    assert b.tickets_consumed._value.get() == 0  # noqa: SLF001
    assert set(REGISTRY._names_to_collectors) == before  # noqa: SLF001


def test_buckets_match_the_spec() -> None:
    m = ServiceMetrics()
    assert m.e2e_latency._upper_bounds[0] == 0.005  # noqa: SLF001
    assert m.e2e_latency._upper_bounds[-2] == 60.0  # noqa: SLF001 (last is +Inf)
    assert m.batch_size._upper_bounds[:-1] == [float(2**i) for i in range(11)]  # noqa: SLF001
    conf = m.confidence._upper_bounds[:-1]  # noqa: SLF001
    assert conf[0] == 0.0 and conf[-1] == 1.0 and len(conf) == 21
    assert all(abs((hi - lo) - 0.05) < 1e-9 for lo, hi in zip(conf, conf[1:]))


def test_str_enum_routes_are_labelled_by_value() -> None:
    class Route(str, enum.Enum):  # str(Route.student) == "Route.student" on 3.11
        student = "student"

    m = ServiceMetrics()
    m.observe_result(Route.student, 0.9)  # type: ignore[arg-type]
    assert m.results.labels(route="student")._value.get() == 1  # noqa: SLF001
    assert {s.labels["route"] for s in m.results.collect()[0].samples} == set(ROUTES)


def test_unknown_label_values_fail_fast() -> None:
    m = ServiceMetrics()
    with pytest.raises(ValueError, match="route"):
        m.observe_result("teachr", 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="outcome"):
        m.teacher_request("boom")  # type: ignore[arg-type]


async def test_metrics_endpoint_reflects_observations() -> None:
    m = ServiceMetrics()
    async with serve_metrics(m, "127.0.0.1", 0, m.readiness) as port:
        assert port > 0
        status, ctype, body = await get(port, "/metrics")
        assert status == 200 and ctype.startswith("text/plain") and "version=0.0.4" in ctype
        before = samples(body)
        assert value(before, "triage_tickets_consumed_total") == 0
        assert value(before, "triage_results_total", route="unverified") == 0  # pre-created

        m.ticket_consumed(3)
        m.observe_result("student", 0.92, 0.2)
        m.observe_result("teacher", 0.31, 1.5)
        m.dead_lettered("invalid_json")
        m.observe_batch(7, 0.4)
        m.escalated()
        m.audited(2)
        m.set_escalation_rate(0.25)
        m.set_audit(0.875, 40)
        m.teacher_request("ok", 0.8, prompt_tokens=120, completion_tokens=6, cost_usd=0.0015)
        m.teacher_request("circuit_open")
        m.training_examples_logged(4)

        status, _, body = await get(port, "/metrics")
        after = samples(body)
    assert status == 200
    assert value(after, "triage_tickets_consumed_total") == 3
    assert value(after, "triage_results_total", route="student") == 1
    assert value(after, "triage_results_total", route="teacher") == 1
    assert value(after, "triage_results_total", route="unverified") == 0
    assert value(after, "triage_dead_letter_total", reason="invalid_json") == 1
    assert value(after, "triage_end_to_end_latency_seconds_count") == 2
    assert value(after, "triage_end_to_end_latency_seconds_sum") == pytest.approx(1.7)
    assert value(after, "triage_end_to_end_latency_seconds_bucket", le="0.25") == 1
    assert value(after, "triage_batch_size_bucket", le="4.0") == 0
    assert value(after, "triage_batch_size_bucket", le="8.0") == 1
    assert value(after, "triage_engine_latency_seconds_sum") == pytest.approx(0.4)
    assert value(after, "triage_confidence_bucket", le="0.3") == 0
    assert value(after, "triage_confidence_bucket", le="0.35") == 1
    assert value(after, "triage_confidence_count") == 2
    assert value(after, "triage_escalations_total") == 1
    assert value(after, "triage_audits_total") == 2
    assert value(after, "triage_escalation_rate") == 0.25
    assert value(after, "triage_audited_accuracy") == 0.875
    assert value(after, "triage_audited_samples") == 40
    assert value(after, "triage_teacher_requests_total", outcome="ok") == 1
    assert value(after, "triage_teacher_requests_total", outcome="circuit_open") == 1
    assert value(after, "triage_teacher_requests_total", outcome="error") == 0
    assert value(after, "triage_teacher_latency_seconds_count") == 1  # skipped calls: no latency
    assert value(after, "triage_teacher_tokens_total", kind="prompt") == 120
    assert value(after, "triage_teacher_tokens_total", kind="completion") == 6
    assert value(after, "triage_teacher_cost_usd_total") == pytest.approx(0.0015)
    assert value(after, "triage_training_examples_total") == 4


async def test_readyz_follows_the_readiness_callable() -> None:
    m = ServiceMetrics()
    state = {"ok": False, "why": "engine starting"}
    async with serve_metrics(m, "127.0.0.1", 0, lambda: (state["ok"], state["why"])) as port:
        status, _, body = await get(port, "/readyz")
        assert (status, body.strip()) == (503, "engine starting")
        state.update(ok=True, why="ready")
        status, _, body = await get(port, "/readyz")
        assert (status, body.strip()) == (200, "ready")
        state.update(ok=False, why="consumer left the group")
        assert (await get(port, "/readyz"))[:1] == (503,)


async def test_default_readiness_uses_set_ready_and_gauge() -> None:
    m = ServiceMetrics()
    async with serve_metrics(m, "127.0.0.1", 0) as port:
        status, _, body = await get(port, "/readyz")
        assert status == 503 and body.strip() == "starting"
        m.set_ready(True)
        assert (await get(port, "/readyz"))[0] == 200
        assert value(samples((await get(port, "/metrics"))[2]), "triage_ready") == 1
        m.set_ready(False, "draining")
        status, _, body = await get(port, "/readyz")
        assert (status, body.strip()) == (503, "draining")
        assert value(samples((await get(port, "/metrics"))[2]), "triage_ready") == 0


async def test_broken_readiness_is_503_and_server_survives() -> None:
    def boom() -> tuple[bool, str]:
        raise RuntimeError("engine handle gone")

    m = ServiceMetrics()
    async with serve_metrics(m, "127.0.0.1", 0, boom) as port:
        status, _, body = await get(port, "/readyz")
        assert status == 503 and "engine handle gone" in body
        assert (await get(port, "/healthz"))[:1] == (200,)


async def test_healthz_404_405_and_shutdown() -> None:
    m = ServiceMetrics()
    async with serve_metrics(m, "127.0.0.1", 0, m.readiness) as port:
        assert (await get(port, "/healthz"))[0::2] == (200, "ok\n")
        assert (await get(port, "/healthz?probe=1"))[0] == 200
        assert (await get(port, "/nope"))[0] == 404
        assert (await get(port, "/metrics", method="POST"))[0] == 405
        status, ctype, body = await get(port, "/metrics", method="HEAD")
        assert status == 200 and body == "" and "version=0.0.4" in ctype
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{port}/healthz", None, 2)


async def test_live_adapter_label_swaps() -> None:
    m = ServiceMetrics()
    async with serve_metrics(m, "127.0.0.1", 0, m.readiness) as port:
        parsed = samples((await get(port, "/metrics"))[2])
        live = {k[1]: v for k, v in parsed.items() if k[0] == "triage_live_adapter_info"}
        assert live == {(("adapter_id", "base"),): 1}

        m.set_live_adapter("a1b2c3")
        m.adapter_swapped("d4e5f6")
        parsed = samples((await get(port, "/metrics"))[2])
    live = {k[1]: v for k, v in parsed.items() if k[0] == "triage_live_adapter_info"}
    assert live == {(("adapter_id", "d4e5f6"),): 1}  # previous label sets are gone
    assert value(parsed, "triage_adapter_swaps_total") == 1  # set_live_adapter alone is no swap
    m.set_live_adapter(None)
    assert [s.labels for s in m.live_adapter.collect()[0].samples] == [{"adapter_id": "base"}]


async def test_set_lag_per_partition() -> None:
    m = ServiceMetrics()
    m.set_lag("triage.tickets", 0, 5)
    m.set_lag("triage.tickets", 1, 7)
    m.set_lag("triage.tickets", 1, 9)  # overwrite, not add
    m.set_lag("triage.tickets", 2, -3)  # end offset raced the position: clamp to 0
    async with serve_metrics(m, "127.0.0.1", 0, m.readiness) as port:
        parsed = samples((await get(port, "/metrics"))[2])
        lag = {dict(k[1])["partition"]: v for k, v in parsed.items() if k[0] == "triage_consumer_lag"}
        assert lag == {"0": 5, "1": 9, "2": 0}
        m.remove_lag("triage.tickets", 1)
        m.remove_lag("triage.tickets", 42)  # unknown partition: no error
        parsed = samples((await get(port, "/metrics"))[2])
    lag = {dict(k[1])["partition"]: v for k, v in parsed.items() if k[0] == "triage_consumer_lag"}
    assert lag == {"0": 5, "2": 0}


def test_the_teacher_reports_here_through_its_own_port() -> None:
    """build_teacher takes any TeacherMetrics (the teacher layer never imports this module):
    every request outcome it can report is a label here, and its refused answers are counted."""
    from schemas.task import TaskSpec, default_task_path
    from services.settings import Settings
    from services.teacher.client import TEACHER_OUTCOMES, build_teacher

    m = ServiceMetrics()
    settings = Settings(_env_file=None, teacher_base_url="http://127.0.0.1:9/v1", teacher_model="m")
    teacher = build_teacher(settings, TaskSpec.from_file(default_task_path()), m)
    for outcome in TEACHER_OUTCOMES:
        teacher._notify(outcome, 0.1, 0, 0, 0.0)  # what OpenAITeacher reports per request
    teacher._notify("something_new", 0.1, 0, 0, 0.0)  # an outcome the metric does not know: "error"
    teacher.on_rejected_answer("span_not_in_text")
    parsed = samples(m.exposition().decode())
    assert {o: value(parsed, "triage_teacher_requests_total", outcome=o) for o in TEACHER_OUTCOMES} == {
        o: 2 if o == "error" else 1 for o in TEACHER_OUTCOMES}
    assert value(parsed, "triage_rejected_answers_total", source="teacher", reason="span_not_in_text") == 1
