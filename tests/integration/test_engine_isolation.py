"""The real vLLM engine never fails a batch for one ticket (issue 9, engine side).

- a ~4,100-token CJK ticket among ordinary ones: cut by tokens and classified (truncated),
  its neighbours answered exactly as when they run alone;
- a request the engine refuses is that ticket's EngineRejection, not its batch's exception;
- a field with 150 labels (over vLLM's 128 logprob_token_ids per request) gets the full
  distribution;
- base-model requests sharing engine steps with LoRA requests are unchanged (mixed batch);
- an adapter trained for another prompt is refused at load.
"""

from __future__ import annotations

import asyncio
import math

import pytest

from schemas.task import TaskSpec
from services.dev.datasets import load_split
from services.student.engine import EngineConfig, EngineRejection, StudentPrediction
from services.student.registry import AdapterRef
from services.student.shared_engine import started_classifier
from tests.conftest import make_lora

pytestmark = pytest.mark.integration

ORDINARY = ["I still have not received my new card", "How do I top up by bank transfer?",
            "my card payment was declined", "what is the exchange rate for euros?"]


async def test_long_ticket_is_truncated_and_neighbours_are_unaffected(student):
    long_cjk = "我的银行卡被冻结了，请尽快帮我处理这个问题。" * 178  # ~3,900 characters
    alone = await student.classify(ORDINARY)
    mixed = await student.classify(ORDINARY[:2] + [long_cjk] + ORDINARY[2:])
    assert all(isinstance(p, StudentPrediction) for p in mixed)
    assert mixed[2].truncated and not any(p.truncated for p in alone)
    neighbours = mixed[:2] + mixed[3:]
    assert [p.fields["intent"].label for p in neighbours] == [p.fields["intent"].label for p in alone]
    for a, b in zip(alone, neighbours):
        assert math.isclose(a.confidence, b.confidence, rel_tol=1e-4)


async def test_a_refused_request_is_one_tickets_rejection(student, monkeypatch):
    from vllm.exceptions import VLLMValidationError

    original = student._logprobs

    async def refuse_one(prompt_ids, allowed, wanted, adapter):
        if student.tokenizer.encode("POISON", add_special_tokens=False)[0] in prompt_ids:
            raise VLLMValidationError("refused for this test", parameter="prompt", value=len(prompt_ids))
        return await original(prompt_ids, allowed, wanted, adapter)

    monkeypatch.setattr(student, "_logprobs", refuse_one)
    out = await student.classify([ORDINARY[0], "POISON POISON", ORDINARY[1]])
    assert isinstance(out[1], EngineRejection) and out[1].reason == "engine_rejected"
    assert "refused for this test" in out[1].detail
    assert isinstance(out[0], StudentPrediction) and isinstance(out[2], StudentPrediction)


async def test_a_field_with_150_labels_gets_the_whole_distribution(student_model_path):
    labels = sorted({row.label for row in load_split("train")})  # 77 BANKING77 intents ...
    labels += [f"other_topic_{i:03d}" for i in range(150 - len(labels))]  # ... padded to 150
    task = TaskSpec.model_validate({"name": "wide", "instructions": "Pick the intent.",
                                    "fields": [{"name": "intent", "description": "intent", "labels": labels}]})
    config = EngineConfig(model_path=student_model_path, max_num_seqs=32)
    async with started_classifier(config, task) as wide:
        out = await wide.classify(ORDINARY)
    for prediction in out:
        assert isinstance(prediction, StudentPrediction)
        probs = prediction.distribution["intent"]
        assert len(probs) == 150 and math.isclose(sum(probs), 1.0, rel_tol=1e-6)
        assert all(p > 0 for p in probs)  # every code got a real logprob, none defaulted
        assert prediction.fields["intent"].label in labels


async def test_base_model_answers_do_not_change_beside_lora_requests(student, student_model_path, tmp_path, task):
    """vLLM marks no-LoRA tokens with index -1; indexing weights[-1] gave base-model requests
    the last adapter slot's delta whenever they shared a step with LoRA requests. Two adapters
    fill both slots (max_loras=2), so the last slot is not empty."""
    refs = []
    for seed in (3, 5):
        make_lora(student_model_path, tmp_path / f"lora{seed}", seed=seed, task=task)
        refs.append(AdapterRef.from_dir(tmp_path / f"lora{seed}"))
    texts = [row.text for row in load_split("dev")[:24]]
    alone = await student.classify(texts, adapter=None)
    with_lora, lora_answers, _ = await asyncio.gather(student.classify(texts, adapter=None),
                                                      *(student.classify(texts, adapter=r) for r in refs))
    # float32 answers do not depend on what shares the step. bf16 ones do, by rounding (a mixed
    # step's shapes change the kernels' summation order): up to a few hundredths, now and then
    # a label whose top two were that close. A leaked LoRA delta moves them far more: the
    # adapter's own answers are the yardstick (median ~0.14 from the base model's here).
    exact = student.config.dtype == "float32"
    same = [(a, b) for a, b in zip(alone, with_lora) if a.fields["intent"].label == b.fields["intent"].label]
    assert len(alone) - len(same) <= (0 if exact else 2)
    drift = sorted(abs(a.confidence - b.confidence) for a, b in same)
    if exact:
        assert all(math.isclose(a.confidence, b.confidence, rel_tol=1e-3, abs_tol=1e-6) for a, b in same)
    else:
        assert drift[-1] <= 0.05 and drift[len(drift) // 2] <= 0.01, drift
    lora_drift = sorted(abs(a.confidence - b.confidence) for a, b in zip(alone, lora_answers))
    assert lora_drift[len(lora_drift) // 2] >= 0.05, lora_drift  # so a leak would fail the above


async def test_an_adapter_for_another_prompt_is_refused_at_load(student, student_model_path, tmp_path):
    other = TaskSpec.model_validate({"name": "other", "instructions": "x",
                                     "fields": [{"name": "intent", "description": "d", "labels": ["a", "b"]}]})
    make_lora(student_model_path, tmp_path / "foreign", seed=4, task=other)
    live = student.live_adapter
    with pytest.raises(ValueError, match="fingerprint"):
        await student.use_adapter(AdapterRef.from_dir(tmp_path / "foreign"))
    assert student.live_adapter is live  # the hot-swap keeps what was live
