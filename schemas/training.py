"""A labelled example produced by the teacher, as the training log stores it."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field

from schemas.text import dedup_key


def content_hash(text: str) -> str:
    """The hash of `schemas.text.dedup_key`: one key for dedup and every content-hash split, so
    variants of a ticket (punctuation, Unicode forms, case, spacing) count once and always land
    on the same side."""
    return hashlib.sha256(dedup_key(text).encode("utf-8")).hexdigest()


# Who outranks whom for a text's label: a person's feedback over a system's over the teacher's
# (the training log's `record_feedback`, the trainer's dedup).
LABEL_RANK = {"teacher": 0, "system": 1, "human": 2}


class TrainingExample(BaseModel):
    text: str = Field(min_length=1)
    labels: dict[str, Any] = Field(description="field name -> label; the entities field -> a list "
                                   "of {type, text}. The fields the teacher was asked for: a "
                                   "partial escalation logs only those (schemas/answer.py)")
    teacher_model: str
    prompt_hash: str
    source: str = Field(default="live", description="live | audit | bootstrap | backlog")
    ticket_id: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
    labelled_by: str = Field(default="teacher", description="teacher | human | system: who gave the "
                             "row's labels; a person's feedback outranks the teacher (schemas/feedback.py)")

    @property
    def content_hash(self) -> str:
        return content_hash(self.text)


# --- the held-out slice ------------------------------------------------------------------------
# Calibration and the promotion gate need rows distributed like live traffic and never trained
# on. Two kinds of row are:
# - `bootstrap`: a content-hash share (`fraction`) of the user's labelled history;
# - `sample`: the evaluation sample, a content-hash share of *every* consumed ticket, whatever
#   the student's confidence (services/stream/pipeline.py). An escalated one's teacher label is
#   held out instead of trained on; a confident one is sent to the teacher too (an audit).
#   `sample-cold` rows were sampled at the larger cold-start share while no calibrated adapter
#   was live (every ticket escalated then, so they cost no extra teacher call).
# Escalations outside the sample (`live`) teach but never calibrate: they were chosen *because*
# the student was unsure. `audit` rows of logs written before the evaluation sample existed were
# confident tickets only (an easy-ticket slice that certified optimistic errors): they now train.
# Which rows are held out is a pure function of the rows: the same text is on the same side in
# every run, at every log version, in the trainer and in the evaluator.
HELDOUT_SOURCES = ("bootstrap", "sample", "sample-cold")
DEFAULT_HELDOUT_FRACTION = 0.2  # of bootstrap rows
DEFAULT_EVAL_SHARE = 0.05  # of live tickets, in steady state
DEFAULT_COLD_EVAL_SHARE = 0.20  # of live tickets while no calibrated adapter is live
# Cold-start rows over-weight the first days of traffic (a 4x share). They stay held out only
# until the steady-state sample alone holds this many rows; from then on they train, and the
# slice is a uniform sample of traffic over time again.
DEFAULT_COLD_ROWS_UNTIL = 2000


def is_heldout(text: str, source: str, fraction: float = DEFAULT_HELDOUT_FRACTION,
               *, cold_held: bool = True) -> bool:
    """Whether a row is held out; `cold_held`: whether `sample-cold` rows still are (see
    `HeldoutPolicy`, which decides it from the whole log)."""
    if source == "sample":
        return True  # the evaluation sample measures the student: it never trains it
    if source == "sample-cold":
        return cold_held
    if source == "bootstrap":
        return in_hash_share(text, "heldout", fraction)
    return False


def eval_sample_source(text: str, share: float, cold_share: float, *, cold: bool) -> str | None:
    """The evaluation sample's membership of a consumed ticket: "sample" (the steady-state share),
    "sample-cold" (only in the larger cold-start share, while `cold`), or None. The shares are
    nested (one hash, one salt), so raising the share keeps every ticket already in it."""
    if in_hash_share(text, "sample", share):
        return "sample"
    if cold and in_hash_share(text, "sample", cold_share):
        return "sample-cold"
    return None


def in_hash_share(text: str, salt: str, fraction: float) -> bool:
    """Deterministic, content-based membership of a `fraction` share: the same text is always
    on the same side; different salts give independent splits."""
    return hash_unit(text, salt) < fraction


def hash_unit(text: str, salt: str) -> float:
    """A uniform-looking number in [0, 1) from the text's content hash and a salt."""
    return int(hashlib.sha256((salt + ":" + content_hash(text)).encode()).hexdigest()[:8], 16) / 16**8
