"""The gold-label stand-in answers every field a request asks for (categoricals and entities),
over real HTTP with the teacher's own schema, and its entity/JSON faults are ones the teacher's
parser refuses."""

from __future__ import annotations

import json
import re

import pytest
from openai import AsyncOpenAI

from schemas.answer import AnswerError
from schemas.task import TaskSpec
from schemas.text import dedup_key
from services.dev.standin import ENTITIES_KEY, gold_entry, load_gold, run_standin
from services.teacher.prompt import build_teacher_messages, parse_answer, response_format

TASK = TaskSpec.model_validate({
    "name": "tickets",
    "instructions": "Classify the ticket and extract amounts and countries.",
    "fields": [
        {"name": "category", "description": "What it is about.",
         "labels": ["billing", "card", "transfer"]},
        {"name": "priority", "description": "How urgent.", "labels": ["low", "high"]},
        {"type": "entities", "name": "entities", "description": "Amounts and countries.",
         "entity_types": [{"name": "amount", "description": "A sum of money."},
                          {"name": "country", "description": "A country."}],
         "max_entities": 4},
    ],
})
ONE_FIELD = TaskSpec.model_validate({
    "name": "intents", "instructions": "Pick the intent.",
    "fields": [{"name": "intent", "description": "The intent.",
                "labels": ["lost_or_stolen_card", "card_arrival", "top_up"]}],
})

CHARGED = "I was charged 20 EUR twice in France"
CARD = "My new card has still not arrived"
GOLD = {
    # "person" is not a type of TASK: the stand-in leaves it out of the answer.
    dedup_key(CHARGED): gold_entry({"category": "billing", "priority": "high"},
                                   [{"type": "amount", "text": "20 EUR"},
                                    {"type": "country", "text": "France"},
                                    {"type": "person", "text": "I"}]),
    dedup_key(CARD): gold_entry({"category": "card", "priority": "low"}, []),
}
CHARGED_ANSWER = {"category": "billing", "priority": "high",
                  "entities": [{"type": "amount", "text": "20 EUR"},
                               {"type": "country", "text": "France"}]}


def rules(text: str) -> list[dict[str, str]]:
    """Entities of an unknown text: amounts like `35 USD`, and a few countries."""
    found = [{"type": "amount", "text": m} for m in re.findall(r"\d+ [A-Z]{3}", text)]
    found += [{"type": "country", "text": c} for c in ("Spain", "France") if c in text]
    return found + [{"type": "city", "text": "Paris"}] * ("Paris" in text)


async def ask(base_url: str, task: TaskSpec, text: str, fields=None) -> str:
    client = AsyncOpenAI(base_url=base_url, api_key="test", max_retries=0, timeout=10)
    try:
        response = await client.chat.completions.create(
            model="gold-label-standin", messages=build_teacher_messages(task, text, 0, fields),
            response_format=response_format(task, fields))
    finally:
        await client.close()
    return response.choices[0].message.content


async def test_known_text_gets_every_field_from_gold():
    async with run_standin(gold=GOLD) as server:
        content = await ask(server.base_url, TASK, CHARGED)
        assert json.loads(content) == CHARGED_ANSWER  # schema order, "person" filtered out
        assert parse_answer(TASK, content, CHARGED) == CHARGED_ANSWER
        card = await ask(server.base_url, TASK, "  my NEW card has still not arrived ")
        assert parse_answer(TASK, card, CARD) == {"category": "card", "priority": "low",
                                                  "entities": []}
        only = await ask(server.base_url, TASK, CHARGED, fields=["priority"])
        assert json.loads(only) == {"priority": "high"}
        ents = await ask(server.base_url, TASK, CHARGED, fields=["entities"])
        assert json.loads(ents) == {"entities": CHARGED_ANSWER["entities"]}
        assert server.stats["unknown_texts"] == 0 and server.stats["answered_total"] == 4
        assert server.stats["missing_gold_fields"] == 0


async def test_unknown_text_gets_neighbour_labels_and_rule_entities():
    text = "I was charged 35 USD twice in Spain, near Paris"
    async with run_standin(gold=GOLD, entity_rules=rules) as server:
        content = await ask(server.base_url, TASK, text)
        assert parse_answer(TASK, content, text) == {
            "category": "billing", "priority": "high",  # the nearest known text's labels
            "entities": [{"type": "amount", "text": "35 USD"},  # the rules', not France / 20 EUR
                         {"type": "country", "text": "Spain"}]}  # "city" is not a type
        assert server.stats["unknown_texts"] == 1 and server.stats["rule_entities"] == 3
        entry, known = server.lookup_entry("zzqx vvkw")  # no overlap: a label per field
        assert not known and entry == server.lookup_entry("zzqx vvkw")[0]
        assert entry["category"] in TASK.field("category").labels and set(entry) == {
            "category", "priority"}
    async with run_standin(gold=GOLD) as server:  # no rules: no entities for unknown texts
        content = await ask(server.base_url, TASK, text)
        assert json.loads(content)["entities"] == []


@pytest.mark.parametrize("outcome, reason", [
    ("bad_entity_type", "unknown_entity_type"),
    ("bad_span", "span_not_in_text"),
    ("malformed", "malformed_json"),
])
async def test_entity_and_json_faults_are_refused_by_the_parser(outcome, reason):
    async with run_standin(gold=GOLD) as server:
        server.set_faults(script=[outcome])
        content = await ask(server.base_url, TASK, CHARGED)
        with pytest.raises(AnswerError) as info:
            parse_answer(TASK, content, CHARGED)
        assert info.value.reason == reason
        assert server.stats[outcome] == 1 and server.stats["answered_total"] == 0
        # the next request is fine again
        assert parse_answer(TASK, await ask(server.base_url, TASK, CHARGED), CHARGED) == CHARGED_ANSWER


async def test_entity_faults_stay_within_max_items():
    full = "Paid 1 EUR 2 EUR 3 EUR 4 EUR"
    gold = {dedup_key(full): gold_entry({"category": "billing", "priority": "low"},
                                        [{"type": "amount", "text": f"{i} EUR"} for i in range(1, 5)])}
    async with run_standin(gold=gold, bad_span_rate=1.0) as server:
        with pytest.raises(AnswerError) as info:
            parse_answer(TASK, await ask(server.base_url, TASK, full), full)
    assert info.value.reason == "span_not_in_text"  # not too_many_entities


async def test_noise_and_invalid_on_full_answers():
    async with run_standin(gold=GOLD) as server:
        server.set_faults(script=["noise", "invalid"])
        noisy = json.loads(await ask(server.base_url, TASK, CHARGED))
        assert noisy["category"] != "billing" and noisy["priority"] == "low"
        assert noisy["entities"] == CHARGED_ANSWER["entities"]  # entities untouched
        invalid = json.loads(await ask(server.base_url, TASK, CHARGED))
        assert invalid["category"] == "not_a_label" and invalid["priority"] == "high"
        assert server.stats["noisy"] == 1 and server.stats["invalid"] == 1


async def test_legacy_plain_label_gold_answers_one_field():
    gold = {dedup_key("I lost my card"): "lost_or_stolen_card",
            dedup_key("Where is my new card"): "card_arrival"}
    async with run_standin(gold=gold) as server:
        content = await ask(server.base_url, ONE_FIELD, "i lost my CARD")
        assert json.loads(content) == {"intent": "lost_or_stolen_card"}
        assert parse_answer(ONE_FIELD, content) == {"intent": "lost_or_stolen_card"}
        assert server.lookup("I lost my card") == ("lost_or_stolen_card", True)
        assert server.lookup("where is my card please") == ("card_arrival", False)
        server.set_faults(script=["invalid"])
        assert json.loads(await ask(server.base_url, ONE_FIELD, "I lost my card")) == {
            "intent": "not_a_label"}


def test_load_gold_reads_jsonl_with_labels_and_entities(tmp_path):
    jsonl = tmp_path / "gold.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"text": CHARGED, "labels": {"category": "billing", "priority": "high"},
         "entities": [{"type": "amount", "text": "20 EUR", "start": 14}]},
        {"text": CARD, "labels": {"category": "card"}},  # entities not annotated
        {"text": CHARGED.upper(), "labels": {"category": "card"}},  # repeated text: first wins
    ]) + "\n", encoding="utf-8")
    tsv = tmp_path / "more.tsv"
    tsv.write_text("text\tlabel\nTop up failed\ttop_up\n", encoding="utf-8")
    gold = load_gold([jsonl, tsv])
    assert gold == {
        dedup_key(CHARGED): {"category": "billing", "priority": "high",
                             ENTITIES_KEY: [{"type": "amount", "text": "20 EUR"}]},
        dedup_key(CARD): {"category": "card"},
        dedup_key("Top up failed"): "top_up",
    }
    with pytest.raises(ValueError):
        gold_entry({"category": 3})
    for bad in ([{"type": "amount", "text": ""}], [{"text": "20 EUR"}], ["20 EUR"]):
        with pytest.raises(ValueError):
            gold_entry({}, bad)
