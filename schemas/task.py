"""TaskSpec: what to classify. Loaded from a JSON file; the service hard-codes no task."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator


def default_task_path() -> Path:
    return Path(__file__).parent / "tasks" / "banking77.json"


class FieldSpec(BaseModel):
    """A categorical output field (category, priority, ...)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    description: str
    labels: list[str] = Field(min_length=2)

    @model_validator(mode="after")
    def _unique_labels(self) -> FieldSpec:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"field {self.name!r} has duplicate labels")
        return self


class FewShotExample(BaseModel):
    text: str
    labels: dict[str, str]


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    instructions: str
    fields: list[FieldSpec] = Field(min_length=1)
    examples: list[FewShotExample] = Field(default_factory=list, description="teacher few-shot")

    @model_validator(mode="after")
    def _examples_use_known_labels(self) -> TaskSpec:
        names = {f.name for f in self.fields}
        if len(names) != len(self.fields):
            raise ValueError("duplicate field names")
        for example in self.examples:
            for field_name, label in example.labels.items():
                if field_name not in names or label not in self.field(field_name).labels:
                    raise ValueError(f"few-shot example uses unknown {field_name}={label!r}")
        return self

    def field(self, name: str) -> FieldSpec:
        for spec in self.fields:
            if spec.name == name:
                return spec
        raise KeyError(name)

    @classmethod
    def from_file(cls, path: str | Path) -> TaskSpec:
        return cls.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))
