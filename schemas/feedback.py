"""What the feedback topic carries: a person's (or a system's) correction or confirmation of a
published answer, keyed by ticket id.

    {"ticket_id": "T-1042", "fields": {"intent": "card_arrival"}, "source": "human",
     "author": "agent-17", "at": "2026-03-01T10:22:05Z"}

`fields`: categorical field -> the right label (any subset of the task's fields); `entities`:
the right spans of the task's entities field, all of them (a list replaces the answer's). The
ticket's text is joined from the training log by `ticket_id`; a ticket the log does not hold
(the student answered it alone, outside the evaluation sample) needs `text` (and `subject`,
when it had one) as the ticket was produced, or it is dead-lettered `unknown_ticket`.

`published`: the answer the person corrected or confirmed, as the results topic carried it
(the whole result record may be passed; only `route`, `fields` and `entities` are kept). The
service keeps no copy of the answers the student published alone, so this is what lets a
correction count against the student (services/teacher/quality.py); without it the record
still labels the ticket and measures the teacher.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.classification import Route
from schemas.task import Entity


class PublishedAnswer(BaseModel):
    """The published answer a feedback record is about (a result record's own fields)."""

    model_config = ConfigDict(extra="ignore")  # a whole result record is welcome

    route: Route
    fields: dict[str, str] = Field(default_factory=dict)
    entities: list[Entity] | None = None


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ticket_id: str = Field(min_length=1, max_length=256)
    fields: dict[str, str] = Field(default_factory=dict, description="categorical field -> right label")
    entities: list[Entity] | None = Field(default=None, description="the right spans (all of them)")
    source: Literal["human", "system"] = Field(default="human", description="an agent, or a system "
                                               "(e.g. the desk's own re-routing)")
    author: str | None = Field(default=None, max_length=200)
    at: datetime | None = Field(default=None, description="when the answer was corrected or confirmed")
    text: str | None = Field(default=None, min_length=1, description="the ticket's text, for tickets "
                             "the training log does not hold")
    subject: str | None = None
    published: PublishedAnswer | None = Field(default=None, description="the answer corrected or "
                                              "confirmed, as the results topic carried it")

    @model_validator(mode="after")
    def _says_something(self) -> Feedback:
        if not self.fields and self.entities is None:
            raise ValueError("feedback names no field and no entities")
        return self
