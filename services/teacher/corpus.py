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
from typing import Any


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


def read_texts(path: str | Path) -> list[str]:
    return [r["text"] for r in read_records(path)]
