"""Promotion gate: a pure decision on two held-out reports, and its wiring in trainer.distill."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from schemas.classification import FieldPrediction
from schemas.task import TaskSpec, default_task_path
from services.student.engine import StudentPrediction
from services.student.registry import META_FILE, AdapterRegistry, content_id
from trainer.promote import adapter_rank, decide, servable


def rep(coverage: float, accuracy: float, *, data_hash: str = "d", epsilon: float = 0.03, n: int = 1000,
        adapter_id: str | None = "a-x") -> dict:
    return {"coverage_at_epsilon": coverage, "accuracy": accuracy, "epsilon": epsilon,
            "adapter_id": adapter_id, "data": {"data_hash": data_hash, "n": n}}


def test_better_candidate_is_promoted():
    d = decide(rep(0.60, 0.85), rep(0.50, 0.84), margin=0.01)
    assert d.promote and "coverage" in d.reason


def test_worse_candidate_is_rejected_with_reason():
    d = decide(rep(0.40, 0.90), rep(0.50, 0.84), margin=0.01)
    assert not d.promote
    assert "lower coverage" in d.reason and "0.400" in d.reason and "0.500" in d.reason


def test_gain_below_margin_is_rejected():
    d = decide(rep(0.505, 0.85), rep(0.50, 0.85), margin=0.01)
    assert not d.promote and "margin" in d.reason


def test_tie_on_coverage_is_broken_by_accuracy():
    base = rep(0.0, 0.02, adapter_id=None)
    assert decide(rep(0.0, 0.45), base, margin=0.01).promote
    d = decide(rep(0.0, 0.025), base, margin=0.01)
    assert not d.promote and "tied" in d.reason and "base model" in d.reason


def test_equal_candidate_is_not_promoted_even_with_zero_margin():
    assert not decide(rep(0.5, 0.8), rep(0.5, 0.8), margin=0.0).promote


def test_reports_on_different_data_are_not_compared():
    d = decide(rep(0.9, 0.99, data_hash="x"), rep(0.1, 0.5, data_hash="y"), margin=0.01)
    assert not d.promote and "different held-out data" in d.reason
    assert not decide(rep(0.9, 0.99, epsilon=0.05), rep(0.1, 0.5), margin=0.01).promote


def test_no_live_report_compares_with_nothing():
    assert decide(rep(0.3, 0.8), None, margin=0.01).promote
    assert not decide(rep(0.0, 0.0), None, margin=0.01).promote


def test_candidate_the_service_cannot_load_is_rejected():
    """A much better r=32 candidate still loses when the service serves max_lora_rank=16."""
    better, live = rep(0.9, 0.95), rep(0.5, 0.84)
    d = decide(better, live, margin=0.01, adapter_config={"r": 32}, max_lora_rank=16)
    assert not d.promote and "rank 32" in d.reason and "max_lora_rank 16" in d.reason
    assert decide(better, live, margin=0.01, adapter_config={"r": 16}, max_lora_rank=16).promote
    assert decide(better, None, margin=0.01, adapter_config={"r": 8}, max_lora_rank=16).promote
    rank_pattern = {"r": 8, "rank_pattern": {"q_proj": 64}}
    assert not decide(better, live, margin=0.01, adapter_config=rank_pattern, max_lora_rank=16).promote
    with pytest.raises(ValueError):
        decide(better, live, margin=0.01, max_lora_rank=16)


def test_adapter_rank_and_servable():
    assert adapter_rank({"r": 16}) == 16
    assert adapter_rank({"r": 8, "rank_pattern": {"a": 4, "b": 32}}) == 32
    assert servable({"r": 16}, 16) is None
    assert servable({"r": 17}, 16).promote is False


# --- the gate wired into trainer.distill (fake classifier; the real engine: integration) ----
TASK = TaskSpec.from_file(default_task_path())
LABELS = TASK.field("intent").labels


def fake_adapter(folder: Path, weights: bytes, rank: int = 8) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / META_FILE).write_text(json.dumps({
        "base_model": {"path": "/m", "name": "m"}, "prompt_style": "compact",
        "task": {"name": TASK.name}}))
    return folder


class GoldForOne:
    """Right (and sure) only for the adapter `good_id`; confidently wrong for everything else."""

    def __init__(self, gold: dict[str, str], good_id: str):
        self.gold, self.good_id = gold, good_id

    async def classify(self, texts, *, adapter=None):
        right = adapter is not None and adapter.adapter_id == self.good_id
        out = []
        for text in texts:
            label = self.gold[text] if right else next(x for x in LABELS if x != self.gold[text])
            out.append(StudentPrediction(
                fields={"intent": FieldPrediction(label=label, confidence=0.99)},
                distribution={"intent": [0.99]}, adapter_id=None))
        return out


@pytest.fixture
def distill_setup(tmp_path):
    from services.teacher.training_log import TrainingLog
    from trainer.distill import DistillConfig

    # 450 rows: the certification part (about 2/3, by content hash) must reach the walk's start (258)
    gold = {f"ticket number {i}": LABELS[i % len(LABELS)] for i in range(450)}
    calib = tmp_path / "calib.tsv"
    calib.write_text("text\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in gold.items()))
    TrainingLog(tmp_path / "log.sqlite3").close()
    registry = AdapterRegistry(tmp_path / "reg")
    old = registry.add(fake_adapter(tmp_path / "old", b"old"))
    registry.promote(old.adapter_id, "setup")

    def config(**kw):
        return DistillConfig(registry_dir=registry.root, log_path=tmp_path / "log.sqlite3",
                             model_path=tmp_path / "model", task_path=default_task_path(),
                             work_dir=tmp_path / "work", calibration_tsv=str(calib), **kw)

    return gold, registry, old, config


def trains(candidate: Path, during=None):
    def train_fn(out_dir, flags, log_file, timeout):
        shutil.copytree(candidate, out_dir)
        if during is not None:
            during()
    return train_fn


async def test_distill_promotes_a_better_servable_candidate(tmp_path, distill_setup):
    from trainer.distill import run_distill_async

    gold, registry, old, config = distill_setup
    candidate = fake_adapter(tmp_path / "cand", b"new", rank=16)
    summary = await run_distill_async(config(max_lora_rank=16), train_fn=trains(candidate),
                                      classifier=GoldForOne(gold, content_id(candidate)))
    assert summary["promoted"] and summary["reason"].startswith("promote")
    assert registry.current_id() == content_id(candidate) == summary["current_id"]
    assert summary["live_at_start"] == old.adapter_id


async def test_distill_does_not_overwrite_a_rollback_made_while_it_ran(tmp_path, distill_setup):
    from trainer.distill import run_distill_async

    gold, registry, old, config = distill_setup
    candidate = fake_adapter(tmp_path / "cand", b"new")
    rollback = trains(candidate, during=lambda: registry.rollback("operator: old is bad"))
    summary = await run_distill_async(config(), train_fn=rollback,
                                      classifier=GoldForOne(gold, content_id(candidate)))
    assert summary["gate"]["promote"] is True  # better than what is live now ...
    assert summary["promoted"] is False  # ... but the operator's rollback wins
    assert summary["reason"].startswith("not promoted") and "moved" in summary["reason"]
    assert f"triage promote {content_id(candidate)}" in summary["reason"]
    assert registry.current_id() is None == summary["current_id"]
    assert [h["event"] for h in registry.history()] == ["promote", "rollback"]
    assert content_id(candidate) in [a.adapter_id for a in registry.list()]  # kept for a person


async def test_distill_rejects_a_rank_the_service_cannot_load(tmp_path, distill_setup):
    from trainer.distill import run_distill_async

    gold, registry, old, config = distill_setup
    candidate = fake_adapter(tmp_path / "cand", b"new", rank=32)  # much better, but r=32
    summary = await run_distill_async(config(max_lora_rank=16), train_fn=trains(candidate),
                                      classifier=GoldForOne(gold, content_id(candidate)))
    assert not summary["promoted"] and "max_lora_rank 16" in summary["reason"]
    assert registry.current_id() == old.adapter_id
    assert [a.adapter_id for a in registry.list()] == [old.adapter_id]


# --- issue 23: no coverage for an infeasible threshold; selection apart from certification ----
def test_an_infeasible_candidate_is_credited_with_no_coverage():
    """A field that certifies nothing makes the service escalate every ticket, whatever share of
    the held-out rows its report counted as answered (rows without that field's label)."""
    infeasible = {**rep(0.40, 0.85), "threshold": {"feasible": False}}
    d = decide(infeasible, rep(0.30, 0.84), margin=0.01)
    assert not d.promote and "lower coverage" in d.reason and "0.000" in d.reason
    assert decide({**infeasible, "threshold": {"feasible": True}}, rep(0.30, 0.84), margin=0.01).promote
    # against an infeasible live adapter, a feasible candidate gains its whole coverage
    assert decide(rep(0.05, 0.80), {**rep(0.5, 0.80), "threshold": {"feasible": False}}, margin=0.01).promote


def test_a_report_counts_no_ticket_answered_at_confidence_one_when_nothing_certifies():
    from trainer.dataset import Row
    from trainer.evaluate import HeldOut, report

    rows = [Row(f"ticket {i}", {"intent": LABELS[0]}) for i in range(400)]
    preds = [StudentPrediction(fields={"intent": FieldPrediction(label=LABELS[i % 2], confidence=1.0)},
                               distribution={"intent": [1.0]}, adapter_id=None) for i in range(400)]
    out = report(TASK, HeldOut("h", "x", rows), preds, adapter_id="a", epsilon=0.03, delta=0.05)
    assert out["threshold"]["feasible"] is False and out["threshold"]["threshold"] is None
    assert out["coverage_at_epsilon"] == 0.0 and out["escalation_rate_at_epsilon"] == 1.0


class ByPart(GoldForOne):
    """The candidate is right with confidence `conf[part]` on the rows of `right` parts of the
    gate's split (selection / certification), confidently wrong elsewhere; others always wrong."""

    def __init__(self, gold, good_id, right, conf):
        super().__init__(gold, good_id)
        from trainer.dataset import Row, split_gate

        self.certify = {r.text for r in split_gate([Row(t, {}) for t in gold])[1]}
        self.right, self.conf = right, conf

    async def classify(self, texts, *, adapter=None):
        out = []
        for text in texts:
            part = "certification" if text in self.certify else "selection"
            right = adapter is not None and adapter.adapter_id == self.good_id and part in self.right
            label = self.gold[text] if right else next(x for x in LABELS if x != self.gold[text])
            conf = self.conf[part] if right else 0.99
            out.append(StudentPrediction(fields={"intent": FieldPrediction(label=label, confidence=conf)},
                                         distribution={"intent": [conf]}, adapter_id=None))
        return out


async def test_the_gate_selects_on_one_part_and_certifies_on_the_other(tmp_path, distill_setup):
    """Selection never sees the certification rows and the stored threshold comes from them."""
    import math

    from trainer.distill import run_distill_async

    gold, registry, old, config = distill_setup
    candidate = fake_adapter(tmp_path / "cand", b"new")
    confident = {"selection": 0.6, "certification": 0.9}
    # right everywhere: promoted; the threshold is the certification part's (its 0.9), not
    # the whole slice's (0.6: every row right, so everything would be accepted)
    summary = await run_distill_async(config(), train_fn=trains(candidate), classifier=ByPart(
        gold, content_id(candidate), {"selection", "certification"}, confident))
    assert summary["promoted"] and summary["threshold"]["value"] == 0.9
    assert summary["candidate"]["certification"]["data"]["n"] == summary["heldout"]["certification"]
    assert registry.current().threshold == 0.9
    # right on the certification part only: the selection part sees a wrong candidate: rejected
    registry.promote(old.adapter_id, "back")
    other = fake_adapter(tmp_path / "other", b"other")
    summary = await run_distill_async(config(), train_fn=trains(other), classifier=ByPart(
        gold, content_id(other), {"certification"}, confident))
    assert not summary["promoted"] and registry.current_id() == old.adapter_id
    # right on the selection part only: promoted, and the certification part certifies nothing:
    # stored as null, served as "escalate everything"
    third = fake_adapter(tmp_path / "third", b"third")
    summary = await run_distill_async(config(), train_fn=trains(third), classifier=ByPart(
        gold, content_id(third), {"selection"}, confident))
    assert summary["promoted"] and summary["threshold"]["value"] is None
    assert summary["threshold"]["feasible"] is False and registry.current().threshold == math.inf


async def test_the_first_adapter_is_certified_on_the_whole_slice_and_re_certified_when_kept(
    tmp_path, distill_setup
):
    """No adapter live: nothing to select between, so every held-out row certifies the first
    adapter (more coverage from a young slice). Kept by the next cycle's gate, it is re-certified
    on the certification part: a certificate never rests on the rows that just kept it."""
    from trainer.distill import heldout_line, recertified_line, run_distill_async

    gold, registry, _, config = distill_setup
    registry.rollback("start cold")
    assert registry.current_id() is None
    first = fake_adapter(tmp_path / "first", b"first")
    confident = {"selection": 0.6, "certification": 0.9}
    right_everywhere = {"selection", "certification"}
    summary = await run_distill_async(config(), train_fn=trains(first), classifier=ByPart(
        gold, content_id(first), right_everywhere, confident))
    # every row right: the whole slice's walk accepts down to 0.6 (the certification part alone: 0.9)
    assert summary["promoted"] and summary["threshold"]["value"] == 0.6
    held = summary["heldout"]
    assert held["selection"] == held["certification"] == held["n"] == len(gold)
    assert "no adapter live: all of them certify" in heldout_line(held)
    live = registry.current()
    assert live.threshold == 0.6 and live.meta["eval"]["certification"]["data"]["name"] == "calibration"
    # a worse candidate is rejected; the kept adapter gets its certificate from the certification part
    worse = fake_adapter(tmp_path / "worse", b"worse")
    summary = await run_distill_async(config(), train_fn=trains(worse), classifier=ByPart(
        gold, live.adapter_id, right_everywhere, confident))
    assert not summary["promoted"] and summary["recertified"] == live.adapter_id
    assert "certified on the whole slice (calibration, 450 rows)" in summary["recertified_because"]
    assert "(threshold 0.9000)" in recertified_line(summary)
    assert summary["heldout"]["certification"] < len(gold)
    kept = registry.current()
    assert kept.adapter_id == live.adapter_id and kept.threshold == 0.9
    assert kept.meta["eval"]["certification"]["data"]["name"] == "calibration-certification"
    assert [h["event"] for h in registry.history()][-1] == "meta"
    # certified apart now: the next rejection leaves its certificate alone
    again = fake_adapter(tmp_path / "again", b"again")
    summary = await run_distill_async(config(), train_fn=trains(again), classifier=ByPart(
        gold, live.adapter_id, right_everywhere, confident))
    assert not summary["promoted"] and summary["recertified"] is None and recertified_line(summary) is None
    assert registry.current().meta == kept.meta


async def test_distill_never_trains_on_its_calibration_file_and_checks_the_manifest(tmp_path, distill_setup):
    from schemas.training import content_hash
    from trainer.distill import run_distill_async

    gold, registry, old, config = distill_setup
    candidate = fake_adapter(tmp_path / "cand", b"new")
    seen = {}

    def leaky(out_dir, flags, log_file, timeout):  # a trainer that ignored the exclusion
        seen.update(flags)
        Path(flags["rows_manifest"]).write_text(content_hash(next(iter(gold)).upper() + "!") + "\n")
        shutil.copytree(candidate, out_dir)

    with pytest.raises(RuntimeError, match="1 of 450 held-out rows were trained on"):
        await run_distill_async(config(), train_fn=leaky, classifier=GoldForOne(gold, content_id(candidate)))
    assert seen["exclude_tsv"] == config().calibration_tsv  # the trainer is told to leave them out
    assert registry.current_id() == old.adapter_id
