"""The rule-made ticket task: priority map, entity rules, shipped TaskSpec, JSONL writer."""

from __future__ import annotations

import json

import pytest

from schemas.answer import check_answer
from schemas.task import EntityFieldSpec, TaskSpec, default_task_path
from services.dev.datasets import BANKING77_SPLITS, load_split
from services.dev.ticket_dataset import (PRIORITIES, PRIORITY_BY_INTENT, TICKET_TASK_PATH, extract_entities,
                                         ticket_record, ticket_task_spec, write_ticket_dataset)

BANKING77_LABELS = json.loads(default_task_path().read_text(encoding="utf-8"))["fields"][0]["labels"]


@pytest.fixture(scope="module")
def task() -> TaskSpec:
    return TaskSpec.from_file(TICKET_TASK_PATH)


@pytest.fixture(scope="module")
def train_texts() -> list[str]:
    return [r.text for r in load_split("train")]


def test_every_intent_has_one_of_four_priorities():
    assert set(PRIORITY_BY_INTENT) == set(BANKING77_LABELS)
    assert set(PRIORITY_BY_INTENT.values()) == set(PRIORITIES)
    for intent, level in {"lost_or_stolen_card": "urgent", "compromised_card": "urgent",
                          "card_payment_not_recognised": "urgent", "declined_transfer": "high",
                          "transaction_charged_twice": "high", "activate_my_card": "normal",
                          "exchange_rate": "low", "age_limit": "low"}.items():
        assert PRIORITY_BY_INTENT[intent] == level, intent


def E(kind: str, text: str) -> dict[str, str]:
    return {"type": kind, "text": text}


@pytest.mark.parametrize("text, expected", [
    ("I was charged £20, then $1,000 and 3.50 more.",
     [E("amount", "£20"), E("amount", "$1,000"), E("amount", "3.50")]),
    ("Someone made a 500£ withdrawal and a 1$ fee", [E("amount", "500£"), E("amount", "1$")]),
    ("I tried to withdraw 30 pounds but it only gave me 10.",
     [E("amount", "30"), E("currency", "pounds"), E("amount", "10")]),
    ("Can I send 100 EUR or some US dollars? What about euros and GBP?",
     [E("amount", "100"), E("currency", "EUR"), E("currency", "US dollars"), E("currency", "euros"),
      E("currency", "GBP")]),
    ("I live in Spain, moving from the UK to the US; is France in the EU?",
     [E("country", "Spain"), E("country", "UK"), E("country", "US"), E("country", "France"),
      E("country", "EU")]),
    ("Do you give us cards in the USA?", [E("country", "USA")]),  # "us" is a pronoun
    # a full stop ends the name; a letter after it continues an abbreviation
    ("I live in the EU. I was in Spain. Card from the U.S.A. works", [E("country", "EU"), E("country", "Spain"),
                                                                       E("country", "U.S.A.")]),
    ("I ordered it a couple weeks ago, and a couple of days ago.",
     [E("date", "a couple weeks ago"), E("date", "a couple of days ago")]),
    ("Is it a visa or a Mastercard? I only have American Express and Amex, not Apple Pay.",
     [E("card_brand", "visa"), E("card_brand", "Mastercard"), E("card_brand", "American Express"),
      E("card_brand", "Amex")]),
    ("I paid on Monday, 3 March, and again yesterday; the 12/03/2020 one was 2 days ago.",
     [E("date", "Monday"), E("date", "3 March"), E("date", "yesterday"), E("date", "12/03/2020"),
      E("date", "2 days ago")]),
    ("May I change it? It has been pending since May 5th and last week.",
     [E("date", "May 5th"), E("date", "last week")]),
    ("I have tried 5 times for 2 weeks, I am 18 years old, give me 2 cards, 100% sure, 3D Secure.", []),
    ("How do I activate my card so I can start using it?", []),
])
def test_extract_entities_on_hand_written_texts(text, expected):
    assert extract_entities(text) == expected


def test_entities_are_deduplicated_ordered_and_capped():
    assert extract_entities("Visa, visa, Visa today") == [E("card_brand", "Visa"), E("card_brand", "visa"),
                                                           E("date", "today")]
    many = "Spain France Italy Greece Japan China India Mexico Canada Brazil"
    got = extract_entities(many)
    assert [e["text"] for e in got] == many.split()[:8]


def test_rule_spans_are_valid_answers_for_the_shipped_task(task, train_texts):
    for text in train_texts[:2000]:
        entities = extract_entities(text)
        for e in entities:
            assert e["text"] in text and e["text"] and e["type"] in task.entity_field.type_names
        answer = {"category": "card_arrival", "priority": "normal", "entities": entities}
        assert check_answer(task, answer, text)["entities"] == entities, text


def test_rules_find_entities_in_a_fair_share_of_banking77(train_texts):
    kinds = {e["type"] for t in train_texts for e in extract_entities(t)}
    assert kinds == {"amount", "currency", "country", "card_brand", "date"}
    share = sum(bool(extract_entities(t)) for t in train_texts) / len(train_texts)
    assert 0.05 < share < 0.5, share


def test_shipped_task_file(task):
    assert task.name == "banking77_tickets"
    assert task.field_names == ["category", "priority", "entities"]
    assert task.field("category").labels == BANKING77_LABELS
    assert task.field("priority").labels == list(PRIORITIES)
    spec = task.entity_field
    assert isinstance(spec, EntityFieldSpec)
    assert spec.type_names == ["amount", "currency", "country", "card_brand", "date"]
    assert (spec.max_entities, spec.max_span_chars) == (8, 48)
    assert 5 <= len(task.examples) <= 8
    for example in task.examples:  # the few-shot answers are the rules' answers
        rule = ticket_record(example.text, example.labels["category"])
        assert example.labels == rule["labels"]
        assert [e.model_dump() for e in example.entities] == rule["entities"]
    # The file is what the generator writes today (regenerate with --write-task).
    assert json.loads(TICKET_TASK_PATH.read_text(encoding="utf-8")) == ticket_task_spec()


def test_write_ticket_dataset(tmp_path):
    paths = write_ticket_dataset(tmp_path / "out")
    assert set(paths) == set(BANKING77_SPLITS)
    first = {split: path.read_text(encoding="utf-8") for split, path in paths.items()}
    for split, path in paths.items():
        rows = [json.loads(line) for line in first[split].splitlines()]
        source = load_split(split)
        assert len(rows) == len(source)
        assert rows[0] == ticket_record(source[0].text, source[0].label)
        for row, src in zip(rows, source):
            assert set(row) == {"text", "labels", "entities"}
            assert row["labels"] == {"category": src.label, "priority": PRIORITY_BY_INTENT[src.label]}
    again = write_ticket_dataset(tmp_path / "out")  # overwrites with the same bytes
    assert {s: p.read_text(encoding="utf-8") for s, p in again.items()} == first
