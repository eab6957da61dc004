"""Adding weights the registry already holds replaces their metadata (a new threshold is not
dropped), and a running replica takes the new threshold at its next poll."""

from __future__ import annotations

import json
from types import SimpleNamespace

from services.settings import Settings
from services.stream.app import TriageService
from services.student.registry import META_FILE, AdapterRegistry


def make_adapter(folder, threshold):
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(b"the same weights")
    (folder / META_FILE).write_text(json.dumps({
        "base_model": {"path": "/m", "name": "m"}, "prompt_style": "compact",
        "task": {"name": "t", "prompt_fingerprint": "f"}, "threshold": {"value": threshold}}))
    return folder


def test_the_same_weights_added_again_bring_their_new_threshold(tmp_path):
    reg = AdapterRegistry(tmp_path / "reg")
    first = reg.add(make_adapter(tmp_path / "run1", 0.9))
    reg.promote(first.adapter_id, "gate passed")
    again = reg.add(make_adapter(tmp_path / "run2", 0.8))  # re-calibrated on a newer slice
    assert again.adapter_id == first.adapter_id and again.threshold == 0.8
    assert reg.current().threshold == 0.8 and [a.threshold for a in reg.list()] == [0.8]
    assert [(h["event"], h["adapter_id"]) for h in reg.history()][-1] == ("meta", first.adapter_id)
    assert "0.9 -> 0.8" in reg.history()[-1]["reason"]
    reg.add(make_adapter(tmp_path / "run3", 0.8))  # identical metadata: nothing to record
    assert len(reg.history()) == 2 and reg.current_id() == first.adapter_id


class FakeClassifier:
    model_name = "fake-student"
    live_adapter = None

    async def use_adapter(self, adapter):
        self.live_adapter = adapter


async def test_a_running_replica_takes_the_new_threshold_of_its_live_adapter(tmp_path):
    reg = AdapterRegistry(tmp_path / "reg")
    reg.promote(reg.add(make_adapter(tmp_path / "run1", 0.9)).adapter_id, "gate passed")
    service = TriageService(Settings(_env_file=None, bootstrap_servers="127.0.0.1:1", role="student",
                                     registry_dir=tmp_path / "reg"), classifier=FakeClassifier())
    service.pipeline = SimpleNamespace(classifier=FakeClassifier())  # reload_adapter's only need
    assert await service.reload_adapter() and service.pipeline.classifier.live_adapter.threshold == 0.9
    assert not await service.reload_adapter()  # nothing changed
    reg.add(make_adapter(tmp_path / "run2", 0.8))
    assert await service.reload_adapter() and service.pipeline.classifier.live_adapter.threshold == 0.8
