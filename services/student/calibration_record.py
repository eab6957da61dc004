"""A threshold holds only for the engine it was certified on.

An adapter's escalation threshold is a statement about confidences: "above t, at most eps
wrong". Those confidences come out of one engine configuration; another dtype (bf16 vs
float32 flips about 1% of accept/escalate decisions, bench/README.md "Number format"),
another cut of long tickets or other decoding code gives other confidences, and the
certificate says nothing about them. So `trainer/distill.py` stores the configuration it
certified on beside the threshold (`threshold.engine`), and the service serves an adapter
whose record differs from its own engine with its threshold refused (trust nothing: every
ticket escalates, and the evaluation sample takes its cold share) until a distil re-certifies
it in the serving configuration. Never silently used.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# Adapters certified before the record existed were all evaluated in float32.
LEGACY_RECORD = {"dtype": "float32"}
# The engine settings that change an answer (the prediction cache keys on them too:
# trainer/predictions.py, which also lists what is left out and why).
ANSWER_SETTINGS = ("dtype", "max_model_len", "entity_span_grammar")


def engine_record(config: Any) -> dict[str, Any]:
    """What of an engine configuration changes a confidence (trainer/predictions.py lists the
    rest and why it does not)."""
    from services.student.outputs import PREDICTION_SEMANTICS

    return {**{name: getattr(config, name) for name in ANSWER_SETTINGS}, "semantics": PREDICTION_SEMANTICS}


def certified_record(adapter: Any) -> dict[str, Any] | None:
    """The configuration `adapter`'s threshold was certified on (None: never calibrated)."""
    stored = (getattr(adapter, "meta", None) or {}).get("threshold")
    if not stored:
        return None
    return stored.get("engine") or LEGACY_RECORD


def record_mismatch(adapter: Any, config: Any) -> str | None:
    """Why `adapter`'s threshold does not hold on `config`, or None when it does (or there is
    no threshold to hold)."""
    if adapter is None or config is None or getattr(adapter, "threshold", None) is None:
        return None
    record = certified_record(adapter)
    if record is None:
        return None
    serving = engine_record(config)
    differs = [f"{k} {record[k]} -> {serving[k]}" for k in record if k in serving and record[k] != serving[k]]
    if not differs:
        return None
    return (f"adapter {adapter.adapter_id}'s threshold was certified on another engine configuration "
            f"({'; '.join(differs)}): trusting nothing (every ticket escalates) until `triage distill` "
            f"re-certifies it on this one")


def as_served(adapter: Any, config: Any) -> Any:
    """`adapter` as this engine may serve it: its threshold refused (math.inf, trust nothing)
    when certified on another configuration; otherwise unchanged."""
    if record_mismatch(adapter, config) is None:
        return adapter
    return dataclasses.replace(adapter, threshold=_trust_nothing(adapter.threshold))


def _trust_nothing(threshold: Any) -> Any:
    if isinstance(threshold, dict):
        return {name: math.inf for name in threshold}
    return math.inf
