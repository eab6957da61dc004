"""The example ticket task's teacher path over real HTTP: every field answered by the stand-in,
partial asks, and bad answers (undeclared entity type, span not in the ticket, broken JSON)
refused with a counted reason, never published as the teacher's and never logged."""

from __future__ import annotations

import time

import pytest
from pydantic import SecretStr

from schemas.classification import Classification, EntityPrediction, FieldPrediction, Route
from schemas.escalation import Escalation
from schemas.task import Entity, TaskSpec
from services.dev.standin import load_gold, run_standin
from services.dev.ticket_dataset import TICKET_TASK_PATH, extract_entities, write_ticket_dataset
from services.teacher.client import OpenAITeacher, TeacherUnavailable
from services.teacher.training_log import TrainingLog
from services.teacher.worker import EscalationResolver, TeacherSlots

pytestmark = pytest.mark.integration

TASK = TaskSpec.from_file(TICKET_TASK_PATH)


@pytest.fixture(scope="module")
def ticket_gold(tmp_path_factory):
    from services.teacher.corpus import read_records

    paths = write_ticket_dataset(tmp_path_factory.mktemp("tickets"))
    rows = read_records(paths["test"])
    with_entities = [r for r in rows if r["entities"]][:5]
    return load_gold([paths["test"]]), with_entities


def make_teacher(base_url, **overrides):
    kwargs = dict(base_url=base_url, api_key=SecretStr("k"), model="gold-label-standin", task=TASK,
                  few_shot=2, timeout_s=5.0, max_retries=0, concurrency=4, input_price_per_mtok=0.15,
                  output_price_per_mtok=0.60, budget_per_hour_usd=None, budget_per_day_usd=None,
                  breaker_failures=50, breaker_reset_s=15.0, partial_max_share=0.7)
    return OpenAITeacher(**{**kwargs, **overrides})


async def test_the_teacher_answers_every_field_and_only_the_unsure_ones_when_cheaper(ticket_gold):
    gold, rows = ticket_gold
    row = rows[0]
    async with run_standin(gold=gold, entity_rules=extract_entities) as server:
        teacher = make_teacher(server.base_url)
        full = await teacher.label(row["text"])
        assert full.labels == {**row["labels"], "entities": row["entities"]}
        assert teacher.fields_for(row["text"], ["priority"]) == ["priority"]
        assert teacher.fields_for(row["text"], TASK.field_names) is None
        assert make_teacher(server.base_url, partial_max_share=0.0).fields_for(row["text"], ["priority"]) is None
        partial = await teacher.label(row["text"], ["priority"])
        assert partial.labels == {"priority": row["labels"]["priority"]}
        assert partial.prompt_tokens < full.prompt_tokens / 3
        await teacher.aclose()


@pytest.mark.parametrize("fault, reason", [("bad_entity_type", "unknown_entity_type"),
                                           ("bad_span", "span_not_in_text"), ("malformed", "malformed_json")])
async def test_bad_teacher_answers_are_refused_counted_and_never_logged(ticket_gold, tmp_path, fault, reason):
    gold, rows = ticket_gold
    row = rows[1]
    published: list[Classification] = []

    async def publish(result):
        published.append(result)

    student = Classification(
        ticket_id="T-1", fields={"category": "card_arrival", "priority": "low"},
        entities=[], sources={"category": "student", "priority": "student", "entities": "student"},
        confidence=0.2, route=Route.unverified, model="m", latency_ms=1.0, engine_ms=1.0,
        student={"category": FieldPrediction(label="card_arrival", confidence=0.9),
                 "priority": FieldPrediction(label="low", confidence=0.9)},
        student_entities=EntityPrediction(entities=[], confidence=0.2))
    request = Escalation(kind="escalation", ticket_id="T-1", text=row["text"], student_result=student,
                         ticket_time_ms=int(time.time() * 1000), unsure_fields=["entities"])
    async with run_standin(gold=gold, entity_rules=extract_entities) as server:
        server.set_faults(script=[fault] * 3)  # every attempt of this ticket is bad
        teacher = make_teacher(server.base_url)
        with pytest.raises(TeacherUnavailable) as info:
            await teacher.label(row["text"])
        assert (info.value.reason, info.value.scope) == ("invalid_answer", "ticket")
        assert teacher.rejected_answers == {reason: 1}
        with TrainingLog(tmp_path / "log.sqlite3") as log:
            resolver = EscalationResolver(teacher=teacher, training_log=log, publish=publish, deadline_s=30,
                                          slots=TeacherSlots(4, 1), max_ticket_attempts=2, retry_base_s=0.01)
            await resolver.resolve(request)
            assert log.count() == 0  # never training data
        assert teacher.rejected_answers == {reason: 3}
        # the teacher's bad answer is never published: the student's answer stays, unverified
        assert [r.route for r in published] == [Route.unverified]
        assert published[0].entities == [] and published[0].teacher is None
        assert resolver.stats.gave_up == {"invalid_answer": 1}
        # once the teacher answers properly, the same escalation gets the gold answer
        published.clear()
        with TrainingLog(tmp_path / "log.sqlite3") as log:
            resolver = EscalationResolver(teacher=teacher, training_log=log, publish=publish, deadline_s=30,
                                          slots=TeacherSlots(4, 1))
            await resolver.resolve(request)
            [logged] = log.examples()
        [result] = published
        assert result.route is Route.teacher
        assert result.entities == [Entity(**e) for e in row["entities"]]
        assert logged.labels == {"entities": row["entities"]}  # the asked field only (partial ask)
        assert result.sources == {"category": "student", "priority": "student", "entities": "teacher"}
        await teacher.aclose()
