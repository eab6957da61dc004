"""A labelled example produced by the teacher, as the training log stores it."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, Field

from schemas.text import dedup_key


def content_hash(text: str) -> str:
    """Dedup key: whitespace- and case-normalised text, so trivial variants count once."""
    return hashlib.sha256(dedup_key(text).encode("utf-8")).hexdigest()


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

    @property
    def content_hash(self) -> str:
        return content_hash(self.text)


# --- the held-out slice ------------------------------------------------------------------------
# Calibration and the promotion gate need rows distributed like live traffic and never trained
# on. Bootstrap rows (a uniform sample of historical tickets) and audit rows (a uniform sample
# of confident live tickets) are; escalations are not: they were chosen *because* the student
# was unsure, so they teach (training) but must not calibrate. Which rows are held out is a pure
# function of (text, source): the same text is on the same side in every run, at every log
# version, in the trainer and in the evaluator.
HELDOUT_SOURCES = ("bootstrap", "audit")
DEFAULT_HELDOUT_FRACTION = 0.2  # of bootstrap rows; every audit row is held out


def is_heldout(text: str, source: str, fraction: float = DEFAULT_HELDOUT_FRACTION) -> bool:
    if source == "audit":
        return True  # audits exist to measure the student: they never train it
    if source not in HELDOUT_SOURCES:
        return False
    return in_hash_share(text, "heldout", fraction)


def in_hash_share(text: str, salt: str, fraction: float) -> bool:
    """Deterministic, content-based membership of a `fraction` share: the same text is always
    on the same side; different salts give independent splits."""
    bucket = int(hashlib.sha256((salt + ":" + content_hash(text)).encode()).hexdigest()[:8], 16)
    return bucket < fraction * 16**8
