"""No invented labels: without a configured teacher nothing starts the gold-label stand-in,
`triage bootstrap` refuses, and a service says so (one WARNING, /readyz) and labels nothing."""

from __future__ import annotations

import logging
import time

import pytest

from schemas.classification import Classification, FieldPrediction
from schemas.escalation import Escalation
from services.cli import build_parser
from services.settings import Settings
from services.stream.app import TriageService
from services.stream.metrics import serve_metrics
from services.teacher.training_log import TrainingLog
from services.teacher.worker import EscalationResolver, TeacherSlots


@pytest.fixture
def no_teacher_env(tmp_path, monkeypatch):
    for name in ("TRIAGE_TEACHER_BASE_URL", "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRIAGE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    return tmp_path


def _bootstrap(*argv: str) -> int:
    args = build_parser().parse_args(["bootstrap", *argv])
    return args.fn(args)


@pytest.mark.parametrize("source", ["--tsv", "--split"])
def test_bootstrap_without_a_teacher_refuses_in_one_line(no_teacher_env, capsys, source):
    mine = no_teacher_env / "mine.tsv"
    mine.write_text("text\nmy card never arrived\nI was charged twice\n")
    value = str(mine) if source == "--tsv" else "train"
    assert _bootstrap(source, value, "--limit", "2") == 2
    out, err = capsys.readouterr()
    assert "STAND-IN" not in out + err  # nothing started a teacher by itself
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "TRIAGE_TEACHER_BASE_URL" in lines[0] and "triage standin" in lines[0], err
    assert not (no_teacher_env / "data").exists()  # no training log written


def test_bootstrap_names_its_source(no_teacher_env, capsys):
    with pytest.raises(SystemExit) as exit_:  # no silent BANKING77 default either
        _bootstrap("--limit", "2")
    assert exit_.value.code == 2
    assert "--tsv" in capsys.readouterr().err


def _teacher_only_service(tmp_path) -> TriageService:
    settings = Settings(_env_file=None, bootstrap_servers="127.0.0.1:9", metrics_port=0, role="teacher",
                        teacher_base_url="", registry_dir=tmp_path / "registry", data_dir=tmp_path / "data")
    return TriageService(settings)


async def _readyz(metrics) -> tuple[int, str]:
    import aiohttp

    async with serve_metrics(metrics, "127.0.0.1", 0) as port, aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
            return response.status, await response.text()


async def test_a_service_without_a_teacher_says_so_at_start_and_in_readyz(tmp_path, caplog):
    service = _teacher_only_service(tmp_path)
    with caplog.at_level(logging.WARNING):
        async with service.worker.resources():
            service.metrics.set_ready(True, "teacher worker; 1 partitions assigned")
            status, body = await _readyz(service.metrics)
            service.metrics.set_ready(False, "waiting for partition assignment")
            not_ready = await _readyz(service.metrics)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("teacher: none configured" in w for w in warnings) == 1, warnings
    note = "teacher: none configured — escalations are published unverified and nothing is labelled"
    assert status == 200 and body.startswith("teacher worker; 1 partitions assigned") and note in body, body
    assert not_ready[0] == 503 and note in not_ready[1]  # the note never decides readiness


async def test_a_service_with_a_teacher_has_no_such_note(tmp_path):
    service = _teacher_only_service(tmp_path)
    service.worker._injected["teacher"] = object()  # any teacher: nothing is asked here
    async with service.worker.resources():
        service.metrics.set_ready(True, "ready")
        assert service.metrics.readiness() == (True, "ready")


def _request(kind: str) -> Escalation:
    student = Classification(
        ticket_id=f"T-{kind}", fields={"intent": "card_arrival"}, confidence=0.3,
        route="unverified" if kind == "escalation" else "student", model="student", adapter_id="a-1",
        student={"intent": FieldPrediction(label="card_arrival", confidence=0.3)},
        audited=kind == "audit", latency_ms=5.0, engine_ms=3.0)
    return Escalation(kind=kind, ticket_id=f"T-{kind}", text=f"where is my card ({kind})",
                      student_result=student, ticket_time_ms=int(time.time() * 1000))


async def test_without_a_teacher_nothing_is_labelled(tmp_path):
    published: list[Classification] = []

    async def publish(result: Classification) -> None:
        published.append(result)

    with TrainingLog(tmp_path / "log.sqlite3") as log:
        resolver = EscalationResolver(teacher=None, training_log=log, publish=publish, deadline_s=5.0,
                                      slots=TeacherSlots(4, 1))
        await resolver.resolve(_request("escalation"))
        await resolver.resolve(_request("audit"))
        assert log.count() == 0
    assert [(r.ticket_id, r.route.value) for r in published] == [("T-escalation", "unverified")]
