"""People's corrections and confirmations of published answers -> the training log.

One feedback record (schemas/feedback.py) has exactly one outcome (`Verdict`):
- stored: `added` (a text the log lacked: a new row), `corrected`, `confirmed`, or `outranked`
  (a system's label on a row a person labelled: kept in the log's `feedback` table only);
- refused, for the dead-letter topic: `not_json`, `invalid_feedback` (not the schema),
  `unknown_ticket` (not in the log and no `text` given), `unknown_field`, `unknown_label`,
  `invalid_entities` (a type the task lacks, a span not in the ticket).

The ticket's text is joined from the training log by ticket id (what the teacher saw: every
escalation and every evaluation-sample ticket); else from the record's own `text`. A new row's
source keeps the evaluation sample's rule (`schemas.training.eval_sample_source`): a text in the
steady-state sample is held out (and its human label is the gold), any other text trains.
The record's `published` (the answer it is about) is kept beside it: the only copy of what the
student answered alone (services/teacher/quality.py measures the student with it).
Why a person outranks the teacher and what that certifies: README, "Feedback".

No Kafka here: services/stream/feedback_lane.py consumes the topic, `triage feedback --tsv`
reads a file (`read_feedback_file`); both hand records to `FeedbackDesk`.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from pydantic import ValidationError

from schemas.answer import AnswerError, check_entities, check_label
from schemas.feedback import Feedback
from schemas.task import EntityFieldSpec, TaskSpec
from schemas.ticket import Ticket
from schemas.training import eval_sample_source

if TYPE_CHECKING:
    from services.teacher.training_log import TrainingLog

STORED = ("added", "corrected", "confirmed", "outranked")
REFUSED = ("not_json", "invalid_feedback", "unknown_ticket", "unknown_field", "unknown_label",
           "invalid_entities", "feedback_failed")  # the last: the consumer's, for a failure of its own
OUTCOMES = STORED + REFUSED


@dataclass(frozen=True)
class Verdict:
    outcome: str  # one of OUTCOMES
    detail: str = ""
    ticket_id: str | None = None

    @property
    def refused(self) -> bool:
        return self.outcome in REFUSED


class FeedbackDesk:
    """Validates feedback against the task and stores it in the training log. Synchronous
    (SQLite): call it from a thread in async code. A failure of the log itself raises."""

    def __init__(self, task: TaskSpec, training_log: TrainingLog, *, eval_share: float) -> None:
        self.task, self.training_log, self.eval_share = task, training_log, eval_share

    def receive(self, value: bytes | None) -> Verdict:
        """One raw record of the feedback topic."""
        try:
            data = json.loads(value or b"")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return Verdict("not_json", f"not JSON: {exc}")
        try:
            feedback = Feedback.model_validate(data)
        except ValidationError as exc:
            ticket = data.get("ticket_id") if isinstance(data, dict) else None
            return Verdict("invalid_feedback", str(exc)[:1000], ticket if isinstance(ticket, str) else None)
        return self.take(feedback)

    def take(self, feedback: Feedback) -> Verdict:
        ticket_id = feedback.ticket_id
        text = self.training_log.ticket_text(ticket_id)
        if text is None and feedback.text is not None:
            try:  # composed as the service composes a ticket (subject line, then the body)
                text = Ticket(id=ticket_id, text=feedback.text, subject=feedback.subject).full_text()
            except ValidationError as exc:
                return Verdict("invalid_feedback", str(exc)[:1000], ticket_id)
        if text is None:
            return Verdict("unknown_ticket", f"ticket {ticket_id!r} is not in the training log and the "
                           "feedback carries no `text`", ticket_id)
        try:
            labels = self._labels(feedback, text)
        except AnswerError as exc:
            return Verdict(exc.reason, str(exc), ticket_id)
        outcome = self.training_log.record_feedback(
            text, labels, ticket_id=ticket_id, labelled_by=feedback.source, record_key=record_key(feedback),
            new_row_source=eval_sample_source(text, self.eval_share, self.eval_share, cold=False) or "feedback",
            author=feedback.author, at=feedback.at.isoformat() if feedback.at else None,
            published=feedback.published.model_dump_json(exclude_none=True) if feedback.published else None)
        return Verdict(outcome, "", ticket_id)

    def _labels(self, feedback: Feedback, text: str) -> dict[str, Any]:
        """The feedback's answer checked against the task (AnswerError with the reason)."""
        labels: dict[str, Any] = {}
        names = {f.name: f for f in self.task.fields}
        for name, value in feedback.fields.items():
            spec = names.get(name)
            if spec is None or isinstance(spec, EntityFieldSpec):
                raise AnswerError("unknown_field", f"{name!r} is not a categorical field of task {self.task.name!r}")
            labels[name] = check_label(spec, value)
        if feedback.entities is not None:
            spec = self.task.entity_field
            if spec is None:
                raise AnswerError("unknown_field", f"task {self.task.name!r} has no entities field")
            try:
                labels[spec.name] = check_entities(spec, [e.model_dump() for e in feedback.entities], text)
            except AnswerError as exc:
                raise AnswerError("invalid_entities", str(exc)) from exc
        return labels


def record_key(feedback: Feedback) -> str:
    """One key per feedback record (a re-delivery is the same record: stored once). The
    joined and quoted parts stay out, so keys of records from before `published` hold."""
    body = feedback.model_dump_json(exclude={"text", "subject", "published"})
    return hashlib.sha256(body.encode()).hexdigest()


def read_feedback_file(path: str | Path, task: TaskSpec) -> Iterator[tuple[int, bytes]]:
    """(line number, a feedback record as the topic carries it) for each row of a file.

    `.jsonl`: one record per line, exactly as on the topic. Otherwise a TSV with a header row:
    `ticket_id` and/or `text` (a ticket the log lacks needs `text`; no `ticket_id`: the text's
    content hash names it), optional `subject`, a column per categorical field (or `label` for
    a one-field task; an empty cell leaves that field alone), optional `author`, `source`
    (human | system, default human) and `at`; the answer corrected, for quality figures: optional
    `published_route` (student | teacher | unverified) and `published_<field>` per field (or
    `published_label`). A row that is not valid comes out as a record the desk refuses with its
    reason, never as an exception: one bad row does not stop the file."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield number, line.strip()
        return
    fields = [f.name for f in task.categorical_fields]
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = set(reader.fieldnames or ())
        if not header & {"ticket_id", "text"}:
            raise ValueError(f"{path}: expected a header row with a 'ticket_id' or 'text' column")
        for number, row in enumerate(reader, 2):
            yield number, json.dumps(_tsv_record(row, fields)).encode()


def _tsv_record(row: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    cells = {k: v.strip() for k, v in row.items() if isinstance(k, str) and isinstance(v, str) and v.strip()}
    labels = {name: cells[name] for name in fields if name in cells}
    if not labels and len(fields) == 1 and "label" in cells:
        labels = {fields[0]: cells["label"]}
    published = {name: cells[f"published_{name}"] for name in fields if f"published_{name}" in cells}
    if not published and len(fields) == 1 and "published_label" in cells:
        published = {fields[0]: cells["published_label"]}
    quoted = {"published_route", "published_label", *(f"published_{name}" for name in fields)}
    extra = {k: v for k, v in cells.items() if k not in {*fields, "label", "ticket_id", *quoted}}
    unknown = sorted(set(extra) - {"text", "subject", "author", "source", "at"})
    record: dict[str, Any] = {"fields": labels, **{k: extra[k] for k in extra if k not in unknown}}
    if "published_route" in cells or published:  # no route: the schema says what is missing
        record["published"] = {"fields": published, **({"route": cells["published_route"]}
                                                       if "published_route" in cells else {})}
    if unknown:  # a misspelt field column: say so through the schema (invalid_feedback)
        record["columns_not_in_task"] = unknown
    text = cells.get("text")
    record["ticket_id"] = cells.get("ticket_id") or (f"text-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
                                                      if text else "")
    return record


def load_feedback_file(desk: FeedbackDesk, path: str | Path, *, show: int = 20) -> dict[str, Any]:
    """Every row of a file through the desk (`triage feedback --tsv`): outcomes counted, the
    first `show` refusals listed with their line and reason (a file has no dead-letter topic)."""
    counts: dict[str, int] = {}
    refusals: list[dict[str, Any]] = []
    for number, value in read_feedback_file(path, desk.task):
        verdict = desk.receive(value)
        counts[verdict.outcome] = counts.get(verdict.outcome, 0) + 1
        if verdict.refused and len(refusals) < show:
            refusals.append({"line": number, "reason": verdict.outcome, "ticket_id": verdict.ticket_id,
                             "detail": verdict.detail[:300]})
    return {"file": str(path), "stored": {k: v for k, v in counts.items() if k in STORED},
            "refused": {k: v for k, v in counts.items() if k in REFUSED}, "first_refusals": refusals}
