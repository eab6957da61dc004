"""The re-distillation loop for real, kept tiny: a few LoRA steps on a few dozen tickets.

- a real training run produces an adapter folder (+ metadata) that the registry accepts;
- a training run killed midway leaves the registry exactly as it was;
- the candidate goes through the real vLLM engine (shared session fixture) and the gate.
"""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest

from services.student.registry import META_FILE, AdapterRef, AdapterRegistry, content_id
from trainer.calibration import expected_calibration_error
from trainer.dataset import read_tsv
from trainer.promote import decide

pytestmark = pytest.mark.integration
# 48 calibration rows (27 in the gate's certification part) can only certify a loose error
# target (trainer.evaluate.min_heldout)
TINY_EPSILON = 0.3


def write_tsv(path: Path, rows) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["text", "label"])
        writer.writerows((r.text, r.label) for r in rows)
    return path


@pytest.fixture(scope="module")
def small_sets(tmp_path_factory):
    from services.dev.datasets import load_split

    folder = tmp_path_factory.mktemp("data")
    return {
        "train": write_tsv(folder / "train.tsv", load_split("train")[:64]),
        "dev": write_tsv(folder / "dev.tsv", load_split("dev")[:48]),
    }


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, small_sets, student_model_path):
    from trainer.train import TrainArgs, main

    out = tmp_path_factory.mktemp("runs") / "tiny"
    result = main(TrainArgs(out_dir=str(out), base_model=str(student_model_path),
                            train_tsv=str(small_sets["train"]), val_fraction=0.1, lora_layers=2,
                            lora_r=8, lora_alpha=16, batch_size=8, max_steps=3, max_minutes=5))
    return Path(result["out_dir"])


def test_tiny_training_run_makes_a_registrable_adapter(tiny_adapter, tmp_path, task):
    meta = json.loads((tiny_adapter / META_FILE).read_text())
    assert meta["prompt_style"] == "compact"
    assert meta["task"]["name"] == task.name
    assert meta["task"]["fields"]["intent"]["labels"] == task.field("intent").labels
    assert len(meta["data"]["data_hash"]) == 64 and meta["data"]["train"] > 50
    assert meta["train_metrics"]["steps"] == 3
    assert meta["hyperparameters"]["lora_layer_range"] == [28, 30]
    config = json.loads((tiny_adapter / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == [28, 29] and not config.get("modules_to_save")
    assert not tiny_adapter.with_name("tiny.partial").exists()
    reg = AdapterRegistry(tmp_path / "reg")
    ref = reg.add(tiny_adapter)
    assert ref.adapter_id == content_id(tiny_adapter) and reg.add(tiny_adapter) == ref


def test_killed_training_run_leaves_registry_unchanged(tmp_path, tiny_adapter, small_sets, student_model_path):
    from schemas.task import default_task_path
    from services.teacher.training_log import TrainingLog
    from trainer.distill import DistillConfig, run_distill

    reg = AdapterRegistry(tmp_path / "reg")
    live = reg.add(tiny_adapter)
    reg.promote(live.adapter_id, "setup")
    before = (sorted(p.name for p in reg.adapters_dir.iterdir()), reg.pointer_path.read_bytes(),
              reg.history_path.read_bytes())
    log_path = tmp_path / "log.sqlite3"
    TrainingLog(log_path).close()  # empty log: the child fails fast too, but we kill it first
    cfg = DistillConfig(registry_dir=reg.root, log_path=log_path, model_path=student_model_path,
                        task_path=default_task_path(), work_dir=tmp_path / "work",
                        calibration_tsv=str(small_sets["dev"]), epsilon=TINY_EPSILON, train_timeout_s=20,
                        train_args={"train_tsv": small_sets["train"], "max_steps": 10_000})
    with pytest.raises((subprocess.TimeoutExpired, subprocess.CalledProcessError)):
        run_distill(cfg)
    after = (sorted(p.name for p in reg.adapters_dir.iterdir()), reg.pointer_path.read_bytes(),
             reg.history_path.read_bytes())
    assert after == before
    assert not list((tmp_path / "work").glob("*/adapter"))  # no finished candidate either


async def test_distill_evaluates_through_the_engine_and_gates(
    tmp_path, student, tiny_adapter, small_sets, student_model_path, task
):
    from schemas.task import default_task_path
    from services.teacher.training_log import TrainingLog
    from services.student.calibration_record import engine_record
    from trainer.distill import DistillConfig, run_distill_async

    def reuse_tiny(out_dir, flags, log_file, timeout):  # training is covered above
        import shutil

        assert flags["log_version"] == 0
        shutil.copytree(tiny_adapter, out_dir)

    TrainingLog(tmp_path / "log.sqlite3").close()
    reg = AdapterRegistry(tmp_path / "reg")
    cfg = DistillConfig(registry_dir=reg.root, log_path=tmp_path / "log.sqlite3",
                        model_path=student_model_path, task_path=default_task_path(),
                        work_dir=tmp_path / "work", calibration_tsv=str(small_sets["dev"]),
                        report_tsv=str(small_sets["dev"]), margin=0.01, epsilon=TINY_EPSILON,
                        score_base=True)
    summary = await run_distill_async(cfg, train_fn=reuse_tiny, classifier=student)
    run_dir = Path(summary["run_dir"])
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    cand = report["adapters"]["candidate"]
    assert "final" not in report["adapters"]["live"]  # only the candidate gets the final report
    assert all(Path(p).exists() for p in report["plots"])
    # the numbers are the engine's: the candidate's answers on the slice, scored here (no adapter
    # live: nothing to select between, so every row selects and certifies)
    selection = cand["calibration"]
    assert selection["data"]["n"] == summary["heldout"]["selection"] == 48
    assert cand["certification"]["data"]["n"] == summary["heldout"]["certification"] == 48
    chosen = read_tsv(small_sets["dev"], task)
    preds = await student.classify([r.text for r in chosen], adapter=AdapterRef.from_dir(tiny_adapter))
    correct = [p.fields["intent"].label == r.labels["intent"] for p, r in zip(preds, chosen)]
    assert selection["accuracy"] == pytest.approx(sum(correct) / len(correct))
    conf = [p.fields["intent"].confidence for p in preds]
    assert selection["ece_raw"] == pytest.approx(expected_calibration_error(conf, correct), abs=1e-4)
    # the gate is promote.decide on those numbers (no adapter live), and the registry follows it
    expected = decide(selection, None, cfg.margin, adapter_config=json.loads(
        (tiny_adapter / "adapter_config.json").read_text()), max_lora_rank=cfg.max_lora_rank)
    assert summary["gate"] == {"promote": expected.promote, "reason": expected.reason}
    assert summary["promoted"] is expected.promote and summary["reason"] == expected.reason
    meta = json.loads((run_dir / "adapter" / META_FILE).read_text())
    assert meta["threshold"] == {"value": cand["certification"]["threshold"]["threshold"],
                                 **cand["certification"]["threshold"],  # the certification report's
                                 "engine": engine_record(student.config),  # ... by this engine
                                 "confidence_map": cand["certification"]["confidence_map"]}  # ... through these
    assert meta["threshold"]["epsilon"] == TINY_EPSILON and summary["live_at_start"] is None
    assert reg.current_id() == (summary["candidate_id"] if expected.promote else None)
    assert [a.adapter_id for a in reg.list()] == ([summary["candidate_id"]] if expected.promote else [])


async def test_distill_gate_refuses_a_rank_the_service_cannot_serve(
    tmp_path, student, tiny_adapter, small_sets, student_model_path
):
    """The r=8 candidate loads in the evaluation engine, but the service serves
    max_lora_rank=4: the gate rejects it whatever its numbers, the registry stays as it was."""
    import shutil

    from schemas.task import default_task_path
    from services.teacher.training_log import TrainingLog
    from trainer.distill import DistillConfig, run_distill_async

    TrainingLog(tmp_path / "log.sqlite3").close()
    reg = AdapterRegistry(tmp_path / "reg")
    cfg = DistillConfig(registry_dir=reg.root, log_path=tmp_path / "log.sqlite3",
                        model_path=student_model_path, task_path=default_task_path(),
                        work_dir=tmp_path / "work", calibration_tsv=str(small_sets["dev"]),
                        margin=-1.0, max_lora_rank=4, epsilon=TINY_EPSILON)
    summary = await run_distill_async(
        cfg, train_fn=lambda out_dir, *_: shutil.copytree(tiny_adapter, out_dir), classifier=student)
    assert summary["promoted"] is False
    assert "LoRA rank 8 > serving max_lora_rank 4" in summary["reason"]
    assert reg.current_id() is None and reg.list() == []


def test_next_cycle_warm_starts_and_reuses_the_frozen_pass(tmp_path, tiny_adapter, small_sets, student_model_path):
    """A second run on the same rows: the frozen layers' outputs come from the first run's
    cache (exactly: the same states), and training starts from the given adapter's weights."""
    from safetensors.torch import load_file

    from trainer.train import TrainArgs, main

    common = dict(base_model=str(student_model_path), train_tsv=str(small_sets["train"]), val_fraction=0.1,
                  lora_layers=2, lora_r=8, lora_alpha=16, batch_size=8, max_minutes=5,
                  prefix_cache=str(tmp_path / "cache"))
    first = main(TrainArgs(out_dir=str(tmp_path / "one"), max_steps=2, **common))["meta"]["train_metrics"]
    assert first["prefix_cache_hits"] == 0 and first["warm_start"] is None
    second = main(TrainArgs(out_dir=str(tmp_path / "two"), max_steps=1, lr=0.0,
                            init_adapter=str(tiny_adapter), **common))["meta"]["train_metrics"]
    assert second["prefix_cache_hits"] > 0  # the steps of run one touched these examples
    assert second["warm_start"]["used"] is True
    # lr 0: the warm-started weights come out unchanged, i.e. they were loaded
    before, after = load_file(tiny_adapter / "adapter_model.safetensors"), load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)
    mismatched = main(TrainArgs(out_dir=str(tmp_path / "three"), max_steps=1, init_adapter=str(tiny_adapter),
                                **{**common, "lora_r": 4, "lora_alpha": 8}))["meta"]["train_metrics"]
    assert mismatched["warm_start"] == {"from": str(tiny_adapter), "used": False, "why": "different LoRA shape"}


def test_the_frozen_pass_computes_only_what_the_cache_lacks(tmp_path, small_sets, student_model_path):
    """A nightly cycle on yesterday's rows runs no frozen layer again: the pass covers only the
    examples the prefix cache does not hold."""
    from trainer.train import TrainArgs, main

    common = dict(base_model=str(student_model_path), train_tsv=str(small_sets["train"]), val_fraction=0.1,
                  lora_layers=2, lora_r=8, lora_alpha=16, batch_size=8, max_minutes=5, epochs=1.0,
                  prefix_cache=str(tmp_path / "cache"))
    first = main(TrainArgs(out_dir=str(tmp_path / "one"), **common))["meta"]["train_metrics"]
    assert first["prefix_cache_hits"] == 0 and first["prefix_computed"] == first["examples_used"] > 0
    second = main(TrainArgs(out_dir=str(tmp_path / "two"), **common))["meta"]["train_metrics"]
    assert second["prefix_cache_hits"] == first["examples_used"] and second["prefix_computed"] == 0
    assert second["examples_used"] == first["examples_used"]
