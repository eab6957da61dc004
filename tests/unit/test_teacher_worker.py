"""The teacher worker's decisions with fakes: slots, deadlines, corrections, audits (offsets:
test_offsets.py)."""

import asyncio
import time

import pytest

from schemas.classification import Classification, FieldPrediction
from schemas.escalation import Escalation
from services.teacher.client import TeacherAnswer, TeacherUnavailable
from services.teacher.training_log import TrainingLog
from services.teacher.worker import EscalationResolver, TeacherSlots


# ---- slots --------------------------------------------------------------------------------------
async def test_audits_never_take_a_slot_an_escalation_waits_for():
    slots = TeacherSlots(total=2, audit_slots=1)
    order: list[str] = []
    release = asyncio.Event()

    async def call(kind: str, name: str) -> None:
        async with slots.hold(kind):
            order.append(name)
            await release.wait()

    first = [asyncio.create_task(call("escalation", "e1")), asyncio.create_task(call("escalation", "e2"))]
    await asyncio.sleep(0.01)
    queued = [asyncio.create_task(call("audit", "a1")), asyncio.create_task(call("escalation", "e3"))]
    await asyncio.sleep(0.01)
    assert order == ["e1", "e2"]  # full
    release.set()
    await asyncio.gather(*first, *queued)
    assert order.index("e3") < order.index("a1")  # the escalation queued later still goes first


async def test_audits_use_at_most_their_share():
    slots = TeacherSlots(total=4, audit_slots=1)
    peak = 0

    async def audit() -> None:
        nonlocal peak
        async with slots.hold("audit"):
            peak = max(peak, slots.busy("audit"))
            await asyncio.sleep(0.01)

    await asyncio.gather(*(audit() for _ in range(6)))
    assert peak == 1


async def test_a_waiter_cancelled_in_line_leaves_no_slot_behind():
    slots = TeacherSlots(total=1, audit_slots=1)
    release, served = asyncio.Event(), []

    async def call(kind: str, name: str) -> None:
        async with slots.hold(kind):
            served.append(name)
            await release.wait()

    holder = asyncio.create_task(call("escalation", "e1"))
    await asyncio.sleep(0.01)
    gone = asyncio.create_task(call("escalation", "e2"))  # in line, then cancelled (a rebalance)
    await asyncio.sleep(0.01)
    gone.cancel()
    release.set()
    await asyncio.gather(holder, gone, return_exceptions=True)
    assert slots.busy("escalation") == 0
    # the line is empty again: an audit (which yields to waiting escalations) gets the slot at once
    await asyncio.wait_for(call("audit", "a1"), timeout=1)
    assert served == ["e1", "a1"]


async def test_a_thousand_waiters_are_served_in_order_of_arrival():
    slots = TeacherSlots(total=8, audit_slots=2)
    served: list[int] = []

    async def call(i: int) -> None:
        async with slots.hold("escalation"):
            served.append(i)
            await asyncio.sleep(0)

    await asyncio.gather(*(call(i) for i in range(1000)))
    assert served == list(range(1000)) and slots.busy("escalation") == 0


# ---- the resolver -------------------------------------------------------------------------------
class Teacher:
    model = "fake-teacher"

    def __init__(self, delay_s=0.0, script=()):
        self.delay_s, self.script, self.asked = delay_s, list(script), []

    async def label(self, text):
        self.asked.append(text)
        if self.script:
            step = self.script.pop(0)
            if step != "ok":
                raise TeacherUnavailable(step, "scripted")
        await asyncio.sleep(self.delay_s)
        return TeacherAnswer({"intent": "lost_or_stolen_card"}, self.model, "ph", 10, 2, 0.001, self.delay_s)


def request(kind="escalation", ticket_id="T-1", text="where is my card", age_s=0.0, sample=None):
    student = Classification(
        ticket_id=ticket_id, fields={"intent": "card_arrival"}, confidence=0.3,
        route="unverified" if kind == "escalation" else "student", model="student", adapter_id="a-1",
        student={"intent": FieldPrediction(label="card_arrival", confidence=0.3)},
        audited=kind == "audit", latency_ms=5.0, engine_ms=3.0)
    return Escalation(kind=kind, ticket_id=ticket_id, text=text, student_result=student,
                      ticket_time_ms=int((time.time() - age_s) * 1000), sample=sample)


@pytest.fixture
def training_log(tmp_path):
    with TrainingLog(tmp_path / "log.sqlite3") as log:
        yield log


def resolver(teacher, training_log, deadline_s=5.0, **kw):
    published: list[Classification] = []

    async def publish(result):
        published.append(result)

    r = EscalationResolver(teacher=teacher, training_log=training_log, publish=publish, deadline_s=deadline_s,
                           slots=TeacherSlots(4, 1), retry_base_s=0.01, retry_max_s=0.02, **kw)
    return r, published


async def test_a_timely_answer_is_one_teacher_result_and_a_live_example(training_log):
    r, published = resolver(Teacher(), training_log)
    await r.resolve(request())
    [result] = published
    assert result.route.value == "teacher" and result.fields == {"intent": "lost_or_stolen_card"}
    assert result.student["intent"].label == "card_arrival" and result.adapter_id == "a-1"  # both kept
    assert result.teacher_model == result.model == "fake-teacher" and result.confidence == 1.0
    [example] = training_log.examples()
    assert example.source == "live" and example.ticket_id == "T-1" and example.prompt_hash == "ph"


async def test_past_the_deadline_users_get_the_student_answer_then_the_correction(training_log):
    r, published = resolver(Teacher(delay_s=0.3), training_log, deadline_s=0.05)
    await r.resolve(request())
    assert [p.route.value for p in published] == ["unverified", "teacher"]
    assert published[0].fields == {"intent": "card_arrival"}  # the student's answer, flagged
    assert {p.ticket_id for p in published} == {"T-1"}
    assert r.summary()["corrections"] == 1


async def test_a_ticket_already_past_its_deadline_is_unverified_at_once(training_log):
    r, published = resolver(Teacher(delay_s=0.05), training_log, deadline_s=1.0)
    await r.resolve(request(age_s=5.0))  # waited in Kafka for 5 s already
    assert [p.route.value for p in published] == ["unverified", "teacher"]


async def test_an_outage_waits_it_out_instead_of_dropping_the_ticket(training_log):
    teacher = Teacher(script=["circuit_open", "timeout", "error", "ok"])
    r, published = resolver(teacher, training_log, deadline_s=0.0)
    await r.resolve(request())
    assert [p.route.value for p in published] == ["unverified", "teacher"]
    assert len(teacher.asked) == 4 and training_log.count() == 1


async def test_a_ticket_the_teacher_refuses_keeps_its_unverified_answer(training_log):
    teacher = Teacher(script=["invalid_answer"] * 3)
    r, published = resolver(teacher, training_log, max_ticket_attempts=3)
    await r.resolve(request())
    assert [p.route.value for p in published] == ["unverified"]
    assert training_log.count() == 0 and r.summary()["gave_up"] == {"invalid_answer": 1}


async def test_a_resent_ticket_is_answered_from_the_log_not_the_teacher(training_log):
    teacher = Teacher()
    r, published = resolver(teacher, training_log)
    await r.resolve(request(age_s=1.0))
    await r.resolve(request())  # the same ticket sent again: another ticket time
    assert len(teacher.asked) == 1
    assert [p.route.value for p in published] == ["teacher", "teacher"]
    assert published[0].fields == published[1].fields and training_log.count() == 1


async def test_a_redelivered_escalation_answered_already_publishes_nothing(tmp_path):
    # Answered and acknowledged, not yet committed (an older record of its partition was still
    # in flight), then a kill -9 or a rebalance: the new owner reads it again (issue 27).
    teacher, record = Teacher(), request()
    with TrainingLog(tmp_path / "log.sqlite3") as log:
        r, published = resolver(teacher, log)
        await r.resolve(record)
    with TrainingLog(tmp_path / "log.sqlite3") as log:  # the other replica, same durable log
        again, republished = resolver(teacher, log)
        await again.resolve(record)
    assert [p.route.value for p in published] == ["teacher"] and republished == []
    assert len(teacher.asked) == 1 and again.summary()["redelivered_answered"] == 1


async def test_a_redelivery_after_the_unverified_answer_still_gets_the_correction(training_log):
    teacher, record = Teacher(script=["error"] * 3 + ["ok"]), request()

    async def dies(result):
        raise ConnectionError("killed before the broker acknowledged")

    crashed = EscalationResolver(teacher=teacher, training_log=training_log, publish=dies, deadline_s=0.0,
                                 slots=TeacherSlots(4, 1), retry_base_s=0.01, retry_max_s=0.02)
    with pytest.raises(ConnectionError):
        await crashed.resolve(record)  # the unverified answer never made it
    r, published = resolver(teacher, training_log, deadline_s=0.0)
    await r.resolve(record)
    assert [p.route.value for p in published] == ["unverified", "teacher"]


async def test_without_a_teacher_escalations_are_unverified_at_once(training_log):
    r, published = resolver(None, training_log, deadline_s=60.0)
    await r.resolve(request())
    assert [p.route.value for p in published] == ["unverified"]


async def test_audits_publish_nothing_and_measure_agreement(training_log):
    r, published = resolver(Teacher(), training_log)
    await r.resolve(request("audit", "A-1", "text one", sample="sample"))
    agree = request("audit", "A-2", "text two", sample="sample")
    agree.student_result.fields["intent"] = "lost_or_stolen_card"
    await r.resolve(agree)
    await r.resolve(request("audit", "A-3", "text three"))  # in flight from before the sample
    assert published == []
    summary = r.summary()
    assert summary["audits"] == 3 and summary["audited_accuracy"] == pytest.approx(1 / 3)
    sources = {e.text: e.source for e in training_log.examples()}
    assert sources == {"text one": "sample", "text two": "sample", "text three": "audit"}


async def test_a_sampled_escalation_is_logged_as_held_out_not_as_training(training_log):
    r, published = resolver(Teacher(), training_log)
    await r.resolve(request(ticket_id="S-1", text="sampled one", sample="sample"))
    await r.resolve(request(ticket_id="S-2", text="sampled cold", sample="sample-cold"))
    await r.resolve(request(ticket_id="L-1", text="not sampled"))
    assert [p.route.value for p in published] == ["teacher"] * 3
    sources = {e.text: e.source for e in training_log.examples()}
    assert sources == {"sampled one": "sample", "sampled cold": "sample-cold", "not sampled": "live"}


class EntityTeacher:
    """Answers the intent and the country as the ticket spells it (what the client's check lets through)."""

    model = "fake-teacher"

    def __init__(self):
        self.asked = []

    async def label(self, text, fields=None):
        self.asked.append(text)
        country = next(w for w in ("Spain", "SPAIN", "spain") if w in text)
        return TeacherAnswer({"intent": "lost_or_stolen_card", "entities": [{"type": "country", "text": country}]},
                             self.model, "ph", 10, 2, 0.001, 0.0)


def entity_request(ticket_id: str, text: str) -> Escalation:
    from schemas.classification import EntityPrediction
    from schemas.task import Entity

    guess = [Entity(type="country", text="Spain")]
    student = Classification(
        ticket_id=ticket_id, fields={"intent": "card_arrival"}, entities=guess,
        sources={"intent": "student", "entities": "student"}, confidence=0.3, route="unverified",
        model="student", student={"intent": FieldPrediction(label="card_arrival", confidence=0.3)},
        student_entities=EntityPrediction(entities=guess, confidence=0.2), latency_ms=5.0, engine_ms=3.0)
    return Escalation(kind="escalation", ticket_id=ticket_id, text=text, student_result=student,
                      ticket_time_ms=int(time.time() * 1000))


async def test_a_logged_answer_is_reused_only_where_its_spans_occur_in_the_new_ticket(training_log):
    """The log's dedup key folds case, so the answer logged for "... in Spain" is found for
    "... IN SPAIN", where the span "Spain" does not occur: a fresh teacher answer with it would
    be refused (span_not_in_text), so the reused one is not published either; the teacher is
    asked. A whitespace variant keeps its spans and is answered from the log."""
    teacher = EntityTeacher()
    r, published = resolver(teacher, training_log)
    await r.resolve(entity_request("T-1", "I lost my card in Spain"))
    await r.resolve(entity_request("T-2", "I lost my card\n in   Spain"))
    assert teacher.asked == ["I lost my card in Spain"] and r.summary()["reused"] == 1
    await r.resolve(entity_request("T-3", "I LOST MY CARD IN SPAIN"))
    assert teacher.asked == ["I lost my card in Spain", "I LOST MY CARD IN SPAIN"]
    assert [[e.text for e in p.entities] for p in published] == [["Spain"], ["Spain"], ["SPAIN"]]
    assert all(p.route.value == "teacher" for p in published)


async def test_partial_answers_for_one_text_add_up_instead_of_paying_the_teacher_each_time(training_log):
    """The teacher is asked for the unsure fields only: the intent for one escalation, the
    entities for the next of the same text. The second answer merges into the logged row, so
    a third escalation of that text is answered from the log."""

    class PartialTeacher(EntityTeacher):
        def fields_for(self, text, unsure):
            return list(unsure)

        async def label(self, text, fields=None):
            full = await super().label(text)
            return TeacherAnswer({k: full.labels[k] for k in fields}, self.model, "ph", 10, 2, 0.001, 0.0)

    teacher = PartialTeacher()
    r, published = resolver(teacher, training_log)
    for ticket_id, unsure in (("T-1", ["intent"]), ("T-2", ["entities"]), ("T-3", ["entities"]), ("T-4", ["intent"])):
        escalation = entity_request(ticket_id, "I lost my card in Spain")
        escalation.unsure_fields = unsure
        await r.resolve(escalation)
    assert len(teacher.asked) == 2 and r.summary()["reused"] == 2
    [row] = training_log.examples()
    assert row.labels == {"intent": "lost_or_stolen_card", "entities": [{"type": "country", "text": "Spain"}]}
    assert training_log.stats()["conflicts"] == 0
    assert [p.sources for p in published] == [{"intent": "teacher", "entities": "student"},
                                              {"intent": "student", "entities": "teacher"},
                                              *[{"intent": "teacher", "entities": "teacher"}] * 2]  # the whole row


async def test_escalations_waiting_out_an_outage_go_as_soon_as_the_teacher_answers_again(training_log):
    """The backoff (here 2-4 s) is a ceiling: the first answer after the outage (the breaker's
    probe, in production) wakes every escalation that waits, so the backlog drains at once."""

    class Outage(Teacher):
        down = True

        async def label(self, text):
            self.asked.append(text)
            if self.down:
                raise TeacherUnavailable("error", "HTTP 500", "transient")
            return await super().label(text)

    teacher = Outage()
    r, published = resolver(teacher, training_log, deadline_s=60.0)
    r.retry_base_s = r.retry_max_s = 4.0
    waiting = [asyncio.create_task(r.resolve(request(ticket_id=f"T-{i}", text=f"card {i}"))) for i in range(3)]
    await asyncio.sleep(0.2)
    assert len(teacher.asked) == 3 and not published  # each failed once and backs off
    teacher.down = False
    started = time.monotonic()
    await r.resolve(request(ticket_id="T-probe", text="the probe"))
    await asyncio.wait_for(asyncio.gather(*waiting), timeout=1.5)  # not the 2-4 s backoff
    assert time.monotonic() - started < 1.5
    assert sorted(p.ticket_id for p in published) == ["T-0", "T-1", "T-2", "T-probe"]
    assert all(p.route.value == "teacher" for p in published)
