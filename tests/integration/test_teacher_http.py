"""OpenAITeacher against the gold-label stand-in over real HTTP (loopback, port 0)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
from pathlib import Path

import pytest
from pydantic import SecretStr

from schemas.task import TaskSpec, default_task_path
from services.dev.datasets import load_split
from services.teacher.client import OpenAITeacher, TeacherUnavailable
from services.teacher.prompt import build_teacher_messages
from services.dev.standin import load_gold, run_standin

pytestmark = pytest.mark.integration

TASK = TaskSpec.from_file(default_task_path())
REPO = Path(__file__).resolve().parents[2]
KEY = "sk-triage-DISTINCTIVE-4f3c2a1b0e9d8c7b"


@pytest.fixture(scope="module")
def gold() -> dict[str, str]:
    return load_gold()


@pytest.fixture(scope="module")
def test_rows():
    return load_split("test")


class FakeClock:
    def __init__(self) -> None:
        self.t = 10_000.0

    def __call__(self) -> float:
        return self.t


def make_teacher(base_url: str, **overrides) -> OpenAITeacher:
    kwargs = dict(
        base_url=base_url, api_key=SecretStr("test-key"), model="gold-label-standin",
        task=TASK, few_shot=2, timeout_s=5.0, max_retries=3, concurrency=4,
        input_price_per_mtok=0.15, output_price_per_mtok=0.60, budget_per_hour_usd=None,
        budget_per_day_usd=None, breaker_failures=5, breaker_reset_s=15.0,
        backoff_base_s=0.01, backoff_max_s=0.05,
    )
    kwargs.update(overrides)
    return OpenAITeacher(**kwargs)


async def test_gold_labels_for_known_texts(gold, test_rows):
    rows = test_rows[:30]
    async with run_standin(gold=gold, latency_ms=5) as server:
        teacher = make_teacher(server.base_url)
        try:
            answers = await asyncio.gather(*(teacher.label(r.text) for r in rows))
        finally:
            await teacher.aclose()
    assert [a.labels for a in answers] == [{"intent": r.label} for r in rows]
    first = answers[0]
    assert first.model == "gold-label-standin"
    assert first.prompt_tokens > 100 and first.completion_tokens > 0
    assert first.cost_usd == pytest.approx(
        first.prompt_tokens * 0.15e-6 + first.completion_tokens * 0.60e-6)
    assert len({a.prompt_hash for a in answers}) == 1
    stats = teacher.stats()
    assert stats["ok"] == 30 and stats["attempts"] == 30 and stats["breaker"] == "closed"
    assert stats["cost_usd"] == pytest.approx(sum(a.cost_usd for a in answers))
    assert server.stats["by_status"] == {200: 30}
    assert 1 < server.stats["max_inflight"] <= 4  # the semaphore bounds concurrency


async def test_500_and_429_are_retried_to_success(test_rows):
    row = test_rows[0]
    outcomes = []
    async with run_standin() as server:
        teacher = make_teacher(server.base_url, max_retries=3,
                               on_request=lambda outcome, *rest: outcomes.append(outcome))
        server.set_faults(script=["error", "rate_limit", "error"])
        try:
            answer = await teacher.label(row.text)
        finally:
            await teacher.aclose()
    assert answer.labels == {"intent": row.label}
    assert server.stats["by_status"] == {500: 2, 429: 1, 200: 1}
    assert outcomes == ["error", "rate_limited", "error", "ok"]
    assert teacher.stats()["attempts"] == 4 and teacher.stats()["ok"] == 1


async def test_random_faults_retried_to_success(gold, test_rows):
    rows = test_rows[100:130]
    async with run_standin(gold=gold, seed=7, error_rate=0.3, rate_limit_rate=0.2) as server:
        teacher = make_teacher(server.base_url, max_retries=12)
        try:
            answers = await asyncio.gather(*(teacher.label(r.text) for r in rows))
        finally:
            await teacher.aclose()
    assert [a.labels["intent"] for a in answers] == [r.label for r in rows]
    by_status = server.stats["by_status"]
    assert by_status[200] == 30 and by_status[500] > 0 and by_status[429] > 0


async def test_retry_after_is_honoured_over_backoff(test_rows):
    # Backoff would sleep up to 30 s; the stand-in's 429 says Retry-After: 0.
    async with run_standin() as server:
        teacher = make_teacher(server.base_url, backoff_base_s=30.0, backoff_max_s=30.0)
        server.set_faults(script=["rate_limit", "rate_limit"])
        start = time.perf_counter()
        try:
            await teacher.label(test_rows[0].text)
        finally:
            await teacher.aclose()
    assert time.perf_counter() - start < 5.0


async def test_other_4xx_not_retried(test_rows):
    async with run_standin(api_key="the-right-key") as server:
        teacher = make_teacher(server.base_url, api_key=SecretStr("a-wrong-key"))
        try:
            with pytest.raises(TeacherUnavailable) as info:
                await teacher.label(test_rows[0].text)
        finally:
            await teacher.aclose()
    assert info.value.reason == "error" and "401" in info.value.detail
    assert server.stats["by_status"] == {401: 1}


async def test_invalid_answers_retried_then_reported(test_rows):
    async with run_standin(invalid_rate=1.0) as server:
        teacher = make_teacher(server.base_url, max_retries=2)
        try:
            with pytest.raises(TeacherUnavailable) as info:
                await teacher.label(test_rows[0].text)
            server.set_faults(invalid_rate=0.0)
            assert (await teacher.label(test_rows[0].text)).labels["intent"] == test_rows[0].label
        finally:
            await teacher.aclose()
    assert info.value.reason == "invalid_answer"
    assert server.stats["chat_requests"] == 3 + 1
    assert teacher.stats()["errors"]["invalid_answer"] == 3


async def test_per_ticket_failures_never_open_the_breaker(test_rows):
    """Invalid answers and a per-request 4xx (413: the ticket is too big) are the ticket's
    problem: many in a row leave the circuit closed for live traffic. Transient failures
    (5xx after retries) still open it."""
    text, label = test_rows[0].text, test_rows[0].label
    huge = "my card " * 300_000  # ~2.4 MB body: over aiohttp's 1 MiB limit -> HTTP 413
    async with run_standin(invalid_rate=1.0) as server:
        teacher = make_teacher(server.base_url, max_retries=1, breaker_failures=2)
        try:
            for _ in range(3):
                with pytest.raises(TeacherUnavailable) as info:
                    await teacher.label(text)
                assert (info.value.reason, info.value.scope) == ("invalid_answer", "ticket")
            server.set_faults(invalid_rate=0.0)
            for _ in range(3):
                with pytest.raises(TeacherUnavailable) as info:
                    await teacher.label(huge)
                assert (info.value.reason, info.value.scope) == ("error", "ticket")
                assert "413" in info.value.detail
            assert teacher.stats()["breaker"] == "closed"
            assert (await teacher.label(text)).labels == {"intent": label}  # not circuit_open

            server.set_faults(script=["error"] * 4)  # 2 calls x (1 + 1 retry) of HTTP 500
            for _ in range(2):
                with pytest.raises(TeacherUnavailable) as info:
                    await teacher.label(text)
                assert (info.value.reason, info.value.scope) == ("error", "transient")
            with pytest.raises(TeacherUnavailable) as info:
                await teacher.label(text)
            assert info.value.reason == "circuit_open" and info.value.scope == "teacher"
        finally:
            await teacher.aclose()
    assert server.stats["by_status"][500] == 4
    assert server.stats["invalid"] == 3 * 2  # each invalid call was retried once


async def test_wrong_key_is_teacher_wide_and_opens_the_breaker(test_rows):
    async with run_standin(api_key="the-right-key") as server:
        teacher = make_teacher(server.base_url, api_key=SecretStr("a-wrong-key"),
                               breaker_failures=2)
        try:
            reasons = []
            for _ in range(3):
                with pytest.raises(TeacherUnavailable) as info:
                    await teacher.label(test_rows[0].text)
                reasons.append((info.value.reason, info.value.scope))
        finally:
            await teacher.aclose()
    assert reasons == [("error", "teacher"), ("error", "teacher"), ("circuit_open", "teacher")]
    assert server.stats["by_status"] == {401: 2}


async def test_timeouts_open_breaker_fail_fast_then_recover(test_rows):
    text, label = test_rows[0].text, test_rows[0].label
    clock = FakeClock()
    async with run_standin(timeout_rate=1.0) as server:
        teacher = make_teacher(server.base_url, timeout_s=0.3, max_retries=1,
                               breaker_failures=2, breaker_reset_s=10.0, clock=clock)
        try:
            for _ in range(2):
                with pytest.raises(TeacherUnavailable) as info:
                    await teacher.label(text)
                assert info.value.reason == "timeout"
            assert server.stats["hangs"] == 4  # 2 calls x (1 + 1 retry)
            assert teacher.stats()["breaker"] == "open"

            start = time.perf_counter()
            with pytest.raises(TeacherUnavailable) as info:
                await teacher.label(text)
            assert info.value.reason == "circuit_open"
            assert time.perf_counter() - start < 0.1
            assert server.stats["chat_requests"] == 4  # no request went out

            # Half-open: one probe; a concurrent call fails fast; the probe times out.
            clock.t += 10.0
            probe = asyncio.create_task(teacher.label(text))
            await asyncio.sleep(0.05)
            with pytest.raises(TeacherUnavailable) as info:
                await teacher.label(text)
            assert info.value.reason == "circuit_open"
            with pytest.raises(TeacherUnavailable):
                await probe
            assert teacher.stats()["breaker"] == "open"

            # The teacher heals; the breaker stays open until reset_s, then recovers.
            server.set_faults(timeout_rate=0.0)
            with pytest.raises(TeacherUnavailable) as info:
                await teacher.label(text)
            assert info.value.reason == "circuit_open"
            clock.t += 10.0
            assert (await teacher.label(text)).labels == {"intent": label}
            assert teacher.stats()["breaker"] == "closed"
            assert (await teacher.label(text)).labels == {"intent": label}
        finally:
            await teacher.aclose()


async def test_budget_caps_stop_calls(test_rows):
    text = test_rows[0].text
    clock = FakeClock()
    async with run_standin() as server:
        # Price the stand-in's prompt (chars / 4 tokens) at ~$0.7 per call.
        chars = sum(len(m["content"]) for m in build_teacher_messages(TASK, text, 2))
        teacher = make_teacher(server.base_url, input_price_per_mtok=0.7e6 / round(chars / 4),
                               budget_per_hour_usd=1.0, budget_per_day_usd=2.5, clock=clock)
        try:
            first = await teacher.label(text)
            assert first.cost_usd == pytest.approx(0.7, abs=0.01)
            await teacher.label(text)  # now over the hourly cap
            with pytest.raises(TeacherUnavailable) as info:
                await teacher.label(text)
            assert info.value.reason == "over_budget"
            assert server.stats["chat_requests"] == 2
            clock.t += 3661  # the hour rolls over (+ the one-minute bucket); the day does not
            await teacher.label(text)
            await teacher.label(text)
            calls = server.stats["chat_requests"]
            with pytest.raises(TeacherUnavailable) as info:
                await teacher.label(text)
            assert info.value.reason == "over_budget"
            clock.t += 3661
            with pytest.raises(TeacherUnavailable):  # hourly fine, daily cap still hit
                await teacher.label(text)
            assert server.stats["chat_requests"] == calls
            clock.t += 86_400
            await teacher.label(text)
            assert teacher.stats()["failed"]["over_budget"] == 3
        finally:
            await teacher.aclose()


async def test_api_key_never_logged_or_raised(caplog, test_rows):
    for name in (None, "openai", "httpx", "httpcore", "httpx2", "httpcore2", "services"):
        caplog.set_level(logging.DEBUG, logger=name)
    text = test_rows[0].text
    seen = []
    async with run_standin(api_key=KEY) as server:
        teacher = make_teacher(server.base_url, api_key=SecretStr(KEY), max_retries=2,
                               breaker_failures=2)
        try:
            assert (await teacher.label(text)).labels["intent"] == test_rows[0].label  # key works
            server.set_faults(error_rate=1.0)
            for _ in range(3):  # 500s, retries, then the breaker opens
                with pytest.raises(TeacherUnavailable) as info:
                    await teacher.label(text)
                seen.append(info.value)
            server.set_faults(error_rate=0.0)
        finally:
            await teacher.aclose()
        wrong = make_teacher(server.base_url, api_key=SecretStr(KEY + "-wrong"))
        try:
            with pytest.raises(TeacherUnavailable) as info:
                await wrong.label(text)
            seen.append(info.value)
        finally:
            await wrong.aclose()
    assert [e.reason for e in seen] == ["error", "error", "circuit_open", "error"]
    # The capture really saw the HTTP client's debug output (so absence below means something).
    assert any(r.name.startswith(("openai", "httpx", "httpcore")) for r in caplog.records)
    assert any(r.levelno == logging.DEBUG for r in caplog.records)
    texts = [caplog.text, repr(teacher), str(teacher.stats()), repr(wrong), str(wrong.stats())]
    for exc in seen:
        texts += [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    secret = KEY[len("sk-triage-"):]
    for blob in texts:
        assert secret not in blob


async def test_standin_unknown_texts_admin_and_models(gold):
    known = next(iter(gold))
    async with run_standin(gold=gold) as server:
        label, is_known = server.lookup(known.upper() + "  ")
        assert is_known and label == gold[known]
        label, is_known = server.lookup(known + " please")  # nearest known text
        assert not is_known and label == gold[known]
        label, _ = server.lookup("zzqx vvkw")  # no overlap: deterministic
        assert label == server.lookup("zzqx vvkw")[0] and label in server.labels
        assert server.stats["unknown_texts"] == 3 and server.stats["unknown_no_overlap"] == 2

        root = server.base_url.removesuffix("/v1")
        request = urllib.request.Request(
            f"{root}/admin/faults", data=json.dumps({"error_rate": 0.25}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(request).read())
        assert json.loads(body)["error_rate"] == 0.25 and server.faults.error_rate == 0.25
        models = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"{server.base_url}/models").read())
        assert json.loads(models)["data"][0]["id"] == "gold-label-standin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_standin_cli_serves():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.dev.standin", "--port", str(port),
         "--latency-ms", "20", "--http-error-rate", "0.1", "--rate-limit-rate", "0.05",
         "--timeout-rate", "0.0", "--noise-rate", "0.0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                health = await asyncio.to_thread(
                    lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read())
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read()
                assert time.monotonic() < deadline
                await asyncio.sleep(0.2)
        assert json.loads(health) == {"status": "ok", "standin": True,
                                      "model": "gold-label-standin"}
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert "STAND-IN" in out
