import math

import pytest

from schemas.task import FieldSpec, TaskSpec
from services.student.engine import distribution_from_logprobs, field_prediction
from services.student.prompting import PromptStyle, build_label_codes, render_prompt


class CharTokenizer:
    """Fake tokenizer: one token per character, except a few known two-letter words."""

    vocab = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ")}
    vocab.update({"AB": 100, "CA": 101, "CD": 102})

    def encode(self, text, add_special_tokens=False):
        if text in self.vocab:
            return [self.vocab[text]]
        return [ord(c) for c in text]


def task_with(labels):
    return TaskSpec(name="t", instructions="Classify.", fields=[FieldSpec(name="intent", description="d", labels=labels)])


def test_codes_are_unique_single_tokens_and_deterministic():
    labels = ["card_arrival", "card_delivery", "cash_advance", "apple_pay", "age_limit"]
    spec = task_with(labels).fields[0]
    codes = build_label_codes(spec, CharTokenizer())
    assert len(set(codes.codes)) == len(labels)
    assert len(set(codes.token_ids)) == len(labels)
    assert all(len(CharTokenizer().encode(c)) == 1 for c in codes.codes)
    assert codes == build_label_codes(spec, CharTokenizer())
    assert codes.code_for_label("card_arrival") == "CA"  # initials when free
    for label in labels:
        assert codes.label_for_token(codes.token_for_label(label)) == label


def test_compact_prompt_is_short_and_instruct_lists_every_code():
    task = task_with(["card_arrival", "age_limit"])
    codes = build_label_codes(task.fields[0], CharTokenizer())
    compact = render_prompt(task, "intent", "  my   card\nhas not arrived ", PromptStyle.compact, codes)
    assert "my card has not arrived" in compact and "Classify." not in compact
    instruct = render_prompt(task, "intent", "my card", PromptStyle.instruct, codes)
    for code, label in zip(codes.codes, codes.labels):
        assert f"{code} = {label}" in instruct
    assert instruct.index("Codes:") < instruct.index("my card")  # shared prefix first


def test_distribution_renormalises_over_label_tokens_only():
    task = task_with(["card_arrival", "age_limit", "apple_pay"])
    codes = build_label_codes(task.fields[0], CharTokenizer())
    a, b, c = codes.token_ids
    probs = distribution_from_logprobs(codes, {a: math.log(0.2), b: math.log(0.1), c: math.log(0.1), 999: math.log(0.6)})
    assert probs == pytest.approx([0.5, 0.25, 0.25])
    pred = field_prediction(codes, probs)
    assert pred.label == "card_arrival" and pred.confidence == pytest.approx(0.5)
    assert [alt.label for alt in pred.alternatives] == ["age_limit", "apple_pay"]
    missing = distribution_from_logprobs(codes, {a: math.log(0.3)})
    assert missing == pytest.approx([1.0, 0.0, 0.0])
