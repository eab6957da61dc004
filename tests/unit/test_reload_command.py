"""The reload command's contract: what promote / rollback print and send without a broker,
and which commands a replica acts on (the broker path: tests/integration/test_control.py)."""

from __future__ import annotations

import json
import os

from services.settings import Settings
from services.stream.app import TriageService
from services.stream.kafka_io import reload_command
from services.student.registry import META_FILE, AdapterRegistry


class FakeClassifier:
    """No engine: records which adapter the service asks for."""

    model_name = "fake-student"
    live_adapter = None

    def __init__(self):
        self.swaps: list[str | None] = []

    async def classify(self, texts, *, adapter=None):
        raise AssertionError("no tickets in this test")

    async def use_adapter(self, adapter):
        self.live_adapter = adapter
        self.swaps.append(getattr(adapter, "adapter_id", None))


def make_adapter(folder, weights: bytes):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / META_FILE).write_text(json.dumps({
        "base_model": {"path": "/m", "name": "m"}, "prompt_style": "compact",
        "task": {"name": "t", "prompt_fingerprint": "f"}, "threshold": {"value": 0.5}}))
    return folder


async def test_a_replica_acts_on_reload_commands_for_it_or_for_every_task():
    service = TriageService(Settings(_env_file=None, bootstrap_servers="127.0.0.1:1", role="student"),
                            classifier=FakeClassifier(), name="cards")
    reloads = []

    async def reload_adapter():
        reloads.append(True)
        return True

    service.reload_adapter = reload_adapter
    for body, acts in [(json.loads(reload_command(None, "a-1")), True),
                       (json.loads(reload_command("cards", None)), True),
                       (json.loads(reload_command("intents", "a-1")), False),
                       ({"action": "something_else"}, False), (b"not json", False)]:
        reloads.clear()
        await service._handle_control(body)
        assert reloads == ([True] if acts else []), body


def test_without_kafka_the_pointer_moves_and_the_poll_is_promised(tmp_path, monkeypatch, capsys):
    from services.cli import main

    for key in [k for k in os.environ if k.startswith("TRIAGE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("TRIAGE_REGISTRY_DIR", str(tmp_path / "registry"))
    a = AdapterRegistry(tmp_path / "registry").add(make_adapter(tmp_path / "a", b"w"))
    assert main(["promote", a.adapter_id]) == 0
    out = capsys.readouterr().out
    assert f"current adapter: {a.adapter_id}" in out and "within TRIAGE_REGISTRY_POLL_S (5 s)" in out
    monkeypatch.setenv("TRIAGE_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # Kafka named but down
    assert main(["rollback"]) == 0  # the pointer moved: the command is a shortcut, not the change
    captured = capsys.readouterr()
    assert "current adapter: base model" in captured.out
    assert "could not send reload_adapter" in captured.err and "within TRIAGE_REGISTRY_POLL_S" in captured.err
    assert AdapterRegistry(tmp_path / "registry").current() is None


def test_a_distill_that_promotes_tells_the_replicas(monkeypatch, capsys, tmp_path):
    import trainer.distill as distill
    from services.stream import kafka_io

    for key in [k for k in os.environ if k.startswith("TRIAGE_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("TRIAGE_REGISTRY_DIR", str(tmp_path / "registry"))
    told = []
    monkeypatch.setattr(kafka_io, "tell_replicas",
                        lambda settings, task, adapter_id: told.append((task, adapter_id)) or (True, "told"))
    for promoted in (True, False):
        summary = {"heldout": {"n": 9, "sources": {"audit": 9}, "version": 3, "path": "log"}, "lines": [],
                   "promoted": promoted, "reason": "gate", "run_dir": str(tmp_path), "candidate_id": "a-0123456789abcdef"}
        monkeypatch.setattr(distill, "run_distill", lambda cfg, summary=summary: summary)
        assert distill.main([]) == 0
    assert told == [(None, "a-0123456789abcdef")]  # once: a rejected candidate moved nothing
    assert "PROMOTED gate\ntold\n" in capsys.readouterr().out
