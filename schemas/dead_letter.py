"""What the dead-letter topic carries: the reason and the original bytes, losslessly."""

from __future__ import annotations

import base64
from datetime import datetime, timezone

from pydantic import BaseModel, Field


class DeadLetter(BaseModel):
    reason: str = Field(description="machine-readable: not_utf8, not_json, invalid_schema, ...")
    detail: str = Field(description="human-readable explanation")
    source_topic: str
    partition: int
    offset: int
    key_b64: str | None = None
    original_b64: str = Field(description="the message value exactly as consumed, base64")
    dead_lettered_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))

    @staticmethod
    def encode(raw: bytes | None) -> str:
        return base64.b64encode(raw or b"").decode("ascii")

    def original(self) -> bytes:
        return base64.b64decode(self.original_b64)
