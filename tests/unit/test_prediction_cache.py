"""Issue 23 item 8: the gate's cached predictions are reused only when nothing that changes a
prediction changed: the adapter, the student's prompt, decoding bounds, the engine settings
that matter, the code's prediction semantics and the vLLM version (trainer/predictions.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from schemas.classification import FieldPrediction
from schemas.task import TaskSpec, default_task_path
from services.student.engine import EngineConfig, StudentPrediction
from trainer.dataset import Row
from trainer.evaluate import HeldOut, evaluate

TASK = TaskSpec.from_file(default_task_path())
LABELS = TASK.field("intent").labels
ROWS = [Row(f"ticket number {i}", {"intent": LABELS[i % 5]}) for i in range(40)]


class Ref:
    adapter_id, path, prompt_style = "a-00000000000000aa", "/x", "compact"


class Counting:
    def __init__(self):
        self.scored = 0

    async def classify(self, texts, *, adapter=None):
        self.scored += len(texts)
        gold = {r.text: r.labels["intent"] for r in ROWS}
        return [StudentPrediction(fields={"intent": FieldPrediction(label=gold[t], confidence=0.9)},
                                  distribution={"intent": [0.9]}, adapter_id=None) for t in texts]


def with_field(task: TaskSpec, **update) -> TaskSpec:
    return task.model_copy(update={"fields": [task.fields[0].model_copy(update=update)]})


@pytest.fixture
def scored(tmp_path):
    clf, base = Counting(), EngineConfig(model_path=tmp_path / "model", dtype="float32")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"a": 1}')

    async def run(task=TASK, config=base, ref=Ref) -> int:
        before = clf.scored
        await evaluate(config, task, {"x": ref}, HeldOut("h", "log", ROWS), classifier=clf,
                       cache_dir=tmp_path / "cache")
        return clf.scored - before

    run.base = base
    return run


async def test_an_unchanged_key_reuses_the_cache_and_a_changed_one_scores_again(scored, tmp_path, monkeypatch):
    from services.student import outputs
    from trainer import predictions

    base = scored.base
    assert await scored() == 40 and await scored() == 0
    # nothing a prediction depends on: teacher-only material, batching and memory settings
    assert await scored(task=TASK.model_copy(update={"examples": TASK.examples[:1]})) == 0
    assert await scored(task=with_field(TASK, description="another teacher-only description")) == 0
    assert await scored(config=replace(base, block_size=128, max_num_seqs=8, max_lora_rank=64,
                                       max_loras=4, cpu_kv_cache_gib=4, seed=7)) == 0
    # each of these changes answers: scored again (and cached under its own key)
    changed = [replace(base, dtype="bfloat16"), replace(base, max_model_len=512),
               replace(base, entity_span_grammar="ticket")]
    for config in changed:
        assert await scored(config=config) == 40, config
        assert await scored(config=config) == 0
    (tmp_path / "model" / "config.json").write_text('{"a": 2}')  # another base model, same path
    assert await scored() == 40
    assert await scored(task=with_field(TASK, labels=[*LABELS, "new_label"])) == 40  # a label added
    assert await scored(ref=type("Other", (Ref,), {"adapter_id": "a-00000000000000bb"})) == 40
    monkeypatch.setattr(outputs, "PREDICTION_SEMANTICS", outputs.PREDICTION_SEMANTICS + 1)
    assert await scored() == 40
    monkeypatch.setattr(predictions, "vllm_version", lambda: "vllm==99.0")
    assert await scored() == 40 and await scored() == 0


async def test_the_base_model_sees_the_instruct_prompt_so_its_descriptions_count(scored):
    assert await scored(ref=None) == 40 and await scored(ref=None) == 0
    assert await scored(ref=None, task=with_field(TASK, description="a new description")) == 40
    assert await scored(ref=None, task=TASK.model_copy(update={"examples": []})) == 0  # few-shot: teacher only
