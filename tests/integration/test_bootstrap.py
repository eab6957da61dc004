"""run_bootstrap against the gold-label stand-in: labels, dedup, crash + resume."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import SecretStr

from schemas.task import TaskSpec, default_task_path
from services.teacher.bootstrap import run_bootstrap
from services.dev.datasets import load_split
from services.teacher.client import OpenAITeacher
from schemas.text import dedup_key as normalise
from services.dev.standin import load_gold, run_standin
from services.teacher.training_log import TrainingLog

pytestmark = pytest.mark.integration

TASK = TaskSpec.from_file(default_task_path())
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gold() -> dict[str, str]:
    return load_gold()


@pytest.fixture(scope="module")
def rows():
    return load_split("test")


def make_teacher(base_url: str, **overrides) -> OpenAITeacher:
    kwargs = dict(
        base_url=base_url, api_key=SecretStr("test-key"), model="gold-label-standin",
        task=TASK, few_shot=2, timeout_s=5.0, max_retries=3, concurrency=8,
        input_price_per_mtok=0.15, output_price_per_mtok=0.60, budget_per_hour_usd=None,
        budget_per_day_usd=None, breaker_failures=5, breaker_reset_s=15.0,
        backoff_base_s=0.01, backoff_max_s=0.05,
    )
    kwargs.update(overrides)
    return OpenAITeacher(**kwargs)


async def bootstrap(server, log, texts, concurrency=4, **teacher_overrides):
    teacher = make_teacher(server.base_url, **teacher_overrides)
    try:
        return await run_bootstrap(teacher=teacher, log=log, texts=texts,
                                   concurrency=concurrency, progress=False)
    finally:
        await teacher.aclose()


async def test_labels_dedups_and_skips_on_rerun(tmp_path, gold, rows, capsys):
    sample = rows[:40]
    texts = [r.text for r in sample] + [f"  {r.text.upper()} " for r in sample[:5]]
    async with run_standin(gold=gold, latency_ms=5, error_rate=0.1) as server:
        with TrainingLog(tmp_path / "log.sqlite3") as log:
            report = await bootstrap(server, log, texts)
            assert (report.labelled, report.duplicates, report.skipped, report.failed) == (
                40, 5, 0, 0)
            assert report.cost_usd > 0 and report.prompt_tokens > 0
            examples = log.examples()
            assert {e.text: e.labels for e in examples} == {  # in arrival order, not input
                r.text: {"intent": r.label} for r in sample}
            assert len(examples) == 40
            assert {e.source for e in examples} == {"bootstrap"}
            assert {e.teacher_model for e in examples} == {"gold-label-standin"}
            requests = server.stats["chat_requests"]

            again = await bootstrap(server, log, texts)
            assert (again.labelled, again.skipped, again.failed) == (0, 40, 0)
            assert server.stats["chat_requests"] == requests  # nothing relabelled
    assert "cost $" in capsys.readouterr().out


async def test_cancelled_midway_then_resumed(tmp_path, gold, rows):
    texts = [r.text for r in rows[200:320]]
    concurrency = 4
    async with run_standin(gold=gold, latency_ms=20) as server:
        with TrainingLog(tmp_path / "log.sqlite3") as log:
            task = asyncio.create_task(bootstrap(server, log, texts, concurrency=concurrency))
            while log.count() < 30:
                assert not task.done()
                await asyncio.sleep(0.01)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await asyncio.sleep(0.3)  # an append already handed to a thread may still commit
            done_before = {e.text for e in log.examples()}
            assert 30 <= len(done_before) < len(texts)

            report = await bootstrap(server, log, texts, concurrency=concurrency)
            assert report.skipped == len(done_before)
            assert report.labelled == len(texts) - len(done_before)
            assert log.count() == len(texts)
            assert len({e.content_hash for e in log.examples()}) == len(texts)
            assert {e.text: e.labels["intent"] for e in log.examples()} == {
                r.text: r.label for r in rows[200:320]}
    answered = server.stats["answered"]
    assert all(answered[normalise(t)] == 1 for t in done_before)  # done ones not relabelled
    assert sum(answered.values()) <= len(texts) + concurrency  # only in-flight ones repeated


async def test_killed_process_then_resumed(tmp_path, gold, rows):
    """`triage bootstrap` killed with SIGKILL mid-run; the log survives."""
    sample = rows[400:520]
    tsv = tmp_path / "texts.tsv"
    tsv.write_text("text\tlabel\n" + "".join(f"{r.text}\t{r.label}\n" for r in sample))
    path = tmp_path / "data" / "training_log.sqlite3"  # TRIAGE_DATA_DIR's log
    async with run_standin(gold=gold, latency_ms=40) as server:
        env = {**os.environ, "TRIAGE_TEACHER_API_KEY": "k", "TRIAGE_TEACHER_BASE_URL": server.base_url,
               "TRIAGE_TEACHER_MODEL": "gold-label-standin", "TRIAGE_DATA_DIR": str(tmp_path / "data"), "TRIAGE_TEACHER_FEW_SHOT": "2"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", "bootstrap", "--tsv", str(tsv),
            "--concurrency", "2", "--no-progress", cwd=REPO, env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            async with asyncio.timeout(90):
                while not path.exists() or _count(path) < 15:
                    assert proc.returncode is None, "bootstrap exited before the kill"
                    await asyncio.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        with TrainingLog(path) as log:
            done_before = {e.text for e in log.examples()}
            assert 15 <= len(done_before) < len(sample)
            report = await bootstrap(server, log, [r.text for r in sample])
            assert report.skipped == len(done_before)
            assert log.count() == len(sample)
            assert {e.text: e.labels["intent"] for e in log.examples()} == {
                r.text: r.label for r in sample}
    answered = server.stats["answered"]
    assert all(answered[normalise(t)] == 1 for t in done_before)
    assert sum(answered.values()) <= len(sample) + 2


def _count(path: Path) -> int:
    with TrainingLog(path) as log:
        return log.count()


async def test_failures_are_counted_and_labelled_on_rerun(tmp_path, gold, rows):
    texts = [r.text for r in rows[600:620]]
    async with run_standin(gold=gold, error_rate=1.0) as server:
        with TrainingLog(tmp_path / "log.sqlite3") as log:
            report = await bootstrap(server, log, texts, max_retries=0, breaker_failures=1000)
            assert (report.labelled, report.failed, report.stopped) == (0, 20, None)
            assert report.failures == {"error": 20} and log.count() == 0
            server.set_faults(error_rate=0.0)
            report = await bootstrap(server, log, texts)
            assert (report.labelled, report.failed, report.skipped) == (20, 0, 0)


async def test_stops_early_when_circuit_opens(tmp_path, gold, rows):
    texts = [r.text for r in rows[700:730]]
    async with run_standin(gold=gold, error_rate=1.0) as server:
        with TrainingLog(tmp_path / "log.sqlite3") as log:
            report = await bootstrap(server, log, texts, concurrency=1, max_retries=0,
                                     breaker_failures=3)
    assert report.stopped == "circuit_open"
    assert server.stats["chat_requests"] == 3
    assert report.failed == 4 and report.not_attempted == 26  # 3 errors + 1 fast refusal


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "services.cli", "bootstrap", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--tsv" in out.stdout and "--limit" in out.stdout
