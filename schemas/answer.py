"""What counts as a valid answer for a task: labels in the label set, entities of declared types
whose span occurs in the ticket. Pure functions shared by the teacher client (reject), the
student (drop and count), the trainer (skip) and the stand-in.

An answer maps field name -> value: a label (str) for a categorical field, a list of
`{"type", "text"}` objects for the entities field. An answer may cover only some fields (the
teacher asked for the fields the student was unsure of); `fields=` says which are required.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

from schemas.task import Entity, EntityFieldSpec, FieldSpec, TaskSpec
from schemas.text import normalise_whitespace

# Counted reasons an answer (or one entity of it) is refused.
ANSWER_REASONS = ("malformed_json", "missing_field", "unknown_label", "malformed_entities",
                  "unknown_entity_type", "span_not_in_text", "too_many_entities")


class AnswerError(ValueError):
    """An answer that breaks the task's contract; `reason` is one of ANSWER_REASONS."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def entity_list_schema(spec: EntityFieldSpec, spans: Sequence[str] | None = None) -> dict[str, Any]:
    """JSON schema of the entities field: the teacher's response_format and the student's
    structured-output grammar (types enumerated, bounded size). `spans`: the only span texts
    allowed (the student's grammar for one ticket: `span_candidates`)."""
    text: dict[str, Any] = ({"type": "string", "enum": list(spans)} if spans else
                            {"type": "string", "minLength": 1, "maxLength": spec.max_span_chars})
    item = {"type": "object", "properties": {"type": {"type": "string", "enum": spec.type_names}, "text": text},
            "required": ["type", "text"], "additionalProperties": False}
    return {"type": "array", "items": item, "maxItems": spec.max_entities}


_WORD_OR_SIGN = re.compile(r"\w+|[^\w\s]")


def span_candidates(text: str, max_chars: int, max_words: int = 6, limit: int = 512) -> list[str] | None:
    """Every run of 1..max_words consecutive words or signs of the (whitespace-normalised)
    ticket, up to max_chars: the spans the student may write. Decoding under this enum makes
    every span occur in the ticket by construction (a grammar compiled per ticket: ~8 ms here).
    None when a long ticket has more than `limit` (the free-text grammar + the check then)."""
    flat = normalise_whitespace(text)
    tokens = list(_WORD_OR_SIGN.finditer(flat))
    spans: dict[str, None] = {}
    for i, first in enumerate(tokens):
        for last in tokens[i : i + max_words]:
            span = flat[first.start() : last.end()]
            if len(span) > max_chars:
                break
            spans[span] = None
            if len(spans) > limit:
                return None
    return list(spans)


def entity_json(entities: Iterable[Any]) -> str:
    """The entities as the student writes them: compact JSON (the grammar allows no whitespace),
    keys in schema order. The trainer's target text; the engine parses the same shape."""
    items = [{"type": e["type"], "text": e["text"]} if isinstance(e, Mapping) else
             {"type": e.type, "text": e.text} for e in entities]
    return json.dumps(items, separators=(",", ":"), ensure_ascii=False)


def span_in_text(span: str, text: str) -> bool:
    """The span occurs in the ticket (whitespace-normalised, case-sensitive)."""
    needle = normalise_whitespace(span)
    return bool(needle) and needle in normalise_whitespace(text)


def span_as_written(span: str, text: str) -> str | None:
    """The ticket's own spelling of `span` (whitespace-normalised): the span itself when it
    occurs as is, else its first case-insensitive occurrence ("Last night" for "last night"),
    else None. The student writes a span from its vocabulary, so its capitalisation can differ
    from the ticket's; the published span is always the ticket's text."""
    needle, hay = normalise_whitespace(span), normalise_whitespace(text)
    if not needle:
        return None
    if needle in hay:
        return needle
    at = hay.casefold().find(needle.casefold())
    # casefold can change lengths ("ß" -> "ss"): only a same-length fold maps back to the text
    if at < 0 or len(hay.casefold()) != len(hay) or len(needle.casefold()) != len(needle):
        return None
    return hay[at : at + len(needle)]


def fields_holding_for(labels: Mapping[str, Any], text: str) -> dict[str, Any]:
    """The fields of a logged answer that hold for `text`: an entities list only when every
    span occurs in it (`span_in_text`, as `check_entities` requires of a fresh answer). The
    log's dedup key folds case, so an answer is reused for other spellings of its text."""
    return {name: value for name, value in labels.items() if not isinstance(value, list) or all(
        isinstance(e, Mapping) and isinstance(e.get("text"), str) and span_in_text(e["text"], text)
        for e in value)}


def entity_problem(spec: EntityFieldSpec, item: Any, text: str) -> str | None:
    """Why one entity is invalid (a reason of ANSWER_REASONS), or None."""
    if not isinstance(item, Mapping) or set(item) != {"type", "text"} or not all(
            isinstance(item[k], str) for k in ("type", "text")):
        return "malformed_entities"
    if item["type"] not in spec.type_names:
        return "unknown_entity_type"
    if not span_in_text(item["text"], text):
        return "span_not_in_text"
    return None


def keep_valid_entities(spec: EntityFieldSpec, items: Iterable[Any], text: str, *,
                        fold_case: bool = False) -> tuple[list[Entity], Counter[str]]:
    """The student's entities: invalid ones dropped and counted by reason, duplicates dropped.
    `fold_case`: a span that occurs in the ticket up to case is kept in the ticket's spelling
    (`span_as_written`). The teacher's answers are checked strictly (`check_entities`)."""
    kept: list[Entity] = []
    dropped: Counter[str] = Counter()
    for item in items:
        problem = entity_problem(spec, item, text)
        written = None
        if problem == "span_not_in_text" and fold_case:
            written = span_as_written(item["text"], text)
            problem = None if written is not None else problem
        if problem is not None:
            dropped[problem] += 1
            continue
        entity = Entity(type=item["type"], text=written or normalise_whitespace(item["text"]))
        if entity not in kept:
            kept.append(entity)
    if len(kept) > spec.max_entities:
        dropped["too_many_entities"] += len(kept) - spec.max_entities
        kept = kept[: spec.max_entities]
    return kept, dropped


def check_entities(spec: EntityFieldSpec, value: Any, text: str) -> list[dict[str, str]]:
    """The teacher's entities, or AnswerError: one bad entity refuses the whole answer."""
    if not isinstance(value, list):
        raise AnswerError("malformed_entities", f"field {spec.name!r} is not a list")
    if len(value) > spec.max_entities:
        raise AnswerError("too_many_entities", f"{len(value)} > {spec.max_entities}")
    out: list[dict[str, str]] = []
    for item in value:
        problem = entity_problem(spec, item, text)
        if problem is not None:
            shown = item.get("type") if isinstance(item, Mapping) else type(item).__name__
            raise AnswerError(problem, f"field {spec.name!r}: entity of type {shown!r}")
        entity = {"type": item["type"], "text": normalise_whitespace(item["text"])}
        if entity not in out:
            out.append(entity)
    return out


def check_label(spec: FieldSpec, value: Any) -> str:
    """A label of the field (case-insensitive match tolerated), or AnswerError."""
    if not isinstance(value, str):
        raise AnswerError("missing_field", f"field {spec.name!r} missing")
    if value in spec.labels:
        return value
    folded = [label for label in spec.labels if label.lower() == value.strip().lower()]
    if len(folded) != 1:
        raise AnswerError("unknown_label", f"field {spec.name!r}: unknown label")
    return folded[0]


def check_answer(task: TaskSpec, data: Any, text: str, fields: Sequence[str] | None = None) -> dict[str, Any]:
    """The answer restricted to `fields` (default: all), every one present and valid."""
    if not isinstance(data, Mapping):
        raise AnswerError("malformed_json", "answer is not a JSON object")
    wanted = list(fields) if fields is not None else task.field_names
    answer: dict[str, Any] = {}
    for name in wanted:
        spec = task.field(name)
        if name not in data:
            raise AnswerError("missing_field", f"field {name!r} missing")
        if isinstance(spec, EntityFieldSpec):
            answer[name] = check_entities(spec, data[name], text)
        else:
            answer[name] = check_label(spec, data[name])
    return answer


def valid_fields(task: TaskSpec, labels: Mapping[str, Any], text: str) -> dict[str, Any]:
    """The fields of a stored answer that are valid for the task today (a label set may have
    changed since it was logged); invalid or unknown fields are left out."""
    out: dict[str, Any] = {}
    for spec in task.fields:
        if spec.name not in labels:
            continue
        try:
            out[spec.name] = check_answer(task, {spec.name: labels[spec.name]}, text, [spec.name])[spec.name]
        except AnswerError:
            continue
    return out


def entity_set(value: Iterable[Any]) -> frozenset[tuple[str, str]]:
    """(type, normalised span) pairs: what entity precision/recall and agreement compare."""
    out = set()
    for item in value or ():
        if isinstance(item, Entity):
            out.add((item.type, normalise_whitespace(item.text)))
        elif isinstance(item, Mapping):
            out.add((str(item.get("type")), normalise_whitespace(str(item.get("text", "")))))
    return frozenset(out)


def answers_agree(task: TaskSpec, a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Same answer on every field both cover (entities compared as sets of (type, span))."""
    for spec in task.fields:
        if spec.name in a and spec.name in b:
            if isinstance(spec, EntityFieldSpec):
                if entity_set(a[spec.name]) != entity_set(b[spec.name]):
                    return False
            elif a[spec.name] != b[spec.name]:
                return False
    return True
