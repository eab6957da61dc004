"""A labelled example produced by the teacher, as the training log stores it."""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from pydantic import BaseModel, Field

from schemas.text import dedup_key


def content_hash(text: str) -> str:
    """Dedup key: whitespace- and case-normalised text, so trivial variants count once."""
    return hashlib.sha256(dedup_key(text).encode("utf-8")).hexdigest()


class TrainingExample(BaseModel):
    text: str = Field(min_length=1)
    labels: dict[str, str] = Field(description="field name -> label")
    teacher_model: str
    prompt_hash: str
    source: str = Field(default="live", description="live | audit | bootstrap | backlog")
    ticket_id: str | None = None
    created_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def content_hash(self) -> str:
        return content_hash(self.text)
