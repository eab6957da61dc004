"""TaskSpec: what to classify and extract. Loaded from a JSON file; the service hard-codes no task.

Field types:
- `categorical` (the default when `type` is absent): one label out of `labels`. The student
  answers it with ONE output token (services/student/prompting.py): the fast path.
- `entities`: a list of typed spans `{"type", "text"}` copied from the ticket, the types
  declared in `entity_types`. The student generates them as JSON under vLLM structured outputs;
  only tasks that declare such a field pay for it. At most one per task.
`inputs`: extra ticket fields (`subject`, `product`, `reporter`, ...) the prompt shows before the
ticket text as `Name: value` lines; a ticket may carry exactly these besides the standard ones.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

NAME_PATTERN = r"^[a-z][a-z0-9_]*$"


def default_task_path() -> Path:
    return Path(__file__).parent / "tasks" / "banking77.json"


class Entity(BaseModel):
    """One extracted span: `text` occurs verbatim in the ticket; `type` is declared by the task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    text: str = Field(min_length=1)


class FieldSpec(BaseModel):
    """A categorical output field (category, priority, ...)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["categorical"] = "categorical"
    name: str = Field(pattern=NAME_PATTERN)
    description: str
    labels: list[str] = Field(min_length=2)

    @model_validator(mode="after")
    def _unique_labels(self) -> FieldSpec:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"field {self.name!r} has duplicate labels")
        return self


class EntityType(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    description: str


class EntityFieldSpec(BaseModel):
    """An entities output field: typed spans copied from the ticket text."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["entities"]
    name: str = Field(pattern=NAME_PATTERN)
    description: str
    entity_types: list[EntityType] = Field(min_length=1)
    max_entities: int = Field(default=8, ge=1, le=64)
    max_span_chars: int = Field(default=48, ge=1, le=500)

    @model_validator(mode="after")
    def _unique_types(self) -> EntityFieldSpec:
        names = [t.name for t in self.entity_types]
        if len(set(names)) != len(names):
            raise ValueError(f"field {self.name!r} has duplicate entity types")
        return self

    @property
    def type_names(self) -> list[str]:
        return [t.name for t in self.entity_types]


def _field_kind(value: Any) -> str:
    kind = value.get("type", "categorical") if isinstance(value, dict) else getattr(value, "type", "categorical")
    return kind if kind in ("categorical", "entities") else "categorical"


AnyField = Annotated[
    Union[Annotated[FieldSpec, Tag("categorical")], Annotated[EntityFieldSpec, Tag("entities")]],
    Discriminator(_field_kind),
]


class InputSpec(BaseModel):
    """An extra ticket field shown to the models as `<label>: <value>` before the ticket text."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    label: str = Field(default="", description="shown in the prompt; default: the name, capitalised")

    @property
    def shown_as(self) -> str:
        return self.label or self.name.replace("_", " ").capitalize()


class FewShotExample(BaseModel):
    text: str
    labels: dict[str, str]
    entities: list[Entity] | None = None  # for a task with an entities field; None = not given


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    instructions: str
    inputs: list[InputSpec] = Field(default_factory=list)
    fields: list[AnyField] = Field(min_length=1)
    examples: list[FewShotExample] = Field(default_factory=list, description="teacher few-shot")

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        names = {f.name for f in self.fields}
        if len(names) != len(self.fields):
            raise ValueError("duplicate field names")
        if sum(isinstance(f, EntityFieldSpec) for f in self.fields) > 1:
            raise ValueError("at most one entities field per task")
        reserved = {"id", "text", "subject", "created_at", "metadata"}
        clash = [i.name for i in self.inputs if i.name in reserved]
        if clash:
            raise ValueError(f"inputs {clash} are standard ticket fields; list extra ones only")
        for example in self.examples:
            for field_name, label in example.labels.items():
                spec = next((f for f in self.categorical_fields if f.name == field_name), None)
                if spec is None or label not in spec.labels:
                    raise ValueError(f"few-shot example uses unknown {field_name}={label!r}")
            entity = self.entity_field
            for span in example.entities or []:
                if entity is None or span.type not in entity.type_names or span.text not in example.text:
                    raise ValueError(f"few-shot example has an invalid entity {span}")
        return self

    @property
    def categorical_fields(self) -> list[FieldSpec]:
        return [f for f in self.fields if isinstance(f, FieldSpec)]

    @property
    def entity_field(self) -> EntityFieldSpec | None:
        return next((f for f in self.fields if isinstance(f, EntityFieldSpec)), None)

    @property
    def field_names(self) -> list[str]:
        return [f.name for f in self.fields]

    def field(self, name: str) -> FieldSpec | EntityFieldSpec:
        for spec in self.fields:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def fingerprint_json(self) -> str:
        """The whole task, teacher material included: the evaluation cache's key and what
        adapters trained before the student-only fingerprint recorded (services/student/
        prompting.py `student_view` is what adapters record now). A categorical-only task
        without inputs dumps exactly as before field types existed: keep this dump stable."""
        data = self.model_dump(mode="json")
        if not self.inputs:
            data.pop("inputs")
        for spec in data["fields"]:
            if spec["type"] == "categorical":
                spec.pop("type")
        for example in data["examples"]:
            if example.get("entities") is None:
                example.pop("entities", None)
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_file(cls, path: str | Path) -> TaskSpec:
        return cls.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))
