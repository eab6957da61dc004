"""The output contract: one result per ticket on the results topic (strict JSON)."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field


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


class Classification(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    ticket_id: str
    fields: dict[str, str] = Field(description="field name -> published label")
    confidence: float = Field(ge=0.0, le=1.0, description="min over fields of the published answer")
    route: Route
    model: str = Field(description="model that produced the published labels")
    adapter_id: str | None = Field(default=None, description="student LoRA adapter, None = base")
    student: dict[str, FieldPrediction] = Field(default_factory=dict)
    teacher: dict[str, str] | None = None
    teacher_model: str | None = None
    audited: bool = Field(default=False, description="confident ticket also sent to the teacher")
    truncated: bool = Field(default=False, description="the student saw the ticket cut to fit (head + tail)")
    latency_ms: float = Field(ge=0.0, description="student: consume -> result ready; teacher worker "
                              "(teacher, unverified): ticket arrival -> result ready")
    engine_ms: float = Field(ge=0.0, description="time inside the student engine")
    classified_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
