"""The real `triage` CLI, run as subprocesses in an isolated environment.

Each test gets its own cwd, TRIAGE_DATA_DIR and TRIAGE_REGISTRY_DIR under tmp_path, no metrics
port, no inherited TRIAGE_*/OPENAI_* settings, HF_HUB_OFFLINE=1. HOME is kept so the student
model converted once into ~/.cache/triage/models is reused.

The demo test is a small `make demo` (README): ~1 min of vLLM engine start on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

TRIAGE = Path(sys.executable).with_name("triage")  # the console script of this venv
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIAGE_", "OPENAI_"))}
    env.update(
        TRIAGE_DATA_DIR=str(tmp_path / "data"),
        TRIAGE_REGISTRY_DIR=str(tmp_path / "registry"),
        TRIAGE_METRICS_PORT="0",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        PYTHONUNBUFFERED="1",
    )
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """`triage *args`, stdout+stderr merged; on timeout the whole process group is killed
    (vLLM starts its engine core in a child process)."""
    assert TRIAGE.exists(), f"console script not installed: {TRIAGE}"
    proc = subprocess.Popen(
        [str(TRIAGE), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        out, _ = proc.communicate()
        pytest.fail(f"`triage {' '.join(args)}` ran past {timeout_s:.0f}s; output tail:\n{tail(out)}")
    finally:
        _kill_group(proc.pid)  # stragglers of our own group, if any
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def tail(text: str, lines: int = 60) -> str:
    return "\n".join((text or "").splitlines()[-lines:])


def check(result: subprocess.CompletedProcess, code: int = 0) -> str:
    assert result.returncode == code, (
        f"`{' '.join(map(str, result.args))}` exited {result.returncode}; output tail:\n{tail(result.stdout)}"
    )
    return result.stdout


# ---- 1. the demo, zero-shot stage only ------------------------------------------------------
def test_demo_zero_shot(tmp_path, cli_env):
    workdir = tmp_path / "demo"
    out = check(run_cli(
        ["demo", "--no-flywheel", "--tickets", "20", "--malformed", "3", "--workdir", str(workdir)],
        cli_env, tmp_path, timeout_s=900,
    ))
    context = f"output tail:\n{tail(out)}"
    assert "== summary" in out, context
    assert re.search(r"^zero-shot\s+23\s+20\s+3\s", out, re.M), context  # the table's row

    report = json.loads((workdir / "demo-report.json").read_text())
    (zero,) = [s for s in report["stages"] if s["stage"] == "zero-shot"]
    assert zero["tickets_in"] == 23, zero
    assert zero["results"] == 20, zero
    assert zero["dead_lettered"] == 3, zero
    assert zero["accounted_for"] is True, zero
    assert zero["escalation_rate"] == 1.0, zero  # the uncalibrated base student is never trusted
    assert zero["published_accuracy"] >= 0.95, zero  # answers come from the gold-label stand-in
    assert zero["teacher_calls"] >= 20, zero
    assert len(report["stages"]) == 1, "--no-flywheel streams only the zero-shot stage"


# ---- 2. bootstrap twice: the training log is the checkpoint ----------------------------------
SUMMARY = re.compile(r"^bootstrap: labelled (\d+), skipped (\d+), failed (\d+) \((\d+) texts", re.M)


def _summary(out: str) -> tuple[int, int, int, int]:
    found = SUMMARY.findall(out)
    assert len(found) == 1, f"expected one summary line; output tail:\n{tail(out)}"
    return tuple(int(x) for x in found[0])


def test_bootstrap_labels_once_then_resumes(tmp_path, cli_env):
    from schemas.task import TaskSpec, default_task_path
    from services.dev.datasets import load_split
    from services.teacher.training_log import TrainingLog

    args = ["bootstrap", "--split", "train", "--limit", "40"]
    first = check(run_cli(args, cli_env, tmp_path, timeout_s=300))
    assert "STAND-IN" in first, tail(first)  # no teacher URL: it started the stand-in itself
    assert _summary(first) == (40, 0, 0, 40)
    second = check(run_cli(args, cli_env, tmp_path, timeout_s=300))
    assert _summary(second) == (0, 40, 0, 40)

    field = TaskSpec.from_file(default_task_path()).fields[0].name
    gold = {row.text: row.label for row in load_split("train")[:40]}
    with TrainingLog(tmp_path / "data" / "training_log.sqlite3") as log:
        examples = log.examples()
        assert log.count() == 40
    assert len(examples) == 40
    assert {e.text for e in examples} == set(gold)
    wrong = {e.text: (e.labels, gold[e.text]) for e in examples if e.labels.get(field) != gold[e.text]}
    assert not wrong, wrong


# ---- 3. every command's --help ----------------------------------------------------------------
@pytest.mark.parametrize("command", [None, "model", "broker", "serve", "produce", "bootstrap", "demo", "rollback"])
def test_help(tmp_path, cli_env, command):
    args = ([command] if command else []) + ["--help"]
    out = check(run_cli(args, cli_env, tmp_path, timeout_s=120))
    assert out.startswith("usage: triage"), tail(out)
    if command is None:
        for name in ("model", "broker", "serve", "produce", "bootstrap", "distill", "rollback", "standin", "demo"):
            assert name in out


@pytest.mark.parametrize(("command", "marker"), [
    ("distill", "--max-minutes"),  # trainer.distill's own parser
    ("standin", "--api-key-env"),  # teacher_standin's own parser
])
def test_forwarding_commands_pass_help_through(tmp_path, cli_env, command, marker):
    """distill/standin forward their args: `--help` must reach their parser, not triage's."""
    out = check(run_cli([command, "--help"], cli_env, tmp_path, timeout_s=120))
    assert marker in out, tail(out)
    assert "unrecognized arguments" not in out, tail(out)
