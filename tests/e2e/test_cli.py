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
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

TRIAGE = Path(sys.executable).with_name("triage")  # the console script of this venv
REPO = Path(__file__).resolve().parents[2]


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


def stop_serve(serve: subprocess.Popen) -> str:
    """SIGTERM a `triage serve` subprocess (SIGKILL its group after 60 s): its output."""
    serve.send_signal(signal.SIGTERM)
    try:
        out, _ = serve.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        _kill_group(serve.pid)
        out, _ = serve.communicate()
    return out


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
    assert re.search(r"^zero-shot\s+20\s+3\s", out, re.M), context  # the table row: answered, dead-lettered
    # what a newcomer reads: the story, not library noise, and a clean exit
    for noise in ("Traceback", "FutureWarning", "Loading safetensors", '"level": "WARNING"'):
        assert noise not in out, f"{noise!r} in the demo's output; {context}"

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


def start_standin(env: dict[str, str], args: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """`triage standin` on a free port, waited for: (its process, its base URL). Kill its
    process group when done."""
    port = _free_port()
    standin = subprocess.Popen(
        [str(TRIAGE), "standin", "--port", str(port), *(args or [])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 60
    line = ""
    while time.monotonic() < deadline and "STAND-IN" not in line:
        line = standin.stdout.readline()
    assert "STAND-IN" in line, "the stand-in did not start"
    return standin, f"http://127.0.0.1:{port}/v1"


def test_bootstrap_labels_once_then_resumes(tmp_path, cli_env):
    from schemas.task import TaskSpec, default_task_path
    from services.dev.datasets import load_split
    from services.teacher.bootstrap import sample_texts
    from services.teacher.training_log import TrainingLog

    args = ["bootstrap", "--split", "train", "--limit", "40"]
    refused = run_cli(args, cli_env, tmp_path, timeout_s=120)  # no teacher: none started for it
    assert refused.returncode == 2 and "TRIAGE_TEACHER_BASE_URL" in refused.stdout, tail(refused.stdout)
    assert not (tmp_path / "data" / "training_log.sqlite3").exists()
    standin, url = start_standin(cli_env)  # the stand-in only where it is named
    try:
        env = {**cli_env, "TRIAGE_TEACHER_BASE_URL": url, "TRIAGE_TEACHER_MODEL": "gold-label-standin"}
        first = check(run_cli(args, env, tmp_path, timeout_s=300))
        second = check(run_cli(args, env, tmp_path, timeout_s=300))
    finally:
        _kill_group(standin.pid)
        standin.wait()
    assert _summary(first) == (40, 0, 0, 40)
    assert _summary(second) == (0, 40, 0, 40)

    assert "a uniform sample (seed 0) of 40" in first, tail(first)
    assert re.search(r"labels \(intent\): \d+ of 77 seen in 40 examples", first), tail(first)
    assert "never seen, the student cannot learn them" in first  # 40 texts cannot cover 77 labels

    field = TaskSpec.from_file(default_task_path()).fields[0].name
    rows = load_split("train")
    sampled = set(sample_texts([r.text for r in rows], 40, seed=0))
    gold = {row.text: row.label for row in rows if row.text in sampled}
    assert len(gold) == 40 and list(gold) != [r.text for r in rows[:40]]  # a sample, not a prefix
    with TrainingLog(tmp_path / "data" / "training_log.sqlite3") as log:
        examples = log.examples()
        assert log.count() == 40
    assert len(examples) == 40
    assert {e.text for e in examples} == set(gold)
    wrong = {e.text: (e.labels, gold[e.text]) for e in examples if e.labels.get(field) != gold[e.text]}
    assert not wrong, wrong


# ---- 3. every command's --help ----------------------------------------------------------------
PRODUCT = ("model", "serve", "bootstrap", "distill", "eval", "status", "promote", "rollback",
           "feedback", "gc")
DEV = ("broker", "standin", "produce", "demo")


@pytest.mark.parametrize("command", [None, "model", "broker", "serve", "produce", "bootstrap",
                                     "demo", "status", "promote", "rollback"])
def test_help(tmp_path, cli_env, command):
    args = ([command] if command else []) + ["--help"]
    out = check(run_cli(args, cli_env, tmp_path, timeout_s=120))
    assert out.startswith("usage: triage"), tail(out)
    if command is None:
        listed = [set(g.split(",")) for g in re.findall(r"\{([a-z,]+)\}", out) if "serve" in g]
        assert listed and all(g == set(PRODUCT + DEV) for g in listed), tail(out)


@pytest.mark.parametrize(("command", "marker"), [
    ("distill", "--max-minutes"),  # trainer.distill's own parser
    ("standin", "--api-key-env"),  # teacher_standin's own parser
])
def test_forwarding_commands_pass_help_through(tmp_path, cli_env, command, marker):
    """distill/standin forward their args: `--help` must reach their parser, not triage's."""
    out = check(run_cli([command, "--help"], cli_env, tmp_path, timeout_s=120))
    assert marker in out, tail(out)
    assert "unrecognized arguments" not in out, tail(out)


# ---- 4. registry commands ------------------------------------------------------------------
def test_status_promote_rollback(tmp_path, cli_env):
    from services.student.registry import META_FILE, AdapterRegistry

    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    (folder / META_FILE).write_text(json.dumps({
        "base_model": {"path": "/m", "name": "m"}, "prompt_style": "compact", "task": {"name": "t"}}))
    ref = AdapterRegistry(tmp_path / "registry").add(folder)

    status = json.loads(check(run_cli(["status"], cli_env, tmp_path, timeout_s=120)))
    assert status["current"] is None and status["adapters"] == [ref.adapter_id]
    out = check(run_cli(["promote", ref.adapter_id, "--reason", "e2e"], cli_env, tmp_path, 120))
    assert f"current adapter: {ref.adapter_id}" in out
    assert json.loads(check(run_cli(["status"], cli_env, tmp_path, 120)))["current"] == ref.adapter_id
    # an id is never a path: the registry refuses it, nothing moves
    bad = run_cli(["promote", "../../adapter", "--reason", "attack"], cli_env, tmp_path, 120)
    assert bad.returncode != 0 and "not an adapter id" in bad.stdout, tail(bad.stdout)
    out = check(run_cli(["rollback", "--reason", "e2e"], cli_env, tmp_path, 120))
    assert "current adapter: base model" in out
    assert [h["event"] for h in AdapterRegistry(tmp_path / "registry").history()] == ["promote", "rollback"]


# ---- 5. process hygiene: `triage broker` and `triage serve` ---------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _tansu_pids(port: int) -> list[int]:
    """Live (non-zombie) processes whose command line carries this port's Tansu listener."""
    needle = f"tcp://127.0.0.1:{port}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in cmdline and b"tansu" in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_broker_stopped_by_signal_leaves_no_tansu(tmp_path, cli_env, sig):
    port = _free_port()
    proc = subprocess.Popen([str(TRIAGE), "broker", "--port", str(port)], cwd=tmp_path,
                            env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    tansu: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (_listening(port) and _tansu_pids(port)):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the broker never listened"
            time.sleep(0.1)
        tansu = _tansu_pids(port)
        proc.send_signal(sig)  # to the triage process only, as a supervisor would
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        deadline = time.monotonic() + 5
        while _tansu_pids(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _tansu_pids(port) == [], f"orphan Tansu left behind; output:\n{out}"
        assert not _listening(port)
    finally:
        _kill_group(proc.pid)
        _kill(_tansu_pids(port) or [p for p in tansu if Path(f"/proc/{p}").exists()])
        proc.communicate()


def test_broker_refuses_a_port_in_use(tmp_path, cli_env):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(["broker", "--port", str(port)], cli_env, tmp_path, timeout_s=60)
        leftover = _tansu_pids(port)
        _kill(leftover)
    assert result.returncode == 1 and "already in use" in result.stdout, tail(result.stdout)
    assert leftover == []


def test_broker_interrupted_while_starting_leaves_no_tansu(monkeypatch):
    from services.dev.broker import EmbeddedBroker

    port = _free_port()
    broker = EmbeddedBroker(port=port)

    def interrupted(timeout_s):  # SIGTERM arriving before Tansu listens
        raise KeyboardInterrupt

    monkeypatch.setattr(broker, "_wait_listening", interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            broker.start()
        assert _tansu_pids(port) == []
    finally:
        _kill(_tansu_pids(port))


def test_serve_without_bootstrap_servers_fails_loudly(tmp_path, cli_env):
    result = run_cli(["serve"], cli_env, tmp_path, timeout_s=120)
    assert result.returncode == 2, tail(result.stdout)
    assert "TRIAGE_BOOTSTRAP_SERVERS is not set" in result.stdout
    assert "ready" not in result.stdout.lower()


def test_serve_exits_with_the_service_exit_code(monkeypatch, tmp_path):
    """A replica whose engine died (the service sets exit_code=1) must not exit 0."""
    import services.stream.app as app_module
    import services.student.model_store as model_store
    from services.cli import main

    built = []

    class DiedService:
        def __init__(self, settings):
            self.settings, self.exit_code = settings, 0
            self.app = self
            built.append(self)

        async def run(self):
            self.exit_code = 1  # what TriageService does when the engine dies

    for name in [k for k in os.environ if k.startswith("TRIAGE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("TRIAGE_BOOTSTRAP_SERVERS", "127.0.0.1:1")
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("TRIAGE_REGISTRY_DIR", str(tmp_path / "registry"))
    monkeypatch.setattr(app_module, "TriageService", DiedService)
    monkeypatch.setattr(model_store, "ensure_student_model", lambda path=None: path)
    assert main(["serve"]) == 1
    assert [s.settings.bootstrap_servers for s in built] == ["127.0.0.1:1"]
