"""The output contract: one result per ticket on the results topic (strict JSON)."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from schemas.routing import RouteHop
from schemas.task import Entity


class Route(str, Enum):
    """Who answered the published labels."""

    student = "student"  # confident student answer
    teacher = "teacher"  # escalated; the teacher's answer is published
    unverified = "unverified"  # escalation wanted but teacher unavailable: student's answer, flagged


class LabelScore(BaseModel):
    label: str
    probability: float = Field(ge=0.0, le=1.0)


class FieldPrediction(BaseModel):
    """One categorical field: the label, its confidence and the runners-up."""

    label: str
    confidence: float = Field(ge=0.0, le=1.0)
    alternatives: list[LabelScore] = Field(default_factory=list)


class EntityPrediction(BaseModel):
    """The student's entities: the spans it generated that passed the checks, the confidence of
    the whole list (product of the generated tokens' probabilities) and what was dropped."""

    entities: list[Entity] = Field(default_factory=list)
    confidence: float = Field(ge=0.0, le=1.0)
    dropped: dict[str, int] = Field(default_factory=dict, description="reason -> spans dropped")


class Classification(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    ticket_id: str
    fields: dict[str, str] = Field(description="categorical field name -> published label")
    entities: list[Entity] | None = Field(default=None, description="published entities (tasks "
                                          "with an entities field; None otherwise)")
    sources: dict[str, str] = Field(default_factory=dict, description="field name -> who answered "
                                    "it: student | teacher (a partial escalation mixes them)")
    confidence: float = Field(ge=0.0, le=1.0, description="min over fields of the published answer")
    route: Route
    model: str = Field(description="model that produced the published labels")
    adapter_id: str | None = Field(default=None, description="student LoRA adapter, None = base")
    student: dict[str, FieldPrediction] = Field(default_factory=dict)
    student_entities: EntityPrediction | None = None
    teacher: dict[str, Any] | None = Field(default=None, description="the teacher's answer (the "
                                           "fields it was asked for)")
    teacher_model: str | None = None
    audited: bool = Field(default=False, description="confident ticket also sent to the teacher")
    route_chain: list[RouteHop] = Field(default_factory=list, description="the router tasks "
                                        "this ticket came through, first to last")
    forwarded_to: str | None = Field(default=None, description="a router task: the task this "
                                     "answer forwarded the ticket to")
    truncated: bool = Field(default=False, description="the student saw the ticket cut to fit (head + tail)")
    latency_ms: float = Field(ge=0.0, description="student: consume -> result ready; teacher worker "
                              "(teacher, unverified): ticket arrival -> result ready")
    engine_ms: float = Field(ge=0.0, description="time inside the student engine")
    classified_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
