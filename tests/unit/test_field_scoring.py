"""Per-field evaluation: entity precision/recall/F1, a threshold per field, ticket coverage."""

import random

import pytest

from schemas.classification import EntityPrediction, FieldPrediction
from schemas.task import Entity
from tests.unit.test_ticket_schema import TASK
from trainer.dataset import Row
from trainer.evaluate import HeldOut, report, served_maps
from trainer.scoring import entity_prf, score


class Pred:
    def __init__(self, category, c_conf, priority, p_conf, entities, e_conf):
        self.fields = {"category": FieldPrediction(label=category, confidence=c_conf),
                       "priority": FieldPrediction(label=priority, confidence=p_conf)}
        self.entities = EntityPrediction(entities=entities, confidence=e_conf)
        self.entity_field = "entities"


def test_entity_prf_is_exact_type_and_span():
    truth = [[{"type": "amount", "text": "200"}, {"type": "country", "text": "Spain"}], [], [{"type": "amount", "text": "5"}]]
    pred = [[Entity(type="amount", text="200"), Entity(type="amount", text="Spain")], [], []]
    got = entity_prf(truth, pred)
    assert got["precision"] == pytest.approx(1 / 2) and got["recall"] == pytest.approx(1 / 3)
    assert got["f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert entity_prf([[]], [[]])["f1"] == 1.0  # nothing to find, nothing found


def test_partial_rows_score_only_their_fields_and_rejections_are_wrong():
    rows = [Row("a 200", {"category": "topic_1", "priority": "low", "entities": [{"type": "amount", "text": "200"}]}),
            Row("b", {"priority": "high"})]
    preds = [Pred("topic_1", 0.9, "low", 0.8, [Entity(type="amount", text="200")], 0.7), object()]
    s = score(TASK, rows, preds)
    assert s["fields"]["category"]["n"] == 1 and s["fields"]["priority"]["n"] == 2
    assert s["fields"]["priority"]["correct"] == [True, False]
    assert s["correct"] == [True, False] and s["confidence"] == [0.7, 0.0] and s["rejected"] == 1


def test_each_field_gets_its_own_threshold_and_the_gate_reads_ticket_coverage():
    rng = random.Random(0)
    rows, preds = [], []
    for i in range(1500):
        # category is right whenever confident; priority is noisy below 0.7; entities always right
        c_conf, p_conf = rng.random(), rng.random()
        priority_ok = p_conf >= 0.7 or rng.random() < 0.5
        rows.append(Row(f"t{i} 5", {"category": "topic_1", "priority": "low",
                                     "entities": [{"type": "amount", "text": "5"}]}))
        preds.append(Pred("topic_1" if c_conf > 0.2 else "topic_2", c_conf,
                          "low" if priority_ok else "high", p_conf, [Entity(type="amount", text="5")], 0.99))
    data = HeldOut("heldout", "-", rows)
    rep = report(TASK, data, preds, adapter_id="a", epsilon=0.03, delta=0.05)
    per_field = rep["threshold"]["fields"]
    assert set(per_field) == {"category", "priority", "entities"}
    # thresholds are on the confidences as published: through the maps fitted on this set
    maps = served_maps(rep)
    assert set(maps) == {"category", "priority"}  # entities: right every time, nothing to fit

    def published(p, name):
        return maps[name](p.fields[name].confidence)

    def lowest_accepted(name):  # the threshold in the engine's own scores
        return min(p.fields[name].confidence for p in preds if published(p, name) >= per_field[name])

    assert 0.15 <= lowest_accepted("category") < 0.35 and 0.65 <= lowest_accepted("priority") < 0.8
    assert rep["threshold"]["per_field_delta"] == pytest.approx(0.05 / 3)
    for name in per_field:  # each field's bound holds on what it accepts
        assert rep["fields"][name]["threshold"]["upper_bound"] <= 0.03
    both = sum(published(c, "category") >= per_field["category"] and
               published(c, "priority") >= per_field["priority"] for c in preds) / len(preds)
    assert rep["coverage_at_epsilon"] == pytest.approx(both)
    assert rep["entity_f1"] == 1.0 and rep["fields"]["entities"]["accuracy"] == 1.0
    applied = report(TASK, data, preds, adapter_id="a", epsilon=0.03, delta=0.05, threshold=per_field,
                     confidence_map=maps)
    assert applied["coverage_at_epsilon"] == pytest.approx(rep["coverage_at_epsilon"])


def test_training_rows_keep_valid_fields_and_balance_the_entities_field():
    from trainer.dataset import balance_entities, valid_rows

    rows = [Row(f"ticket {i} 5", {"category": "topic_1", "priority": "low",
                                  "entities": [{"type": "amount", "text": "5"}] if i < 50 else []})
            for i in range(500)]
    rows.append(Row("only priority", {"priority": "high"}))  # a partial escalation's answer
    rows.append(Row("bad span", {"priority": "nope", "entities": [{"type": "amount", "text": "9"}]}))
    usable = valid_rows(rows, TASK)
    assert usable[-1].text == "only priority" and usable[-1].labels == {"priority": "high"}
    assert len(usable) == 501  # the row with nothing valid left is dropped
    balanced = balance_entities(usable, TASK, 0.5)
    with_entities = [r for r in balanced if "entities" in r.labels]
    positives = sum(bool(r.labels["entities"]) for r in with_entities)
    assert positives == 50 and 10 <= len(with_entities) - positives <= 45  # ~25 empty ones
    assert len(balanced) == len(usable)  # other fields of every row still train
    assert balance_entities(usable, TASK, 0.5) == balanced  # by content hash: the same every run
