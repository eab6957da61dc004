"""What a demo streams and teaches: BANKING77 intents (`make demo`) or the example ticket task
(category + priority + entities, `triage demo --task tickets`). Test tickets are never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass
class DemoData:
    name: str
    task_path: Path
    train: list[tuple[str, dict[str, Any]]]  # history (bootstrap) or live traffic (--no-bootstrap)
    test: list[tuple[str, dict[str, Any]]]  # fresh tickets with their gold answers
    gold_paths: list[Path] | None  # what the stand-in answers from (None: BANKING77's TSVs)
    entity_rules: Callable[[str], list[dict[str, str]]] | None
    blurb: str  # what the stand-in's answers are, in one sentence

    @property
    def train_texts(self) -> list[str]:
        return [text for text, _ in self.train]


def banking77() -> DemoData:
    from schemas.task import TaskSpec, default_task_path
    from services.dev.datasets import load_split

    field = TaskSpec.from_file(default_task_path()).fields[0].name
    return DemoData(
        "BANKING77", default_task_path(), [(r.text, {field: r.label}) for r in load_split("train")],
        [(r.text, {field: r.label}) for r in load_split("test")], None, None,
        "it answers from BANKING77's labels (not a model)")


def tickets(folder: Path) -> DemoData:
    from services.dev.ticket_dataset import TICKET_TASK_PATH, extract_entities, write_ticket_dataset
    from services.teacher.corpus import read_records

    paths = write_ticket_dataset(folder)
    test, train = ([(r["text"], {**r["labels"], "entities": r["entities"]}) for r in read_records(paths[split])]
                   for split in ("test", "train"))
    return DemoData(
        "BANKING77-ticket", TICKET_TASK_PATH, train, test, list(paths.values()), extract_entities,
        "it answers from BANKING77's intent labels plus RULE-MADE priority and entities "
        "(services/dev/ticket_dataset.py), not a model")


DATASETS: dict[str, Callable[[Path], DemoData]] = {
    "banking77": lambda folder: banking77(),
    "tickets": tickets,
}
