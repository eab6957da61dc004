"""One cut for training and serving: a long ticket is cut to the prompt length the adapter
was trained with (recorded in its metadata), and an entity whose span was cut out of the
prompt is not trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from schemas.task import TaskSpec, default_task_path
from services.student.prompting import (
    PromptStyle, adapter_max_prompt_tokens, build_all_codes, entity_max_tokens, prompt_budget,
)
from trainer.dataset import Row, encode

TASK = TaskSpec.from_file(default_task_path())  # banking77: one categorical field
TICKETS = TaskSpec.from_file("schemas/tasks/banking77_tickets.json")  # + priority, entities
LONG = "My Mastercard was charged twice. " + "I waited for the refund for many days. " * 80 + \
    "I live in Spain now. " + "Still nothing has arrived in my account. " * 80


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from services.student.model_store import ensure_student_model

    return AutoTokenizer.from_pretrained(ensure_student_model())


class Adapter:
    adapter_id = "a-00000000000000aa"
    path = Path("unused")
    prompt_style = PromptStyle.compact
    threshold = None

    def __init__(self, meta):
        self.meta = meta


async def test_the_engine_cuts_a_long_ticket_as_the_adapter_was_trained(tokenizer):
    from services.student.engine import EngineConfig, VllmClassifier

    sent = []

    async def logprobs(prompt_ids, allowed, wanted, adapter):
        sent.append(list(prompt_ids))
        return {t: -1.0 for t in wanted}

    classifier = VllmClassifier(None, tokenizer, TASK, EngineConfig(model_path=Path("m"), max_model_len=2048))
    classifier._engine = object()  # not shut down; the request layer below is a fake
    classifier._logprobs = logprobs
    codes = build_all_codes(TASK, tokenizer)
    trained = encode([Row(LONG, {"intent": TASK.fields[0].labels[0]})], TASK, codes, tokenizer, max_tokens=96)
    (result,) = await classifier.classify([LONG], adapter=Adapter({"max_prompt_tokens": 96}))
    assert result.truncated and sent == [list(trained[0].input_ids)] and len(sent[0]) <= 96
    sent.clear()  # an adapter from before `max_prompt_tokens` recorded the trainer's argument
    await classifier.classify([LONG], adapter=Adapter({"hyperparameters": {"max_tokens": 96}}))
    assert sent == [list(trained[0].input_ids)]
    sent.clear()  # the base model: as much as the engine holds
    (base,) = await classifier.classify([LONG], adapter=None)
    assert base.truncated and 96 < len(sent[0]) <= 2047


def test_budgets_leave_room_for_the_output_within_the_model():
    assert prompt_budget(TICKETS, "category", 2048) == 2047
    assert prompt_budget(TICKETS, "entities", 2048) == 2048 - entity_max_tokens(TICKETS.entity_field)
    adapter = Adapter({"max_prompt_tokens": 256})
    assert adapter_max_prompt_tokens(adapter) == 256 and adapter_max_prompt_tokens(None) is None
    assert prompt_budget(TICKETS, "category", 2048, adapter) == prompt_budget(TICKETS, "entities", 2048, adapter) == 256
    assert prompt_budget(TICKETS, "entities", 512, adapter) == 512 - entity_max_tokens(TICKETS.entity_field)


def test_an_entity_cut_out_of_the_prompt_is_not_trained(tokenizer):
    codes = build_all_codes(TICKETS, tokenizer)
    entities = [{"type": "card_brand", "text": "Mastercard"}, {"type": "country", "text": "Spain"}]
    rows = [Row(LONG, {"entities": entities}), Row("My Mastercard works in Spain.", {"entities": entities})]
    cut, whole = encode(rows, TICKETS, codes, tokenizer, max_tokens=128)
    assert len(cut.input_ids) - cut.answer_len <= 128
    answer = lambda e: json.loads(tokenizer.decode(list(e.input_ids[-e.answer_len:])))  # noqa: E731
    assert answer(cut) == entities[:1]  # Spain sits in the middle: cut out, not learnt
    assert answer(whole) == entities  # a ticket that fits keeps every span
