"""Raw Kafka bytes -> Ticket, or a precise reason why not. Pure functions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Collection

from pydantic import ValidationError

from schemas.ticket import Ticket


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str


def parse_ticket(raw: bytes | None, *, max_bytes: int, max_text_chars: int,
                 inputs: Collection[str] = ()) -> Ticket | Rejection:
    """`inputs`: the extra fields the task declares (TaskSpec.inputs); any other is refused."""
    if not raw:
        return Rejection("empty_message", "message value is empty or null")
    if len(raw) > max_bytes:
        return Rejection("too_large", f"message is {len(raw)} bytes; limit is {max_bytes}")
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Rejection("not_utf8", f"invalid UTF-8 at byte {exc.start}")
    try:
        payload = json.loads(decoded)
    except json.JSONDecodeError as exc:
        return Rejection("not_json", f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}")
    if not isinstance(payload, dict):
        return Rejection("invalid_schema", f"expected a JSON object, got {type(payload).__name__}")
    try:
        ticket = Ticket.model_validate(payload)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any(e["loc"] == ("text",) and e["type"] in ("string_too_short", "value_error") for e in errors):
            return Rejection("empty_text", "ticket text is empty or blank")
        summary = "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in errors)
        return Rejection("invalid_schema", summary[:1000])
    extra = ticket.model_extra or {}
    unknown = sorted(set(extra) - set(inputs))
    if unknown:
        return Rejection("invalid_schema", f"unknown field(s) {unknown[:5]}: the task declares inputs "
                         f"{sorted(inputs)}"[:1000])
    not_scalar = sorted(k for k, v in extra.items() if v is not None and not isinstance(v, (str, int, float, bool)))
    if not_scalar:
        return Rejection("invalid_schema", f"input field(s) {not_scalar[:5]} must be text or a number")
    if len(ticket.text) > max_text_chars:
        return Rejection("text_too_long", f"text has {len(ticket.text)} characters; limit is {max_text_chars}")
    return ticket
