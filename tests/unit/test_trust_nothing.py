"""Issue 23 item 7: "escalate everything" lets nothing through, confidence exactly 1.0 included
(entity confidence is exp(sum of logprobs): 1.0 for grammar-forced or saturated tokens).

One representation: math.inf in memory, JSON null on disk. Each path: the calibration's
infeasible choice (tests/unit/test_calibration.py), the gate's coverage credit
(tests/unit/test_gate.py), a stored threshold read by the registry and applied by the service,
and a threshold set by hand (TRIAGE_CONFIDENCE_THRESHOLD=1.0)."""

from __future__ import annotations

import json
import math

import pytest

from services.stream.pipeline import EscalationConfig, TicketPipeline
from services.student.registry import AdapterRef, stored_threshold
from tests.unit.test_pipeline import FakeClassifier, record, ticket


def meta(threshold: dict | None, **extra) -> dict:
    return {"base_model": {"path": "/m", "name": "m"}, "prompt_style": "compact", "task": {"name": "t"},
            "threshold": threshold, **extra}


def test_a_stored_infeasible_threshold_reads_as_trust_nothing():
    assert stored_threshold(meta(None)) is None  # never calibrated (the trainer's own metadata)
    assert stored_threshold(meta({"value": None, "feasible": False})) == math.inf  # null: today
    # adapters calibrated before: 1.0 with feasible false, per ticket or per field
    assert stored_threshold(meta({"value": 1.0, "feasible": False})) == math.inf
    per_field = meta({"value": 0.4, "fields": {"intent": 0.4, "entities": 1.0}, "feasible": False},
                     eval={"calibration": {"fields": {"intent": {"threshold": {"feasible": True}},
                                                      "entities": {"threshold": {"feasible": False}}}}})
    assert stored_threshold(per_field) == {"intent": 0.4, "entities": math.inf}
    assert stored_threshold(meta({"value": 0.5, "fields": {"a": 0.5, "b": None}})) == {"a": 0.5, "b": math.inf}
    # a feasible threshold of exactly 1.0 is certified: it accepts confidence 1.0
    assert stored_threshold(meta({"value": 1.0, "feasible": True})) == 1.0


def test_the_registry_reads_null_from_an_adapter_folder(tmp_path):
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(b"w")
    (folder / "triage_adapter.json").write_text(json.dumps(meta({"value": None, "feasible": False})))
    assert AdapterRef.from_dir(folder).threshold == math.inf


@pytest.mark.parametrize("threshold", [math.inf, {"intent": math.inf}])
async def test_the_service_escalates_confidence_one_under_a_trust_nothing_adapter(threshold):
    clf = FakeClassifier({"sure": 1.0})
    clf.live_adapter = AdapterRef("a-1", "/x", "compact", threshold=threshold)
    pipeline = TicketPipeline(classifier=clf)
    [outcome] = await pipeline.process([record(0, ticket(0, "sure"))])
    assert outcome.kind == "escalation"


@pytest.mark.parametrize(("override", "kind"), [(1.0, "escalation"), (0.99, "result"), (0.0, "result")])
async def test_a_threshold_of_one_set_by_hand_escalates_confidence_one(override, kind):
    pipeline = TicketPipeline(classifier=FakeClassifier({"sure": 1.0}),
                              escalation=EscalationConfig(threshold_override=override))
    [outcome] = await pipeline.process([record(0, ticket(0, "sure"))])
    assert outcome.kind == kind
    assert pipeline.threshold() == (math.inf if override == 1.0 else override)


def test_triage_status_prints_trust_nothing_as_strict_json_null():
    from services.cli import _json_threshold

    assert json.dumps(_json_threshold({"intent": math.inf, "entities": 0.7}), allow_nan=False) == \
        '{"intent": null, "entities": 0.7}'
    assert _json_threshold(math.inf) is None and _json_threshold(0.5) == 0.5 and _json_threshold(None) is None
