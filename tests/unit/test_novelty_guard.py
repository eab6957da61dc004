"""The novelty guard (services/stream/novelty_guard.py): a student label the teacher keeps
replacing with a never-trained one escalates, only that label, and lifts on its own."""

import asyncio
import dataclasses

import pytest

from services.stream.drift import DriftTracker
from services.stream.novelty_guard import NoveltyGuard
from tests.unit.test_drift import A, B, baseline  # A trained on card_arrival and lost_card only


def test_two_novel_answers_guard_that_label_only():
    changes = []
    g = NoveltyGuard(history=10, min_novel=2, on_change=lambda *c: changes.append(c))
    g.observe(A, {"intent": "lost_card"}, {"intent": True})
    assert g.guarded(A, {"intent": "lost_card"}) == []  # one novel answer is not yet evidence
    g.observe(A, {"intent": "card_arrival"}, {"intent": True})  # another label's: counted apart
    assert g.guarded(A, {"intent": "lost_card"}) == []
    g.observe(A, {"intent": "lost_card"}, {"intent": True})
    assert g.guarded(A, {"intent": "lost_card"}) == ["intent"]
    assert g.guarded(A, {"intent": "card_arrival"}) == []
    assert g.active(A) == ["lost_card"]
    assert changes == [(A, "intent", "lost_card", True, 2, 2)]


def test_the_guard_lifts_once_the_labels_tickets_stop_being_novel():
    g = NoveltyGuard(history=4, min_novel=2)
    for fresh in (True, True):
        g.observe(A, {"intent": "lost_card"}, {"intent": fresh})
    assert g.guarded(A, {"intent": "lost_card"})
    for _ in range(2):  # the two novel answers are still among the last four
        g.observe(A, {"intent": "lost_card"}, {"intent": False})
    assert g.guarded(A, {"intent": "lost_card"})
    g.observe(A, {"intent": "lost_card"}, {"intent": False})  # one of them left the history
    assert g.guarded(A, {"intent": "lost_card"}) == []


def test_a_new_adapter_starts_unguarded_and_late_answers_do_not_reset_it():
    g = NoveltyGuard(history=10, min_novel=2)
    for adapter in (A, A, B, B):
        g.observe(adapter, {"intent": "lost_card"}, {"intent": True})
    g.observe(A, {"intent": "lost_card"}, {"intent": False})  # a late answer for the old adapter
    assert g.guarded(B, {"intent": "lost_card"}) == ["intent"]
    assert g.guarded(A, {"intent": "lost_card"}) == ["intent"]
    g.observe(None, {"intent": "lost_card"}, {"intent": True})  # no adapter: nothing to guard
    assert g.guarded(None, {"intent": "lost_card"}) == []


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        NoveltyGuard(history=5, min_novel=6)


def test_the_drift_tracker_feeds_it_with_the_adapters_training_labels():
    g = NoveltyGuard(history=10, min_novel=2)
    t = DriftTracker(100, baseline_of=lambda a: baseline() if a == A else None, guard=g)
    for i, teacher in enumerate(("topping_up_by_card", "lost_card", "exchange_rate")):
        t.decided(f"t{i}", A, {"intent": "lost_card"}, escalated=True)
        t.taught(f"t{i}", A, {"intent": teacher}, {"intent": "lost_card"})
    assert g.guarded(A, {"intent": "lost_card"}) == ["intent"]  # two labels A never trained on
    t.decided("t9", B, {"intent": "lost_card"}, escalated=True)  # B: no training record
    t.taught("t9", B, {"intent": "exchange_rate"}, {"intent": "lost_card"})
    assert g.guarded(B, {"intent": "lost_card"}) == []  # "not predicted yet" is no evidence


def test_the_pipeline_escalates_a_guarded_label_whatever_its_confidence():
    from services.stream.pipeline import EscalationConfig, TicketPipeline
    from tests.unit.test_pipeline import FakeClassifier, record, ticket

    class Adapted(FakeClassifier):
        async def classify(self, texts, *, adapter=None):
            return [dataclasses.replace(p, adapter_id=A) for p in await super().classify(texts, adapter=adapter)]

    g = NoveltyGuard(history=10, min_novel=1)
    t = DriftTracker(100, baseline_of=lambda a: baseline() if a == A else None, guard=g)
    pipeline = TicketPipeline(classifier=Adapted({"sure": 0.99}), drift=t,
                              escalation=EscalationConfig(threshold_override=0.5))
    before = asyncio.run(pipeline.process([record(0, ticket(0, "sure"))]))
    assert [o.kind for o in before] == ["result"]  # confident: answered alone
    g.observe(A, {"intent": "card_arrival"}, {"intent": True})
    after = asyncio.run(pipeline.process([record(1, ticket(1, "sure"))]))
    assert [o.kind for o in after] == ["escalation"]
