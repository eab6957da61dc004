"""Training data for the student: teacher answers -> deduplicated, split, encoded prompts.

Rows come from the training log (up to a recorded version, so a run can be reproduced) or
from a labelled TSV. Every row becomes one prompt per field, rendered by the shared prompt
builder and tokenised exactly as the serving engine does (`services.student.prompting`:
`fit_ticket`, `prompt_ids`, compact style); the target is the index of the
label's single-token code among the field's codes.

The train/validation split is a pure function of each text's content hash, so a text stays
on the same side of the split as the log grows. `data_hash` identifies the training set
(sha256 over the sorted (text, labels) pairs) and is stored beside every adapter.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

from schemas.answer import entity_json, span_in_text, valid_fields
from schemas.task import TaskSpec
from schemas.training import (
    DEFAULT_COLD_ROWS_UNTIL, DEFAULT_HELDOUT_FRACTION, LABEL_RANK, content_hash, hash_unit, in_hash_share, is_heldout,
)
from services.teacher.corpus import read_records
from services.student.prompting import LabelCodes, PromptStyle, encode_text, fit_ticket, prompt_ids


@dataclass(frozen=True)
class Row:
    """One labelled text; `labels` maps field name -> label (the entities field -> a list of
    {type, text}). A row may cover some fields only (a partial escalation's answer)."""

    text: str
    labels: dict[str, Any] = field(hash=False)
    source: str = field(default="", compare=False)  # the training log's source; "" for files
    labelled_by: str = field(default="teacher", compare=False)  # teacher | human | system


@dataclass(frozen=True)
class Encoded:
    """One prompt whose next token is `field`'s code; `target` indexes the field's labels.
    The entities field: `input_ids` = prompt + the answer's tokens, the last `answer_len` of
    them are the target (the JSON the engine generates), `target` is -1."""

    input_ids: tuple[int, ...]
    field: str
    target: int
    row: int  # index of the source row
    answer_len: int = 0


@dataclass
class TrainingData:
    train: list[Row]
    validation: list[Row]
    data_version: int | None  # training-log version the rows go up to (None: a TSV)
    data_hash: str
    counts: dict[str, int]

    def describe(self) -> dict[str, Any]:
        # `labels`: the training rows per label of each categorical field, so the service can
        # tell a label this adapter never trained on (services/stream/drift.py).
        labels: dict[str, dict[str, int]] = {}
        for row in self.train:
            for name, value in row.labels.items():
                if isinstance(value, str):
                    per_field = labels.setdefault(name, {})
                    per_field[value] = per_field.get(value, 0) + 1
        return {"data_version": self.data_version, "data_hash": self.data_hash, **self.counts,
                "labels": {name: dict(sorted(c.items())) for name, c in labels.items()}}


# --- sources -----------------------------------------------------------------------------
def rows_from_log(path: str | Path, up_to_version: int | None = None) -> tuple[list[Row], int]:
    """Rows of the training log with version <= up_to_version (default: its current version)."""
    from services.teacher.training_log import TrainingLog

    with TrainingLog(path) as log:
        version = log.version() if up_to_version is None else int(up_to_version)
        rows = [Row(e.text, dict(e.labels), e.source, e.labelled_by) for e in log.examples(up_to_version=version)]
    return rows, version


def read_tsv(path: str | Path, task: TaskSpec) -> list[Row]:
    """Labelled rows of a TSV/JSONL file (`services.teacher.corpus`): a column per categorical
    field, or `label` for a one-field task; JSONL: a `labels` object, and `entities` (a list of
    {type, text}) for a task with an entities field. Answers outside the task fail."""
    names = [f.name for f in task.categorical_fields]
    entity = task.entity_field
    rows, unknown = [], []
    for record in read_records(path):
        labels = record.get("labels")
        if not isinstance(labels, dict):
            if all(n in record for n in names):
                labels = {n: record[n] for n in names}
            elif len(names) == 1 and "label" in record:
                labels = {names[0]: record["label"]}
            else:
                raise ValueError(f"{path}: expected columns {names} (or 'label' for a one-field task)")
        answer = {n: labels.get(n) for n in names}
        if entity is not None:
            answer[entity.name] = record.get("entities", labels.get(entity.name))
        row = Row(record["text"], answer)
        if len(valid_fields(task, answer, row.text)) < len(answer):
            unknown.append(answer)
        rows.append(row)
    if unknown:
        raise ValueError(f"{path}: {len(unknown)} of {len(rows)} rows have answers outside task "
                         f"{task.name!r} (first: {str(unknown[0])[:200]}); wrong task or label set?")
    return rows


# --- cleaning, split, hash -----------------------------------------------------------------
def dedup(rows: Iterable[Row]) -> list[Row]:
    """One row per content hash (`schemas.text.dedup_key`): the most trusted labeller's first
    answer (a person's over a system's over the teacher's: `LABEL_RANK`), in first-seen order.
    The winner keeps the held-out side of the text's first row (its evaluation-sample or
    bootstrap source), so a person's label never moves a held-out text into training."""
    kept: dict[str, Row] = {}
    for row in rows:
        key = content_hash(row.text)
        first = kept.setdefault(key, row)
        if _rank(row) > _rank(first):
            kept[key] = replace(row, source=first.source)
    return list(kept.values())


def _rank(row: Row) -> int:
    return LABEL_RANK.get(row.labelled_by, 0)


def valid_rows(rows: Iterable[Row], task: TaskSpec) -> list[Row]:
    """Each row restricted to its fields that are valid for the task today (a label outside an
    older label set, a span not in the text: left out); a row with no valid field is dropped.
    A row may cover some fields only (a partial escalation): it trains those."""
    out = []
    for row in rows:
        usable = valid_fields(task, row.labels, row.text)
        if usable:
            out.append(row if usable == row.labels else replace(row, labels=usable))
    return out


def balance_entities(rows: Sequence[Row], task: TaskSpec, empty_per_positive: float) -> list[Row]:
    """Rows with the entities field dropped from most rows whose answer is `[]`: in support
    traffic most tickets mention nothing (88% of the example task), and a student trained on
    that prior learns to answer `[]` (measured: recall 0.22 at precision 0.97). Keeps every
    row with an entity and `empty_per_positive` empty ones per such row, chosen by content
    hash (the same rows every run); the other fields of every row are kept. Thresholds are
    calibrated on the untouched held-out slice, so the guarantee does not depend on it."""
    entity = task.entity_field
    if entity is None or empty_per_positive < 0:
        return list(rows)
    labelled = [r for r in rows if entity.name in r.labels]
    positives = sum(bool(r.labels[entity.name]) for r in labelled)
    empties = len(labelled) - positives
    share = min(1.0, empty_per_positive * positives / empties) if empties else 1.0
    out = []
    for row in rows:
        answer = row.labels.get(entity.name)
        if answer == [] and not in_hash_share(row.text, "entities", share):
            rest = {k: v for k, v in row.labels.items() if k != entity.name}
            if rest:
                out.append(replace(row, labels=rest))
            continue
        out.append(row)
    return out


def in_validation(text: str, fraction: float) -> bool:
    """Deterministic, content-based: the same text is always on the same side."""
    return in_hash_share(text, "split", fraction)


def split_heldout(rows: Iterable[Row], fraction: float = DEFAULT_HELDOUT_FRACTION,
                  cold_rows_until: int = DEFAULT_COLD_ROWS_UNTIL) -> tuple[list[Row], list[Row]]:
    """(trainable, held out) by `schemas.training.is_heldout`: bootstrap rows by content hash,
    every evaluation-sample row, and the cold-start sample rows while the steady-state sample
    holds fewer than `cold_rows_until` rows. Held-out rows calibrate and gate, never train."""
    rows = list(rows)
    cold_held = sum(r.source == "sample" for r in rows) < cold_rows_until
    trainable, heldout = [], []
    for row in rows:
        (heldout if is_heldout(row.text, row.source, fraction, cold_held=cold_held) else trainable).append(row)
    return trainable, heldout


# The gate's two disjoint parts of the held-out slice (trainer/README.md, "Selection and
# certification"): the selection part decides promote/reject, the certification part only
# certifies the promoted candidate's threshold, so that choice never depends on the rows
# that certify it. Certification gets the larger share: its size is the served coverage.
CERTIFY_SHARE = 2 / 3


def split_gate(rows: Iterable[Row], share: float = CERTIFY_SHARE) -> tuple[list[Row], list[Row]]:
    """(selection, certification) by content hash: a text is on the same side in every cycle."""
    select: list[Row] = []
    certify: list[Row] = []
    for row in rows:
        (certify if in_hash_share(row.text, "certify", share) else select).append(row)
    return select, certify


def uniform_subsample(rows: Sequence[Row], n: int) -> list[Row]:
    """`n` rows chosen by content hash: a uniform sample that keeps its members as the slice
    grows (the newest N would be a sample of the last days only)."""
    if n <= 0 or n >= len(rows):
        return list(rows)
    return sorted(rows, key=lambda r: hash_unit(r.text, "eval-limit"))[:n]


def data_hash(rows: Iterable[Row]) -> str:
    pairs = sorted((r.text, json.dumps(r.labels, sort_keys=True)) for r in rows)
    return hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()


def file_keys(path: str | Path) -> set[str]:
    """Content hashes of a file's texts (a calibration file: never trained on)."""
    return {content_hash(record["text"]) for record in read_records(path)}


def build(
    rows: Sequence[Row], task: TaskSpec, *, val_fraction: float, data_version: int | None = None,
    heldout_fraction: float | None = None, cold_rows_until: int = DEFAULT_COLD_ROWS_UNTIL,
    exclude: Iterable[str] = (),
) -> TrainingData:
    """Train/validation rows. `heldout_fraction` (log rows): the held-out slice is removed first;
    `exclude`: content hashes never trained on either (an explicit calibration file's texts)."""
    unique = dedup(rows)
    heldout: list[Row] = []
    if heldout_fraction is not None:
        unique, heldout = split_heldout(unique, heldout_fraction, cold_rows_until)
    excluded = set(exclude)
    if excluded:
        kept = [r for r in unique if content_hash(r.text) not in excluded]
        heldout, unique = heldout + [r for r in unique if content_hash(r.text) in excluded], kept
    usable = valid_rows(unique, task)
    train = [r for r in usable if not in_validation(r.text, val_fraction)]
    validation = [r for r in usable if in_validation(r.text, val_fraction)]
    counts = {
        "rows": len(rows),
        "duplicates": len(rows) - len(unique) - len(heldout),
        "heldout_excluded": len(heldout),
        "invalid": len(unique) - len(usable),
        "train": len(train),
        "validation": len(validation),
    }
    return TrainingData(train, validation, data_version, data_hash(usable), counts)


# --- encoding ------------------------------------------------------------------------------
def encode(
    rows: Iterable[Row],
    task: TaskSpec,
    codes: dict[str, LabelCodes],
    tokenizer: Any,
    *,
    style: PromptStyle = PromptStyle.compact,
    max_tokens: int | None = None,
) -> list[Encoded]:
    """One `Encoded` per (row, field). A prompt longer than max_tokens has its ticket cut
    (head + tail, by tokens) exactly as the engine cuts it for an adapter trained with this
    `max_tokens` (`prompting.prompt_budget`), so a long ticket trains on the text the service
    will see; an entity whose span was cut out is not trained on (the student cannot see it).
    Only a ticket whose empty prompt cannot fit is skipped."""
    out = []
    for n, row in enumerate(rows):
        for spec in task.fields:
            if spec.name not in row.labels:
                continue
            field_codes = codes.get(spec.name)
            if max_tokens is None:
                ids, kept = prompt_ids(tokenizer, task, spec.name, row.text, style, field_codes), row.text
            else:
                fitted = fit_ticket(task, spec.name, row.text, style, field_codes, tokenizer, max_tokens)
                if fitted is None:
                    continue
                ids, kept = fitted.ids, fitted.text
            if field_codes is None:  # the entities field: learn to write the JSON
                seen = [e for e in row.labels[spec.name] if span_in_text(_span(e), kept)]
                answer = encode_text(tokenizer, entity_json(seen))
                out.append(Encoded(tuple(ids) + tuple(answer), spec.name, -1, n, len(answer)))
            else:
                out.append(Encoded(tuple(ids), spec.name, field_codes.labels.index(row.labels[spec.name]), n))
    return out


def _span(entity: Any) -> str:
    return entity["text"] if isinstance(entity, dict) else entity.text
