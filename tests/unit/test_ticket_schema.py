"""The ticket schema: field types in the TaskSpec, the answer contract, per-field escalation."""

import asyncio
import json
import math

import pytest
from pydantic import ValidationError

from schemas.answer import (
    AnswerError, answers_agree, check_answer, check_entities, entity_json, keep_valid_entities,
    valid_fields,
)
from schemas.classification import Classification, EntityPrediction, FieldPrediction, Route
from schemas.escalation import Escalation
from schemas.task import Entity, TaskSpec, default_task_path
from services.student.engine import StudentPrediction
from services.stream.pipeline import EscalationConfig, InboundRecord, TicketPipeline
from services.teacher.prompt import build_response_schema, fields_to_ask, parse_answer
from services.teacher.worker import agrees, merge_answer

TASK = TaskSpec.model_validate({
    "name": "desk", "instructions": "Triage bank tickets.",
    "inputs": [{"name": "product"}],
    "fields": [
        {"name": "category", "description": "topic", "labels": [f"topic_{i}" for i in range(10)] + [f"customer_intent_number_{i}" for i in range(67)]},
        {"name": "priority", "description": "urgency", "labels": ["high", "low"]},
        {"type": "entities", "name": "entities", "description": "what the ticket mentions",
         "entity_types": [{"name": "amount", "description": "money"}, {"name": "country", "description": "a country"}],
         "max_entities": 3}],
})
TEXT = "I sent 200 euros to Spain"


def test_field_types_and_their_validation():
    assert [f.name for f in TASK.categorical_fields] == ["category", "priority"]
    assert TASK.entity_field.type_names == ["amount", "country"]
    spec = json.loads(TASK.model_dump_json())
    with pytest.raises(ValidationError, match="at most one entities field"):
        TaskSpec.model_validate({**spec, "fields": spec["fields"] + [{**spec["fields"][2], "name": "more"}]})
    with pytest.raises(ValidationError, match="invalid entity"):
        TaskSpec.model_validate({**spec, "examples": [{"text": "hi", "labels": {}, "entities": [
            {"type": "amount", "text": "200"}]}]})
    with pytest.raises(ValidationError, match="standard ticket fields"):
        TaskSpec.model_validate({**spec, "inputs": [{"name": "subject"}]})


def test_a_categorical_task_fingerprints_exactly_as_before_field_types():
    # Deployed adapters store a fingerprint of this dump: new optional keys must not enter it.
    task = TaskSpec.from_file(default_task_path())
    dumped = json.loads(task.fingerprint_json())
    assert list(dumped) == ["name", "instructions", "fields", "examples"]
    assert all(list(f) == ["name", "description", "labels"] for f in dumped["fields"])
    assert all(list(e) == ["text", "labels"] for e in dumped["examples"])


@pytest.mark.parametrize("answer, reason", [
    ({"category": "topic_1", "priority": "high", "entities": [{"type": "city", "text": "Spain"}]}, "unknown_entity_type"),
    ({"category": "topic_1", "priority": "high", "entities": [{"type": "country", "text": "France"}]}, "span_not_in_text"),
    ({"category": "topic_1", "priority": "high", "entities": [{"type": "country"}]}, "malformed_entities"),
    ({"category": "topic_1", "priority": "high", "entities": "Spain"}, "malformed_entities"),
    ({"category": "topic_1", "priority": "urgent", "entities": []}, "unknown_label"),
    ({"category": "topic_1", "entities": []}, "missing_field"),
])
def test_the_teacher_answer_contract_refuses_with_a_reason(answer, reason):
    with pytest.raises(AnswerError) as info:
        check_answer(TASK, answer, TEXT)
    assert info.value.reason == reason
    with pytest.raises(AnswerError) as info:
        parse_answer(TASK, json.dumps(answer), TEXT)
    assert info.value.reason == reason


def test_valid_answers_normalise_and_partial_answers_cover_the_asked_fields():
    answer = parse_answer(TASK, json.dumps({"category": "TOPIC_3", "priority": "low", "entities": [
        {"type": "amount", "text": "200  euros"}, {"type": "amount", "text": "200 euros"}]}), TEXT)
    assert answer == {"category": "topic_3", "priority": "low", "entities": [{"type": "amount", "text": "200 euros"}]}
    assert parse_answer(TASK, '{"priority": "high"}', TEXT, ["priority"]) == {"priority": "high"}
    with pytest.raises(AnswerError) as info:
        parse_answer(TASK, '{"priority": "hi', TEXT)
    assert info.value.reason == "malformed_json"
    schema = build_response_schema(TASK, ["priority", "entities"])
    assert schema["required"] == ["priority", "entities"]
    assert schema["properties"]["entities"]["items"]["properties"]["type"]["enum"] == ["amount", "country"]


def test_student_spans_not_in_the_text_are_dropped_and_counted():
    kept, dropped = keep_valid_entities(TASK.entity_field, [
        {"type": "amount", "text": "200 euros"}, {"type": "country", "text": "Narnia"},
        {"type": "planet", "text": "Spain"}, {"type": "country", "text": "Spain"},
        {"type": "country", "text": "Spain"}], TEXT)
    assert kept == [Entity(type="amount", text="200 euros"), Entity(type="country", text="Spain")]
    assert dropped == {"span_not_in_text": 1, "unknown_entity_type": 1}
    assert entity_json(kept) == '[{"type":"amount","text":"200 euros"},{"type":"country","text":"Spain"}]'


def test_the_student_span_is_kept_in_the_tickets_spelling_when_only_case_differs():
    items = [{"type": "country", "text": "spain"}, {"type": "amount", "text": "200 EUROS"},
             {"type": "country", "text": "Narnia"}]
    kept, dropped = keep_valid_entities(TASK.entity_field, items, TEXT, fold_case=True)
    assert kept == [Entity(type="country", text="Spain"), Entity(type="amount", text="200 euros")]
    assert dropped == {"span_not_in_text": 1}
    # strict unless asked: the teacher's answers and the default stay case-sensitive
    assert keep_valid_entities(TASK.entity_field, items, TEXT)[1] == {"span_not_in_text": 3}
    with pytest.raises(AnswerError, match="span_not_in_text"):
        check_entities(TASK.entity_field, items[:1], TEXT)


def test_a_dropped_student_span_leaves_the_entities_without_confidence():
    from types import SimpleNamespace

    from services.student.outputs import parse_entity_output

    def completion(text):  # two generated tokens at probability 0.9 each
        return SimpleNamespace(text=text, token_ids=[1, 2], logprobs=[{1: math.log(0.9)}, {2: math.log(0.9)}])

    kept = parse_entity_output(TASK.entity_field, completion('[{"type":"country","text":"spain"}]'), TEXT)
    assert kept.entities == [Entity(type="country", text="Spain")] and kept.confidence == pytest.approx(0.81)
    imagined = parse_entity_output(TASK.entity_field, completion('[{"type":"country","text":"Narnia"}]'), TEXT)
    assert imagined.entities == [] and imagined.dropped == {"span_not_in_text": 1}
    assert imagined.confidence == 0.0  # "[]" published, but not what the student meant: escalate

def test_stored_answers_keep_only_fields_valid_today():
    labels = {"category": "topic_2", "priority": "gone_label", "entities": [{"type": "country", "text": "Spain"}]}
    assert valid_fields(TASK, labels, TEXT) == {"category": "topic_2", "entities": [{"type": "country", "text": "Spain"}]}
    assert answers_agree(TASK, {"entities": [{"type": "country", "text": "Spain"}]},
                         {"entities": [{"type": "country", "text": " Spain "}], "priority": "x"})


def test_asking_for_the_unsure_fields_only_when_that_is_cheaper():
    prices = (0.15, 0.60)
    # priority alone skips the 40-label category list: much cheaper than a full request
    assert fields_to_ask(TASK, ["priority"], TEXT, 0, prices, 0.7) == ["priority"]
    # category is most of the prompt: asking for it alone saves too little, ask for everything
    assert fields_to_ask(TASK, ["category"], TEXT, 0, prices, 0.7) is None
    assert fields_to_ask(TASK, ["priority"], TEXT, 0, prices, 0.0) is None
    assert fields_to_ask(TASK, TASK.field_names, TEXT, 0, prices, 0.7) is None


def _student(category=0.99, priority=0.4, entities=0.95):
    return StudentPrediction(
        fields={"category": FieldPrediction(label="topic_1", confidence=category),
                "priority": FieldPrediction(label="low", confidence=priority)},
        distribution={}, adapter_id="a1",
        entities=EntityPrediction(entities=[Entity(type="country", text="Spain")], confidence=entities),
        entity_field="entities")


class _Classifier:
    model_name, task = "m", TASK

    def __init__(self, prediction):
        self.prediction = prediction
        self.live_adapter = type("Ref", (), {"adapter_id": "a1", "threshold": {
            "category": 0.9, "priority": 0.8, "entities": 0.9}})()

    async def classify(self, texts, *, adapter=None):
        return [self.prediction for _ in texts]


def _process(prediction, value):
    pipeline = TicketPipeline(classifier=_Classifier(prediction), escalation=EscalationConfig())
    record = InboundRecord(json.dumps(value).encode(), b"k", "t", 0, 0, 0.0)
    return asyncio.run(pipeline.process([record]))


def test_each_field_is_judged_by_its_own_threshold_and_only_unsure_fields_escalate():
    [out] = _process(_student(), {"id": "t1", "text": TEXT, "product": "savings"})
    assert out.kind == "escalation"
    request = Escalation.model_validate_json(out.payload)
    assert request.unsure_fields == ["priority"]
    assert request.text == f"Product: savings\n{TEXT}"  # the task's input, shown to the models
    assert request.student_result.entities == [Entity(type="country", text="Spain")]
    [out] = _process(_student(priority=0.85), {"id": "t2", "text": TEXT})
    result = Classification.model_validate_json(out.payload)
    assert (out.kind, result.route, result.sources) == ("result", Route.student, {
        "category": "student", "priority": "student", "entities": "student"})
    [out] = _process(_student(priority=0.85), {"id": "t3", "text": TEXT, "reporter": "x"})
    assert out.kind == "dead_letter" and b"reporter" in out.payload  # an input the task does not declare


def test_a_partial_teacher_answer_replaces_only_its_fields_and_says_so():
    [out] = _process(_student(), {"id": "t1", "text": TEXT})
    student = Escalation.model_validate_json(out.payload).student_result
    merged = merge_answer(student, {"priority": "high"})
    assert merged["fields"] == {"category": "topic_1", "priority": "high"}
    assert merged["sources"] == {"category": "student", "priority": "teacher", "entities": "student"}
    assert merged["confidence"] == pytest.approx(0.95)  # lowest student field still published
    merged = merge_answer(student, {"category": "topic_2", "priority": "high", "entities": []})
    assert merged["entities"] == [] and merged["confidence"] == 1.0
    assert set(merged["sources"].values()) == {"teacher"}
    assert agrees(student, {"entities": [{"type": "country", "text": "Spain"}]})
    assert not agrees(student, {"priority": "high"})


def test_span_candidates_cover_word_runs_and_bound_long_tickets():
    from schemas.answer import span_candidates

    spans = span_candidates("Charged  $1,000 in Spain last Saturday!", 48)
    for wanted in ("$1,000", "Spain", "last Saturday", "in Spain last Saturday", "Saturday!"):
        assert wanted in spans
    assert all(s in "Charged $1,000 in Spain last Saturday!" for s in spans)
    assert not any("  " in s for s in spans)  # whitespace-normalised, like the span check
    assert span_candidates("word " * 400, 48) is not None  # repeats collapse
    assert span_candidates(" ".join(f"w{i}" for i in range(400)), 48) is None  # > 512 distinct: free text + check
