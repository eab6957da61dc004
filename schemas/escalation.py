"""What the escalations topic carries: a ticket the teacher should see, with the student's answer.

The student consumer publishes one record per uncertain ticket (`kind="escalation"`) and per
confident ticket of the evaluation sample (`kind="audit"`), keyed by ticket id, then commits
the ticket. The
teacher worker (services/teacher/worker.py) consumes them in its own consumer group.

`student_result` is the student's answer exactly as it would be published: for an escalation
it is what users get (route `unverified`) when the teacher misses the deadline; for an audit
it is the confident result already on the results topic.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.classification import Classification

EscalationKind = Literal["escalation", "audit"]


class Escalation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    kind: EscalationKind
    ticket_id: str
    text: str = Field(description="the ticket as the student saw it (subject + body)")
    student_result: Classification
    # When the ticket entered triage (its Kafka timestamp, else consume time), epoch ms:
    # the teacher worker's deadline counts from here, so users wait at most that long.
    ticket_time_ms: int = Field(ge=0)
    # The fields below their calibrated threshold (None: all, e.g. an audit or an older record).
    # The teacher worker asks for only these when that is cheaper than asking for every field.
    unsure_fields: list[str] | None = None
    # A router task's escalation: the ticket as received, forwarded by the teacher worker once
    # the first answer (the teacher's or, past the deadline, the student's) is published.
    ticket: dict[str, Any] | None = None
    # In the evaluation sample (schemas.training): the teacher's label is logged under this
    # source and held out, never trained on. Every audit is; an escalation may be.
    sample: Literal["sample", "sample-cold"] | None = None
    escalated_at: datetime = Field(default_factory=lambda: datetime.now(timezone.utc))
