"""The input contract: one support ticket as it arrives on the tickets topic."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator

from schemas.routing import MAX_ROUTE_HOPS, RouteHop


class Ticket(BaseModel):
    """A support ticket. `id` is the producer's id; results are keyed by it.

    Fields beyond the standard ones are the task's `inputs` (product, reporter, ...): the parser
    (services/stream/validation.py) accepts exactly those the task declares, as scalars."""

    model_config = ConfigDict(extra="allow", str_strip_whitespace=True)

    id: str = Field(min_length=1, max_length=256)
    text: str = Field(min_length=1, description="The customer's message.")
    subject: str | None = Field(default=None, max_length=1000)
    created_at: datetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    # Set by triage when a router task forwarded this ticket (schemas/forwarding.py).
    route_chain: list[RouteHop] = Field(default_factory=list, max_length=MAX_ROUTE_HOPS)

    @field_validator("text")
    @classmethod
    def _text_has_content(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("text is blank")
        return value

    def full_text(self, inputs: Sequence[Any] = ()) -> str:
        """What the models see: the task's inputs as `Name: value` lines, the subject, the body.
        `inputs`: the task's InputSpecs (schemas.task); a ticket without one skips its line."""
        extra = self.model_extra or {}
        lines = [f"{i.shown_as}: {extra[i.name]}" for i in inputs
                 if extra.get(i.name) not in (None, "")]
        if self.subject:
            lines.append(self.subject)
        return "\n".join(lines + [self.text])
