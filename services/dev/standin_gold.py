"""What the gold-label stand-in answers from: `text<TAB>label` TSVs (a plain label) or JSONL
records with labels and entities (a full answer, see gold_entry). `services.dev.standin` uses
(and re-exports) these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from schemas.text import dedup_key
from services.dev.datasets import BANKING77_SPLITS, banking77_dir
from services.teacher.corpus import read_records

ENTITIES_KEY = "entities"  # where a gold answer keeps its spans, whatever the field's name

GoldEntry = dict[str, Any]  # {field: label, ..., "entities": [{"type", "text"}, ...]}


def gold_entry(labels: Mapping[str, Any], entities: Iterable[Any] | None = None) -> GoldEntry:
    """A full gold answer: labels by field name (None skipped), the spans under "entities" when
    given (no key: not annotated; []: annotated, none). Extra span keys are dropped."""
    entry: GoldEntry = {k: v for k, v in labels.items() if v is not None}
    if ENTITIES_KEY in entry or not all(isinstance(v, str) for v in entry.values()):
        raise ValueError(f"gold labels {labels!r}: expected field -> label strings")
    if entities is not None:
        spans = [{"type": e.get("type"), "text": e.get("text")} if isinstance(e, Mapping) else {}
                 for e in entities]
        entry[ENTITIES_KEY] = spans
        if not all(len(e) == 2 and all(isinstance(v, str) and v for v in e.values()) for e in spans):
            raise ValueError(f"gold entities {entities!r}: expected non-empty type/text strings")
    return entry


def load_gold(paths: Iterable[str | Path] | None = None) -> dict[str, str | GoldEntry]:
    """normalised text -> label (a TSV's `label` column) or full answer (a JSONL record's
    `labels` and `entities`, see gold_entry); the first record wins for a repeated text."""
    if paths is None:
        paths = [banking77_dir() / f"{split}.tsv" for split in BANKING77_SPLITS]
    gold: dict[str, str | GoldEntry] = {}
    for path in paths:
        for record in read_records(path):
            value: str | GoldEntry
            if isinstance(record.get("labels"), Mapping) or record.get("entities") is not None:
                value = gold_entry(record.get("labels") or {}, record.get("entities"))
            elif isinstance(record.get("label"), str):
                value = record["label"]
            else:
                raise ValueError(f"{path}: a record with neither 'label' nor 'labels'/'entities'")
            gold.setdefault(dedup_key(record["text"]), value)
    return gold


def _plain_label(entry: str | GoldEntry) -> str | None:
    """A legacy label, or a full answer's first categorical label."""
    if isinstance(entry, str):
        return entry
    return next((v for k, v in entry.items() if k != ENTITIES_KEY and isinstance(v, str)), None)
