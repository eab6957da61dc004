"""Reading ticket files users bring (historical exports, held-out sets): TSV or JSON Lines.

- `.tsv` (anything but `.jsonl`/`.json`): a header row, tab-separated, the csv module's
  default quoting; a `text` column, and optionally one column per field (or `label`).
- `.jsonl`: one JSON object per line with a `text` key (and optionally `labels`).
Blank texts are skipped. The one reader for the bootstrap, the trainer and the dev datasets.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Sequence


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a TSV or JSONL file as dicts, in file order; rows with a blank `text` are dropped."""
    path = Path(path)
    if path.suffix in (".jsonl", ".json"):
        records = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{path}:{number}: expected an object with a 'text' string")
                records.append(record)
    else:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if not reader.fieldnames or "text" not in reader.fieldnames:
                raise ValueError(f"{path}: expected a header row with a 'text' column")
            records = list(reader)
    return [r for r in records if isinstance(r.get("text"), str) and r["text"].strip()]


def read_texts(path: str | Path, inputs: Sequence[Any] = ()) -> list[str]:
    """Each record's text as the models see it: with the task's `inputs` (InputSpecs) and a
    `subject` column composed exactly as a ticket from Kafka is (schemas.ticket.Ticket.full_text)."""
    from schemas.ticket import Ticket

    names = {i.name for i in inputs}
    out = []
    for r in read_records(path):
        if not names and not r.get("subject"):
            out.append(r["text"])
            continue
        extra = {k: v for k, v in r.items() if k in names and v not in (None, "")}
        out.append(Ticket(id="-", text=r["text"], subject=r.get("subject") or None, **extra).full_text(inputs))
    return out
