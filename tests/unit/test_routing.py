"""Router tasks and deployments (pure): where a ticket is forwarded, exactly once per answer."""

from __future__ import annotations

import json
import time

import pytest
from pydantic import ValidationError

from schemas.classification import Classification, FieldPrediction
from schemas.escalation import Escalation
from schemas.forwarding import Router
from schemas.routing import MAX_ROUTE_HOPS
from schemas.task import TaskSpec
from schemas.ticket import Ticket
from services.deployment import Deployment
from services.settings import Settings
from services.stream.pipeline import EscalationConfig, TicketPipeline
from services.teacher.client import TeacherAnswer
from services.teacher.worker import EscalationResolver, TeacherSlots
from tests.unit.test_pipeline import FakeClassifier, record

ROUTER = Router(task="desk", field="intent", targets={"card_arrival": "cards", "lost_or_stolen_card": "fraud"},
                topics={"cards": "triage.cards.tickets", "fraud": "triage.fraud.tickets"})


def result(label: str, route: str = "student") -> Classification:
    return Classification(ticket_id="T-1", fields={"intent": label}, confidence=0.9, route=route, model="m",
                          latency_ms=1.0, engine_ms=1.0)


def test_a_routed_label_forwards_the_ticket_as_received_plus_one_hop():
    forward = ROUTER.plan({"id": "T-1", "text": "where is my card", "product": "app"}, result("card_arrival"))
    assert forward is not None and forward.task == "cards" and forward.topic == "triage.cards.tickets"
    assert forward.key == b"T-1"
    sent = json.loads(forward.payload)
    assert sent["text"] == "where is my card" and sent["product"] == "app"  # inputs travel on
    assert sent["route_chain"] == [{"task": "desk", "field": "intent", "label": "card_arrival",
                                    "route": "student", "to": "cards"}]
    assert Ticket.model_validate(sent).route_chain[0].to == "cards"  # the specialist can parse it


def test_an_unrouted_label_or_a_loop_forwards_nothing():
    assert ROUTER.plan({"id": "T-1", "text": "x"}, result("age_limit")) is None
    hop = {"task": "cards", "field": "f", "label": "l", "route": "student", "to": "desk"}
    assert ROUTER.plan({"id": "T-1", "text": "x", "route_chain": [hop]}, result("card_arrival")) is None
    long_chain = [{**hop, "task": f"t{i}"} for i in range(MAX_ROUTE_HOPS)]
    assert ROUTER.plan({"id": "T-1", "text": "x", "route_chain": long_chain}, result("card_arrival")) is None


def test_routes_must_fit_the_router_task(task):
    ROUTER.check(task)
    with pytest.raises(ValueError, match="not a categorical field"):
        Router("desk", "priority", {"x": "cards"}, {"cards": "t"}).check(task)
    with pytest.raises(ValueError, match="does not have"):
        Router("desk", "intent", {"no_such_intent": "cards"}, {"cards": "t"}).check(task)


@pytest.fixture
def task():
    from schemas.task import default_task_path

    return TaskSpec.from_file(default_task_path())


def deployment(**route) -> dict:
    return {"tasks": [{"name": "desk", "task_path": "d.json", "tickets_topic": "triage.tickets",
                       "route": route or {"field": "desk", "to": {"cards": "cards"}}},
                      {"name": "cards", "task_path": "c.json", "settings": {"eval_share": 0.2}}]}


def test_each_task_gets_its_own_topics_groups_registry_and_log(tmp_path):
    base = Settings(_env_file=None, registry_dir=tmp_path / "reg", data_dir=tmp_path / "data", eval_share=0.05)
    d = Deployment.model_validate(deployment())
    desk, cards = d.task_settings(base, "desk"), d.task_settings(base, "cards")
    assert desk.tickets_topic == "triage.tickets" and cards.tickets_topic == "triage.cards.tickets"
    assert (desk.results_topic, cards.results_topic) == ("triage.desk.results", "triage.cards.results")
    assert len({desk.consumer_group, cards.consumer_group, desk.teacher_consumer_group,
                cards.teacher_consumer_group}) == 4
    assert (desk.registry_dir, cards.registry_dir) == (tmp_path / "reg" / "desk", tmp_path / "reg" / "cards")
    assert cards.training_log_path == tmp_path / "data" / "cards" / "training_log.sqlite3"
    assert (desk.eval_share, cards.eval_share) == (0.05, 0.2)
    old = Deployment.model_validate({"tasks": [{"name": "a", "task_path": "a.json", "settings": {"audit_rate": 0.3}}]})
    assert old.task_settings(base, "a").eval_share == 0.3  # the setting's old name still works
    assert d.router(base, "desk").topics == {"cards": "triage.cards.tickets"} and d.router(base, "cards") is None


@pytest.mark.parametrize("broken, why", [
    ({"tasks": [{"name": "a", "task_path": "x"}, {"name": "a", "task_path": "y"}]}, "unique"),
    (deployment(field="desk", to={"cards": "nowhere"}), "names no other task"),
    (deployment(field="desk", to={"cards": "desk"}), "names no other task"),
    ({"tasks": [{"name": "a", "task_path": "x", "settings": {"max_loras": 4}}]}, "the process's"),
    ({"tasks": [{"name": "a", "task_path": "x", "settings": {"no_such": 1}}]}, "unknown settings"),
    ({"tasks": [{"name": "Bad Name", "task_path": "x"}]}, "pattern"),
])
def test_a_broken_deployment_file_is_refused_with_the_reason(broken, why):
    with pytest.raises(ValidationError, match=why):
        Deployment.model_validate(broken)


async def test_a_confident_router_answer_is_published_with_its_forward():
    pipeline = TicketPipeline(classifier=FakeClassifier({"sure": 0.9, "unsure": 0.2}), router=ROUTER,
                              escalation=EscalationConfig(threshold_override=0.5))
    sure = json.dumps({"id": "t0", "text": "sure"}).encode()
    unsure = json.dumps({"id": "t1", "text": "unsure"}).encode()
    outcomes = await pipeline.process([record(0, sure), record(1, unsure)])
    assert [o.kind for o in outcomes] == ["result", "forward", "escalation"]
    published = Classification.model_validate_json(outcomes[0].payload)
    assert published.forwarded_to == "cards" and outcomes[1].topic == "triage.cards.tickets"
    assert json.loads(outcomes[1].payload)["route_chain"][0]["label"] == "card_arrival"
    # the escalated one is forwarded later, by the teacher worker: it carries the ticket
    assert Escalation.model_validate_json(outcomes[2].payload).ticket == {"id": "t1", "text": "unsure"}


class Teacher:
    model = "fake-teacher"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s

    async def label(self, text, fields=None):
        import asyncio

        await asyncio.sleep(self.delay_s)
        return TeacherAnswer({"intent": "lost_or_stolen_card"}, self.model, "ph", 10, 2, 0.001, self.delay_s)


def escalation() -> Escalation:
    student = Classification(ticket_id="T-1", fields={"intent": "card_arrival"}, confidence=0.3,
                             route="unverified", model="student",
                             student={"intent": FieldPrediction(label="card_arrival", confidence=0.3)},
                             latency_ms=5.0, engine_ms=3.0)
    return Escalation(kind="escalation", ticket_id="T-1", text="where is my card", student_result=student,
                      ticket_time_ms=int(time.time() * 1000), ticket={"id": "T-1", "text": "where is my card"})


async def resolve(teacher, deadline_s):
    published, forwarded = [], []

    async def publish(r):
        published.append(r)

    async def send_forward(f):
        forwarded.append(f)

    resolver = EscalationResolver(teacher=teacher, training_log=None, publish=publish, deadline_s=deadline_s,
                                  slots=TeacherSlots(4, 1), router=ROUTER, send_forward=send_forward)
    await resolver.resolve(escalation())
    return published, forwarded


async def test_an_escalated_router_ticket_is_forwarded_once_by_its_first_answer():
    published, forwarded = await resolve(Teacher(), deadline_s=5.0)
    assert [p.route.value for p in published] == ["teacher"] and published[0].forwarded_to == "fraud"
    assert [f.task for f in forwarded] == ["fraud"]  # the teacher's label decides
    # past the deadline: the student's answer goes out (and forwards); the correction does not
    published, forwarded = await resolve(Teacher(delay_s=0.2), deadline_s=0.01)
    assert [p.route.value for p in published] == ["unverified", "teacher"]
    assert [f.task for f in forwarded] == ["cards"]
    assert [p.forwarded_to for p in published] == ["cards", "cards"]  # the correction says where it went
    # no teacher at all: unverified at once, forwarded once
    published, forwarded = await resolve(None, deadline_s=5.0)
    assert [p.route.value for p in published] == ["unverified"] and len(forwarded) == 1


async def test_a_redelivered_escalation_never_forwards_a_second_time(tmp_path):
    """The deadline forwards on the student's label (cards); the teacher's answer (fraud) is
    logged, then the worker dies before the correction is acknowledged. The re-delivered
    escalation finds the teacher's answer in the log: it publishes it naming the first forward
    and sends nothing, to neither task."""
    from services.teacher.training_log import TrainingLog

    teacher, published, forwarded, killed = Teacher(delay_s=0.2), [], [], []

    async def dies_on_the_correction(r):
        if r.route.value == "teacher" and not killed:
            killed.append(r)
            raise ConnectionError("worker killed before the correction was acknowledged")
        published.append(r)

    async def send_forward(f):
        forwarded.append(f)

    def worker(log):
        return EscalationResolver(teacher=teacher, training_log=log, publish=dies_on_the_correction,
                                  deadline_s=0.01, slots=TeacherSlots(4, 1), router=ROUTER,
                                  send_forward=send_forward)

    ticket = escalation()
    with TrainingLog(tmp_path / "log.sqlite3") as log:
        with pytest.raises(ConnectionError):
            await worker(log).resolve(ticket)
    assert [p.route.value for p in published] == ["unverified"] and [f.task for f in forwarded] == ["cards"]
    with TrainingLog(tmp_path / "log.sqlite3") as log:  # the restarted worker, same durable log
        redelivered = worker(log)
        await redelivered.resolve(ticket)
    assert redelivered.summary()["reused"] == 1  # answered from the log, the teacher not asked again
    assert [p.route.value for p in published] == ["unverified", "teacher"]
    assert published[1].fields == {"intent": "lost_or_stolen_card"}  # the teacher's label would say fraud
    assert [p.forwarded_to for p in published] == ["cards", "cards"]
    assert [f.task for f in forwarded] == ["cards"]  # forwarded once


async def test_a_forward_lost_in_a_crash_is_resent_where_the_first_answer_sent_it(tmp_path):
    """Recorded, then the worker died before the broker acknowledged the forward: the
    re-delivery sends that same forward (the first answer's hop), even if by then the teacher
    answered otherwise."""
    from services.teacher.training_log import TrainingLog

    published, forwarded, attempts = [], [], []

    async def publish(r):
        published.append(r)

    async def send_forward(f):
        attempts.append(f)
        if len(attempts) == 1:
            raise ConnectionError("killed before the forward was acknowledged")
        forwarded.append(f)

    with TrainingLog(tmp_path / "log.sqlite3") as log:
        def worker(teacher, deadline_s):
            return EscalationResolver(teacher=teacher, training_log=log, publish=publish, deadline_s=deadline_s,
                                      slots=TeacherSlots(4, 1), router=ROUTER, send_forward=send_forward)

        with pytest.raises(ConnectionError):
            await worker(Teacher(delay_s=0.2), 0.01).resolve(escalation())
        await worker(Teacher(), 5.0).resolve(escalation())  # now the teacher answers at once
    assert [p.route.value for p in published] == ["unverified", "teacher"]
    assert [p.forwarded_to for p in published] == ["cards", "cards"]
    assert [f.task for f in forwarded] == ["cards"] and forwarded[0].payload == attempts[0].payload
    assert json.loads(forwarded[0].payload)["route_chain"][-1]["route"] == "unverified"


def test_cli_commands_take_a_task_of_the_deployment(tmp_path, monkeypatch, capsys):
    from services.cli import main

    path = tmp_path / "tasks.json"
    path.write_text(json.dumps(deployment()))
    monkeypatch.setenv("TRIAGE_REGISTRY_DIR", str(tmp_path / "reg"))
    monkeypatch.setenv("TRIAGE_DEPLOYMENT_PATH", str(path))
    assert main(["status", "--task", "cards"]) == 0
    assert json.loads(capsys.readouterr().out)["registry"] == str(tmp_path / "reg" / "cards")
    with pytest.raises(SystemExit, match="no task 'nope'"):
        main(["status", "--task", "nope"])
    monkeypatch.delenv("TRIAGE_DEPLOYMENT_PATH")
    with pytest.raises(SystemExit, match="no deployment file"):
        main(["rollback", "--task", "cards"])
    assert main(["distill", "--task", "cards"]) == 2  # refused before anything is trained
    assert "no deployment file" in capsys.readouterr().err


def test_an_input_the_target_does_not_declare_travels_in_metadata():
    router = Router(task="desk", field="intent", targets={"card_arrival": "cards"},
                    topics={"cards": "triage.cards.tickets"}, inputs={"cards": frozenset({"product"})})
    ticket = {"id": "T-1", "text": "where is my card", "product": "app", "reporter": "ana",
              "metadata": {"crm": 7}}
    sent = json.loads(router.plan(ticket, result("card_arrival")).payload)
    assert sent["product"] == "app" and "reporter" not in sent  # the target would refuse it
    assert sent["metadata"] == {"crm": 7, "inputs_not_declared_here": {"reporter": "ana"}}
    from services.stream.validation import parse_ticket

    parsed = parse_ticket(json.dumps(sent).encode(), max_bytes=10_000, max_text_chars=1000, inputs=["product"])
    assert isinstance(parsed, Ticket) and parsed.route_chain[0].task == "desk"
