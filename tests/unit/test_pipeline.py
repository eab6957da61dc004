"""TicketPipeline with in-memory fakes: routing decisions, outcomes in record order."""

import json
from collections import Counter

import pytest

from schemas.classification import Classification, FieldPrediction
from schemas.escalation import Escalation
from services.student.engine import StudentPrediction
from schemas.training import eval_sample_source
from services.stream.pipeline import EscalationConfig, InboundRecord, TicketPipeline


class FakeClassifier:
    model_name = "fake-student"
    live_adapter = None

    def __init__(self, confidences):
        self.confidences = confidences  # text -> confidence

    async def classify(self, texts, *, adapter=None):
        return [
            StudentPrediction(
                fields={"intent": FieldPrediction(label="card_arrival", confidence=self.confidences[t])},
                distribution={"intent": [self.confidences[t]]},
                adapter_id=None,
            )
            for t in texts
        ]

    async def use_adapter(self, adapter):
        self.live_adapter = adapter


def record(i, value, timestamp_ms=None):
    return InboundRecord(value=value, key=str(i).encode(), topic="t", partition=0, offset=i, received_at=0.0,
                         timestamp_ms=timestamp_ms)


def ticket(i, text):
    return json.dumps({"id": f"t{i}", "text": text}).encode()


async def test_routes_by_threshold_and_keeps_record_order():
    pipeline = TicketPipeline(classifier=FakeClassifier({"sure": 0.9, "unsure": 0.2}),
                              escalation=EscalationConfig(threshold_override=0.5))
    records = [record(0, ticket(0, "sure")), record(1, b"not json"), record(2, ticket(2, "unsure"), 1_700_000)]
    outcomes = await pipeline.process(records)
    assert [o.kind for o in outcomes] == ["result", "dead_letter", "escalation"]
    assert [o.record.offset for o in outcomes] == [0, 1, 2]
    confident = Classification.model_validate_json(outcomes[0].payload)
    assert confident.route.value == "student" and confident.fields["intent"] == "card_arrival"
    # The uncertain ticket goes to the escalations topic, keyed by ticket id, with everything
    # the teacher worker needs: the text, the student's answer (as published if the teacher is
    # late) and when the ticket arrived (the deadline counts from there).
    escalation = Escalation.model_validate_json(outcomes[2].payload)
    assert outcomes[2].key == b"t2" and escalation.kind == "escalation" and escalation.text == "unsure"
    assert escalation.student_result.route.value == "unverified"
    assert escalation.student_result.student["intent"].label == "card_arrival"
    assert escalation.ticket_time_ms == 1_700_000
    assert pipeline.summary()["escalations"] == 1 and pipeline.summary()["results"] == {"student": 1}


async def test_uncalibrated_student_escalates_everything():
    pipeline = TicketPipeline(classifier=FakeClassifier({"x": 0.99}))
    [outcome] = await pipeline.process([record(0, ticket(0, "x"))])
    assert outcome.kind == "escalation"


async def test_the_evaluation_sample_is_a_share_of_every_ticket_whatever_its_confidence():
    """Confident sampled tickets publish their result and go to the teacher (an audit); unsure
    sampled tickets escalate marked as sample, so their label is held out, not trained on."""
    texts = {f"a{i}": (0.99 if i % 2 else 0.1) for i in range(400)}
    pipeline = TicketPipeline(classifier=FakeClassifier(texts),
                              escalation=EscalationConfig(threshold_override=0.5, eval_share=0.3))
    outcomes = await pipeline.process([record(i, ticket(i, t)) for i, t in enumerate(texts)])
    sampled = {f"t{i}" for i, t in enumerate(texts) if eval_sample_source(t, 0.3, 0.3, cold=False)}
    confident = {f"t{i}" for i in range(400) if i % 2}
    assert 0.2 < len(sampled) / 400 < 0.4
    results = [o for o in outcomes if o.kind == "result"]
    requests = [Escalation.model_validate_json(o.payload) for o in outcomes if o.kind == "escalation"]
    assert len(results) == 200  # every confident ticket is answered at once, sampled or not
    audits = {r.ticket_id for r in requests if r.kind == "audit"}
    assert audits == sampled & confident and all(r.sample == "sample" for r in requests if r.kind == "audit")
    escalated = [r for r in requests if r.kind == "escalation"]
    assert {r.ticket_id for r in escalated} == set(f"t{i}" for i in range(400)) - confident
    assert {r.ticket_id for r in escalated if r.sample == "sample"} == sampled - confident
    assert all(r.sample is None for r in escalated if r.ticket_id not in sampled)
    assert all(r.student_result.route.value == "student" and r.student_result.audited
               for r in requests if r.kind == "audit")
    published = [Classification.model_validate_json(o.payload) for o in results]
    assert {r.ticket_id for r in published if r.audited} == audits
    assert pipeline.summary()["sampled"] == len(sampled)


async def test_cold_start_samples_the_larger_share_and_escalates_even_certain_answers():
    """No calibrated adapter: every ticket escalates, a confidence of exactly 1.0 included, and
    the sample takes the cold share (nested: every steady-state member stays in it)."""
    texts = {f"c{i}": 1.0 for i in range(400)}
    pipeline = TicketPipeline(classifier=FakeClassifier(texts),
                              escalation=EscalationConfig(eval_share=0.05, eval_share_cold=0.3))
    outcomes = await pipeline.process([record(i, ticket(i, t)) for i, t in enumerate(texts)])
    requests = [Escalation.model_validate_json(o.payload) for o in outcomes]
    assert len(requests) == 400 and {r.kind for r in requests} == {"escalation"}
    by_source = Counter(r.sample for r in requests)
    steady = sum(eval_sample_source(t, 0.05, 0.05, cold=False) is not None for t in texts)
    assert by_source["sample"] == steady and 0.2 < (by_source["sample"] + by_source["sample-cold"]) / 400 < 0.4


# ---- issue 9: no input stops the stream -------------------------------------------------------
from schemas.dead_letter import DeadLetter  # noqa: E402
from services.student.engine import LIVE, EngineRejection  # noqa: E402


class ScriptedClassifier:
    """Per-text outcomes: a float confidence, 'reject', or 'truncated:<confidence>'."""

    model_name = "fake-student"

    def __init__(self, script, live=None, swap_to=None):
        self.script, self.live_adapter, self.swap_to = script, live, swap_to
        self.adapters_used = []

    async def classify(self, texts, *, adapter=LIVE):
        self.adapters_used.append(adapter)
        if self.swap_to is not None:  # a hot-swap lands while the engine runs
            self.live_adapter = self.swap_to
        out = []
        for t in texts:
            step = self.script[t]
            if step == "reject":
                out.append(EngineRejection("engine_rejected", "VLLMValidationError: too long"))
                continue
            truncated = isinstance(step, str) and step.startswith("truncated:")
            conf = float(step.split(":")[1]) if truncated else step
            out.append(StudentPrediction(
                fields={"intent": FieldPrediction(label="card_arrival", confidence=conf)},
                distribution={"intent": [conf]}, adapter_id=getattr(adapter, "adapter_id", None),
                truncated=truncated))
        return out


class Ref:
    def __init__(self, adapter_id, threshold):
        self.adapter_id, self.threshold = adapter_id, threshold


async def test_an_engine_rejection_is_that_tickets_dead_letter_not_the_batchs():
    pipeline = TicketPipeline(classifier=ScriptedClassifier({"a": 0.9, "bad": "reject", "c": 0.9}),
                              escalation=EscalationConfig(threshold_override=0.5))
    outcomes = await pipeline.process([record(i, ticket(i, t)) for i, t in enumerate(["a", "bad", "c"])])
    assert [o.kind for o in outcomes] == ["result", "dead_letter", "result"]
    dead = DeadLetter.model_validate_json(outcomes[1].payload)
    assert dead.reason == "engine_rejected" and dead.ticket_id == "t1" and dead.offset == 1
    assert dead.original() == ticket(1, "bad") and not dead.original_truncated
    assert pipeline.stats.dead_letter == {"engine_rejected": 1}


async def test_truncated_predictions_are_flagged_in_the_result():
    pipeline = TicketPipeline(classifier=ScriptedClassifier({"long": "truncated:0.9"}),
                              escalation=EscalationConfig(threshold_override=0.5))
    [outcome] = await pipeline.process([record(0, ticket(0, "long"))])
    result = Classification.model_validate_json(outcome.payload)
    assert result.truncated and result.route.value == "student"
    assert pipeline.summary()["truncated"] == 1


async def test_threshold_is_the_pinned_adapters_not_the_one_swapped_in_meanwhile():
    """Base model (uncalibrated: threshold 1.0) classifies; a calibrated adapter (0.2) is
    swapped in while the engine runs. The batch must be judged by the base model's rule."""
    clf = ScriptedClassifier({"x": 0.6}, live=None, swap_to=Ref("a-0000000000000001", 0.2))
    pipeline = TicketPipeline(classifier=clf)
    [outcome] = await pipeline.process([record(0, ticket(0, "x"))])
    assert clf.adapters_used == [None]  # pinned explicitly, not LIVE
    assert outcome.kind == "escalation"  # judged by the base model's rule, not "student"
    assert Escalation.model_validate_json(outcome.payload).student_result.adapter_id is None


def test_dead_letter_records_are_bounded_but_keep_size_and_hash():
    import hashlib

    pipeline = TicketPipeline(classifier=ScriptedClassifier({}), max_message_bytes=1000,
                              dead_letter_copy_bytes=100)
    big = b"x" * 900_000
    [outcome] = asyncio_run(pipeline.process([record(0, big)]))
    dead = DeadLetter.model_validate_json(outcome.payload)
    assert dead.reason == "too_large" and dead.original_truncated
    assert dead.original_size == 900_000 and dead.original_sha256 == hashlib.sha256(big).hexdigest()
    assert dead.original() == big[:100]
    assert len(outcome.payload) < 2_000  # far below the producer's 1 MiB request limit


def asyncio_run(coro):
    import asyncio

    return asyncio.new_event_loop().run_until_complete(coro)


async def test_an_adapter_that_certified_nothing_is_a_cold_start_too():
    """Its stored threshold trusts nothing (inf), so every ticket escalates anyway and the
    sample takes the cold share; a calibrated one samples the steady share."""
    import math

    class Ref:
        adapter_id = "a-0000000000000001"

        def __init__(self, threshold):
            self.threshold = threshold

    clf = FakeClassifier({})
    pipeline = TicketPipeline(classifier=clf, escalation=EscalationConfig(eval_share=0.05, eval_share_cold=0.3))
    assert pipeline.cold()  # no adapter
    for threshold, cold in ((math.inf, True), ({"intent": math.inf}, True), (0.9, False),
                            ({"intent": 0.9}, False), (None, True)):
        clf.live_adapter = Ref(threshold)
        assert pipeline.cold() is cold, threshold
    overridden = TicketPipeline(classifier=clf, escalation=EscalationConfig(threshold_override=1.0))
    assert not overridden.cold()


async def test_an_adapter_with_a_confidence_map_is_judged_and_published_through_it():
    """Its threshold was certified on mapped scores: 0.95 raw maps under 0.9 here (overconfident
    student), so it escalates; 0.99 maps above and is published with the mapped confidence."""
    from services.student.confidence_map import ConfidenceMap

    m = ConfidenceMap(0.5, 0.0)
    live = Ref("a-0000000000000002", 0.9)
    live.meta = {"threshold": {"value": 0.9, "confidence_map": {"intent": m.to_json()}}}
    assert m(0.95) < 0.9 < m(0.999)
    pipeline = TicketPipeline(classifier=ScriptedClassifier({"hi": 0.999, "mid": 0.95}, live=live))
    sure, unsure = await pipeline.process([record(0, ticket(0, "hi")), record(1, ticket(1, "mid"))])
    assert sure.kind == "result" and unsure.kind == "escalation"
    published = Classification.model_validate_json(sure.payload)
    assert published.confidence == pytest.approx(m(0.999)) and sure.confidence == pytest.approx(m(0.999))
    assert published.student["intent"].confidence == pytest.approx(m(0.999))
    escalated = Escalation.model_validate_json(unsure.payload).student_result
    assert escalated.confidence == pytest.approx(m(0.95))
