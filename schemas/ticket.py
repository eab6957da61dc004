"""The input contract: one support ticket as it arrives on the tickets topic."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Ticket(BaseModel):
    """A support ticket. `id` is the producer's id; results are keyed by it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    id: str = Field(min_length=1, max_length=256)
    text: str = Field(min_length=1, description="The customer's message.")
    subject: str | None = Field(default=None, max_length=1000)
    created_at: datetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("text")
    @classmethod
    def _text_has_content(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text is blank")
        return value

    def full_text(self) -> str:
        """Subject and body as the model sees them."""
        return f"{self.subject}\n{self.text}" if self.subject else self.text
