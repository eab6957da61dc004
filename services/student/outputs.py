"""Reading vLLM outputs into predictions: pure functions.

No vLLM import (outputs are read duck-typed); `services.student.engine` uses and re-exports them.
"""

from __future__ import annotations

import json
import math
from typing import Any

from schemas.answer import keep_valid_entities
from schemas.classification import EntityPrediction, FieldPrediction, LabelScore
from services.student.prompting import LabelCodes

# What a prediction means for a given engine, adapter and prompt: bump it with any change to how
# answers or confidences are decoded or computed (here, in engine.py, in prompting's encoding or
# cut), so the gate's cached predictions of the live adapter are scored again
# (trainer/predictions.py) instead of being compared with fresh ones made under other rules.
# 1: entity spans decoded free and checked after (112eda1); a dropped span zeroes its field.
PREDICTION_SEMANTICS = 1


def distribution_from_logprobs(codes: LabelCodes, logprobs: dict[int, Any]) -> list[float]:
    """Renormalise the code tokens' log-probabilities into a distribution over labels.

    Raw logprobs are over the whole vocabulary; restricted to the field's codes and
    renormalised they equal what the sampler saw after the allowed-token mask.
    """
    values = []
    for token_id in codes.token_ids:
        entry = logprobs.get(token_id)
        lp = getattr(entry, "logprob", entry)
        values.append(-math.inf if lp is None or math.isnan(lp) else float(lp))
    top = max(values)
    if top == -math.inf:
        return [1.0 / len(values)] * len(values)
    weights = [math.exp(v - top) for v in values]
    total = sum(weights)
    return [w / total for w in weights]


def field_prediction(codes: LabelCodes, probs: list[float], top_k: int = 3) -> FieldPrediction:
    order = sorted(range(len(probs)), key=probs.__getitem__, reverse=True)
    best = order[0]
    return FieldPrediction(
        label=codes.labels[best],
        confidence=min(1.0, max(0.0, probs[best])),
        alternatives=[
            LabelScore(label=codes.labels[i], probability=min(1.0, probs[i])) for i in order[1 : top_k + 1]
        ],
    )


def parse_entity_output(spec: Any, completion: Any, text: str) -> EntityPrediction:
    """One generated completion -> EntityPrediction (see VllmClassifier._entities)."""
    total = 0.0
    for token_id, position in zip(completion.token_ids, completion.logprobs or []):
        entry = position.get(token_id) if position else None
        lp = getattr(entry, "logprob", entry)
        total += float(lp) if lp is not None and not math.isnan(lp) else -math.inf
    try:
        items = json.loads(completion.text)
        if not isinstance(items, list):
            raise ValueError("not a list")
    except ValueError:
        return EntityPrediction(entities=[], confidence=0.0, dropped={"malformed_json": 1})
    kept, dropped = keep_valid_entities(spec, items, text, fold_case=True)
    # A dropped span means the list published is not the one the student meant: it has no
    # confidence, so the field escalates (the calibrated threshold never certifies 0).
    confidence = min(1.0, max(0.0, math.exp(total))) if completion.logprobs and not dropped else 0.0
    return EntityPrediction(entities=kept, confidence=confidence, dropped=dict(dropped))
