"""Scoring student predictions against held-out answers, per field and per ticket.

Categorical fields: accuracy and macro-F1. The entities field: exact-match accuracy of the whole
list (what its confidence is calibrated for: the student publishes the list or escalates it)
and micro precision / recall / F1 over (type, span) pairs. Every field keeps its per-ticket
confidence and correctness, so calibration and thresholds are per field
(`trainer.evaluate.report`). A ticket the engine rejected counts as wrong with confidence 0 on
every field: the service would dead-letter it.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from schemas.answer import entity_set
from schemas.task import EntityFieldSpec, TaskSpec
from trainer import calibration as cal


def field_scores(prediction: Any) -> dict[str, Any] | None:
    """field -> object with .confidence (and .label or .entities), or None for a rejection."""
    if not hasattr(prediction, "fields") or prediction.fields is None:
        return None
    scores = dict(prediction.fields)
    entities = getattr(prediction, "entities", None)
    name = getattr(prediction, "entity_field", None)
    if entities is not None and name:
        scores[name] = entities
    return scores


def entity_prf(truth: Sequence[Any], predicted: Sequence[Any]) -> dict[str, float]:
    """Micro precision / recall / F1 over (type, span) pairs; exact type and span."""
    tp = fp = fn = 0
    for gold, pred in zip(truth, predicted):
        g, p = entity_set(gold), entity_set(pred)
        tp, fp, fn = tp + len(g & p), fp + len(p - g), fn + len(g - p)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "gold_entities": tp + fn,
            "predicted_entities": tp + fp}


def score(task: TaskSpec, rows: Sequence[Any], predictions: Sequence[Any],
          maps: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Per field: confidence, correct, metrics; per ticket: confidence (min over fields, as the
    service's single-threshold path escalates) and correct (every labelled field right).
    `maps`: field -> confidence map (services/student/confidence_map.py), applied to the
    field's confidences as the service does for an adapter that carries them."""
    maps = maps or {}
    per_row = [field_scores(p) for p in predictions]
    fields: dict[str, dict[str, Any]] = {}
    for spec in task.fields:
        idx = [i for i, r in enumerate(rows) if spec.name in r.labels]
        truth = [rows[i].labels[spec.name] for i in idx]
        got = [per_row[i][spec.name] if per_row[i] and spec.name in per_row[i] else None for i in idx]
        remap = maps.get(spec.name) or float
        conf = [remap(g.confidence) if g is not None else 0.0 for g in got]
        if isinstance(spec, EntityFieldSpec):
            pred = [list(g.entities) if g is not None else [] for g in got]
            ok = [g is not None and entity_set(t) == entity_set(p) for t, p, g in zip(truth, pred, got)]
            metrics = entity_prf(truth, pred)
        else:
            pred = [g.label if g is not None else "<rejected>" for g in got]
            ok = [t == p for t, p in zip(truth, pred)]
            metrics = {"macro_f1": cal.macro_f1(truth, pred)}
        fields[spec.name] = {"n": len(idx), "rows": idx, "confidence": conf, "correct": ok,
                             "accuracy": sum(ok) / len(ok) if ok else 0.0, **metrics}
    confidence, correct = [], []
    for i in range(len(rows)):
        mine = [(f["confidence"][k], f["correct"][k]) for f in fields.values()
                for k in [_position(f["rows"], i)] if k is not None]
        confidence.append(min((c for c, _ in mine), default=0.0) if per_row[i] else 0.0)
        correct.append(per_row[i] is not None and all(ok for _, ok in mine))
    return {"confidence": confidence, "correct": correct, "fields": fields,
            "rejected": sum(p is None for p in per_row)}


def _position(sorted_rows: list[int], i: int) -> int | None:
    from bisect import bisect_left

    k = bisect_left(sorted_rows, i)
    return k if k < len(sorted_rows) and sorted_rows[k] == i else None


def accepted_tickets(fields: dict[str, dict[str, Any]], thresholds: dict[str, float], n: int) -> list[bool]:
    """Tickets whose every field is at or above its threshold: answered by the student alone."""
    accepted = [True] * n
    for name, f in fields.items():
        for row, conf in zip(f["rows"], f["confidence"]):
            if conf < thresholds[name]:
                accepted[row] = False
    return accepted
