"""The fallible teacher stand-in (`triage standin --error-rate R`): wrong on a seeded share R of
tickets, the same answer every time a text is asked, with a label a model would confuse."""

from __future__ import annotations

import pytest

from schemas.task import TaskSpec, default_task_path
from services.dev.standin import STANDIN_MODEL, GoldLabelStandin, load_gold
from services.dev.standin_args import parse_options

TASK = TaskSpec.from_file(default_task_path())
LABELS = TASK.fields[0].labels
PROPS = [("intent", {"type": "string", "enum": LABELS})]


@pytest.fixture(scope="module")
def gold():
    return load_gold()


@pytest.fixture(scope="module")
def texts(gold) -> list[str]:
    return list(gold)[:2000]


def answers(server: GoldLabelStandin, texts: list[str]) -> list[str]:
    return [server._compose(t, PROPS, "ok")["intent"] for t in texts]


def test_the_rate_is_honoured_and_every_wrong_label_is_a_confusable_one(gold, texts):
    server = GoldLabelStandin(gold, label_error_rate=0.10, seed=3)
    got = answers(server, texts)
    wrong = [(t, a) for t, a in zip(texts, got) if a != gold[t]]
    assert abs(len(wrong) / len(texts) - 0.10) < 0.025  # binomial sd at n=2000: 0.0067
    assert server.stats["wrong_labels"] == len(wrong)
    for text, answer in wrong:
        assert answer in server.errors.confusable(gold[text], LABELS), (gold[text], answer)
    # not uniform noise: the wrong answers concentrate on a few neighbours per gold label
    assert len({a for _, a in wrong}) < len(LABELS)


def test_deterministic_per_text_and_seed(gold, texts):
    first = answers(GoldLabelStandin(gold, label_error_rate=0.10, seed=3), texts)
    again = GoldLabelStandin(gold, label_error_rate=0.10, seed=3)
    assert answers(again, texts) == first
    assert answers(again, list(reversed(texts))) == list(reversed(first))  # order does not matter
    other = answers(GoldLabelStandin(gold, label_error_rate=0.10, seed=4), texts)
    assert other != first  # another seed errs on other tickets


def test_zero_is_the_gold_and_the_banner_says_which(gold, texts):
    server = GoldLabelStandin(gold)
    assert answers(server, texts[:500]) == [gold[t] for t in texts[:500]]
    assert "FALLIBLE" not in server.banner and "not a model" in server.banner
    fallible = GoldLabelStandin(gold, label_error_rate=0.1)
    assert "FALLIBLE" in fallible.banner and "WRONG label on 10.0%" in fallible.banner


def test_neighbours_are_labels_of_similar_tickets(gold):
    errors = GoldLabelStandin(gold).errors
    assert "card_delivery_estimate" in errors.confusable("card_arrival", LABELS)
    assert "lost_or_stolen_phone" in errors.confusable("lost_or_stolen_card", LABELS)
    assert "card_arrival" not in errors.confusable("card_arrival", LABELS)


def test_the_command_line_error_rate_is_the_label_error_rate():
    _, _, _, options = parse_options(["--error-rate", "0.1", "--http-error-rate", "0.2", "--seed", "5"],
                                     model=STANDIN_MODEL)
    assert options["label_error_rate"] == 0.1 and options["error_rate"] == 0.2 and options["seed"] == 5
    assert GoldLabelStandin({"a b": "x"}, **options).faults.label_error_rate == 0.1
