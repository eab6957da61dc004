"""Typed text never becomes a special or added token: every added token of the real SmolLM2
tokenizer (ids 0-16), a 7B base's markers added to it, and a non-special added token, in both
prompt styles, every field, short and cut, in serving and training alike."""

from __future__ import annotations

from collections import Counter

import pytest

from schemas.task import TaskSpec
from services.student.prompting import (
    PromptStyle, build_all_codes, encode_text, fit_prompt, prompt_ids, render_prompt,
)

TICKETS = TaskSpec.from_file("schemas/tasks/banking77_tickets.json")  # category, priority, entities


def _tokenizer():
    from transformers import AutoTokenizer

    from services.student.model_store import ensure_student_model

    return AutoTokenizer.from_pretrained(ensure_student_model())


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


def added_ids(tokenizer, ids) -> Counter:
    return Counter(i for i in ids if i in tokenizer.added_tokens_decoder)


def attack(tokenizer) -> str:
    strings = [t.content for t in tokenizer.added_tokens_decoder.values()]
    return "refund please " + " ".join(strings) + "".join(strings) + " thanks"


def assert_plain(tokenizer, task):
    """Each prompt of an attacked ticket holds exactly the added tokens (the template's chat
    markers) a clean ticket's does."""
    codes = build_all_codes(task, tokenizer)
    typed = attack(tokenizer)
    for style in PromptStyle:
        for spec in task.fields:
            clean = prompt_ids(tokenizer, task, spec.name, "refund please", style, codes.get(spec.name))
            attacked = prompt_ids(tokenizer, task, spec.name, typed, style, codes.get(spec.name))
            assert added_ids(tokenizer, attacked) == added_ids(tokenizer, clean), (style, spec.name)
            cut = fit_prompt(task, spec.name, typed * 60, style, codes.get(spec.name), tokenizer, 1500)
            assert cut is not None and cut[1] and added_ids(tokenizer, cut[0]) == added_ids(tokenizer, clean)


def test_smollm2_has_seventeen_added_tokens_and_none_can_be_typed(tokenizer):
    assert len(tokenizer.added_tokens_decoder) == 17  # the 14 beyond <|...|> are the issue
    for token_id, token in tokenizer.added_tokens_decoder.items():
        ids = encode_text(tokenizer, f"a{token.content}b {token.content}")
        assert not added_ids(tokenizer, ids), token.content
        assert tokenizer.decode(ids) == f"a{token.content}b {token.content}"  # kept as text
    assert_plain(tokenizer, TICKETS)


def test_another_base_models_markers_and_non_special_added_tokens_stay_text():
    tokenizer = _tokenizer()  # a copy of its own: the tokens added here must not leak
    tokenizer.add_special_tokens({"additional_special_tokens": ["[INST]", "</s>", "<|begin_of_text|>"]})
    tokenizer.add_tokens(["<tool_call>"])  # added, not special: split_special_tokens keeps it
    assert not tokenizer.added_tokens_decoder[tokenizer.convert_tokens_to_ids("<tool_call>")].special
    for text in ("[INST] hi", "</s>x", "<|begin_of_text|>", "call <tool_call>now</tool_call>"):
        assert not added_ids(tokenizer, encode_text(tokenizer, text)), text
    assert_plain(tokenizer, TICKETS)


def test_ordinary_tickets_keep_the_ids_their_rendered_prompt_always_had(tokenizer):
    """Adapters trained before keep their inputs: the markers bound the segments anyway."""
    codes = build_all_codes(TICKETS, tokenizer)
    for text in ("where is my card?", "I paid €50 in Spain — refund?", "  my card\nhas not arrived ", "日本語"):
        for style in PromptStyle:
            for spec in TICKETS.fields:
                rendered = render_prompt(TICKETS, spec.name, text, style, codes.get(spec.name))
                assert prompt_ids(tokenizer, TICKETS, spec.name, text, style, codes.get(spec.name)) == \
                    tokenizer.encode(rendered, add_special_tokens=False)


def test_training_encodes_an_attacked_ticket_with_the_serving_ids(tokenizer):
    from trainer.dataset import Row, encode

    codes = build_all_codes(TICKETS, tokenizer)
    typed = attack(tokenizer)
    labels = {"category": TICKETS.fields[0].labels[0], "priority": TICKETS.fields[1].labels[0],
              "entities": [{"type": "country", "text": "<filename>"}]}
    rows = [Row(typed, labels), Row(typed * 60, labels)]
    for e in encode(rows, TICKETS, codes, tokenizer, max_tokens=300):
        served = fit_prompt(TICKETS, e.field, rows[e.row].text, PromptStyle.compact, codes.get(e.field), tokenizer, 300)
        assert served is not None and list(e.input_ids[: len(e.input_ids) - e.answer_len]) == served[0]
        assert not added_ids(tokenizer, e.input_ids), e.field  # compact: no markers, answer included
