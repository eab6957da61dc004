"""Calibrated confidence: a per-field map from the engine's score to a probability of being right.

The engine's confidence for a field is its top code's renormalised probability (an entity
list's: the product of its tokens' probabilities). A LoRA student trained on a few thousand
rows is a few points off as a probability (ECE 0.025-0.05 on held-out rows, measured), so
"0.9" is not "right 9 times in 10". Platt scaling of the score's log-odds,

    m(c) = sigmoid(a * logit(c) + b),  a > 0,

fitted per field by `triage distill` on the gate's selection part (teacher labels only) and
stored with the threshold (`threshold.confidence_map`), makes the published number one. The
threshold is certified on mapped confidences of the certification part, and the service maps
every answer of that adapter before judging it, so the stored pair means what it says.

m is strictly increasing, so it never changes which tickets a threshold accepts (the same
nested sets, in the same order): accuracy, coverage at epsilon and the gate's decisions are
what they were; only what the number says changes. m(0) = 0 (a dropped entity span, which is
never certified, stays 0) and m(1) = 1. An adapter without a map (calibrated before it, or on
too few rows to fit) publishes the engine's score, as before.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

MIN_FIT_ROWS = 100  # fewer, or no mistake / no right answer among them: no map (identity)
_EDGE = 1e-9  # scores this close to 0 or 1 share one log-odds (saturated tokens)
_MIN_SLOPE = 0.05  # keeps m strictly increasing


@dataclass(frozen=True)
class ConfidenceMap:
    a: float = 1.0
    b: float = 0.0
    rows: int = 0  # how many rows it was fitted on

    def __call__(self, confidence: float) -> float:
        if not confidence > 0.0:  # 0 (and NaN) stays 0: never certified
            return 0.0
        if confidence >= 1.0:
            return 1.0
        return _sigmoid(self.a * _logit(confidence) + self.b)

    def to_json(self) -> dict[str, Any]:
        return {"method": "platt", "a": self.a, "b": self.b, "rows": self.rows}

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> ConfidenceMap:
        return cls(float(value["a"]), float(value["b"]), int(value.get("rows", 0)))


def _logit(c: float) -> float:
    c = min(1.0 - _EDGE, max(_EDGE, c))
    return math.log(c / (1.0 - c))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def fit(confidence: Sequence[float], correct: Sequence[bool], *, prior: float = 1.0) -> ConfidenceMap | None:
    """Platt's (a, b) by Newton's method on the log-loss of `correct` given `confidence`, with a
    weak pull (`prior`, in rows' worth) toward the identity (a=1, b=0) so a small or one-sided
    set moves the map little. None when the rows cannot say anything."""
    pairs = [(c, bool(ok)) for c, ok in zip(confidence, correct) if 0.0 < c < 1.0]
    right = sum(ok for _, ok in pairs)
    if len(pairs) < MIN_FIT_ROWS or right in (0, len(pairs)):
        return None
    xs = [_logit(c) for c, _ in pairs]
    a, b = 1.0, 0.0
    for _ in range(100):
        ga, gb = prior * (a - 1.0), prior * b  # gradient and Hessian of loss + prior/2 * |(a,b)-(1,0)|^2
        haa, hab, hbb = prior, 0.0, prior
        for x, (_, ok) in zip(xs, pairs):
            p = _sigmoid(a * x + b)
            err, w = p - ok, p * (1.0 - p)
            ga, gb = ga + err * x, gb + err
            haa, hab, hbb = haa + w * x * x, hab + w * x, hbb + w
        det = haa * hbb - hab * hab
        if det <= 0:
            break
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        a, b = max(_MIN_SLOPE, a - da), b - db
        if abs(da) < 1e-10 and abs(db) < 1e-10:
            break
    return ConfidenceMap(a, b, len(pairs))


def fit_fields(fields: Mapping[str, Mapping[str, Any]]) -> dict[str, ConfidenceMap]:
    """One map per field of a `trainer.scoring.score` result (fields it cannot fit are left out)."""
    maps = {name: fit(f["confidence"], f["correct"]) for name, f in fields.items() if f.get("n")}
    return {name: m for name, m in maps.items() if m is not None}


def to_json(maps: Mapping[str, ConfidenceMap]) -> dict[str, Any]:
    return {name: m.to_json() for name, m in maps.items()}


def from_json(value: Mapping[str, Any] | None) -> dict[str, ConfidenceMap]:
    return {name: ConfidenceMap.from_json(v) for name, v in (value or {}).items()}


def adapter_maps(adapter: Any) -> dict[str, ConfidenceMap]:
    """The maps stored with an adapter's threshold ({} for none, or no adapter)."""
    stored = ((getattr(adapter, "meta", None) or {}).get("threshold") or {})
    return from_json(stored.get("confidence_map")) if isinstance(stored, dict) else {}


def mapped(prediction: Any, maps: Mapping[str, ConfidenceMap]) -> Any:
    """A StudentPrediction with each mapped field's confidence calibrated; a categorical field's
    runners-up are rescaled to share what the top label leaves (a distribution again). The raw
    `distribution` is kept: it is the engine's."""
    if not maps:
        return prediction
    fields = {}
    for name, fp in prediction.fields.items():
        m = maps.get(name)
        if m is None:
            fields[name] = fp
            continue
        new = m(fp.confidence)
        scale = (1.0 - new) / (1.0 - fp.confidence) if fp.confidence < 1.0 else 0.0
        fields[name] = fp.model_copy(update={"confidence": new, "alternatives": [
            s.model_copy(update={"probability": min(1.0, s.probability * scale)}) for s in fp.alternatives]})
    entities = prediction.entities
    m = maps.get(prediction.entity_field) if prediction.entity_field else None
    if entities is not None and m is not None:
        entities = entities.model_copy(update={"confidence": m(entities.confidence)})
    return dataclasses.replace(prediction, fields=fields, entities=entities)
