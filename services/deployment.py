"""Several tasks in one process: which tasks, on which topics, with which registry and log.

`TRIAGE_DEPLOYMENT_PATH` names a JSON file (example: deploy/tasks.json)::

    {"tasks": [
      {"name": "desk", "task_path": "../schemas/tasks/banking77_desk.json",
       "tickets_topic": "triage.tickets",
       "route": {"field": "desk", "to": {"cards": "cards", "payments": "intents"}}},
      {"name": "intents", "task_path": "../schemas/tasks/banking77.json"},
      {"name": "cards", "task_path": "../schemas/tasks/banking77_tickets.json",
       "settings": {"eval_share": 0.1}}
    ]}

Each task gets, unless its entry says otherwise, topics `triage.<name>.{tickets,results,
dead-letter,escalations,feedback}`, consumer groups `triage.<name>` / `triage-teacher.<name>` /
`triage-feedback.<name>`, its own
adapter registry `<TRIAGE_REGISTRY_DIR>/<name>` and training log `<TRIAGE_DATA_DIR>/<name>`.
`settings` overrides any other TRIAGE_ setting for that task (thresholds, audit rate, teacher
endpoint, ...). Engine settings are the process's: one engine serves every task. Relative
paths (task_path, registry_dir, data_dir) are the file's own folder's (deploy/: hence `../`).
Topics, consumer groups, registry and data dirs must differ between tasks (`check_unique`).
A task with a teacher of its own (`settings.teacher_base_url`) names its model
(`settings.teacher_model`) and the environment variable holding its key (`teacher_api_key_env`):
the process's TRIAGE_TEACHER_API_KEY is never sent to another host, and no key is read from
the file.

The file itself must be valid (a bad file stops the process at once); a task whose TaskSpec
fails to load fails only that task (services/stream/swarm.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from services.settings import Settings
    from schemas.forwarding import Router

# Process-wide: one engine, one broker connection, one metrics port for every task.
ENGINE_SETTINGS = frozenset({
    "bootstrap_servers", "model_path", "dtype", "block_size", "enforce_eager", "max_model_len",
    "max_num_seqs", "max_lora_rank", "max_loras", "max_cpu_loras", "gpu_memory_utilization",
    "cpu_kv_cache_gib", "cpu_reserved_cores", "cpu_kernel_cache_entries", "seed", "metrics_port",
    "metrics_host", "control_topic", "role", "deployment_path", "log_level", "log_format",
})


# Settings renamed since: a deployment file may still use the old name.
RENAMED_SETTINGS = {"audit_rate": "eval_share"}


class RouteSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str = Field(min_length=1, description="the router's categorical field that picks the next task")
    to: dict[str, str] = Field(min_length=1, description="label -> task name (other labels stay here)")


class TaskDeployment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,39}$")
    task_path: Path
    tickets_topic: str | None = None
    results_topic: str | None = None
    dead_letter_topic: str | None = None
    escalations_topic: str | None = None
    consumer_group: str | None = None
    teacher_consumer_group: str | None = None
    registry_dir: Path | None = None
    data_dir: Path | None = None
    route: RouteSpec | None = None
    # The environment variable holding this task's teacher API key (its own teacher_base_url
    # needs one): a secret stays in the secret store, out of the file.
    teacher_api_key_env: str | None = Field(default=None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    settings: dict[str, Any] = Field(default_factory=dict)

    @field_validator("settings")
    @classmethod
    def _known_settings(cls, value: dict[str, Any]) -> dict[str, Any]:
        from services.settings import Settings

        value = {RENAMED_SETTINGS.get(k, k): v for k, v in value.items()}  # older files keep working
        unknown = sorted(set(value) - set(Settings.model_fields))
        shared = sorted(set(value) & ENGINE_SETTINGS)
        if unknown:
            raise ValueError(f"unknown settings {unknown}")
        if shared:
            raise ValueError(f"settings {shared} are the process's (one engine for every task)")
        if "teacher_api_key" in value:
            raise ValueError("a key does not belong in the deployment file: name the environment "
                             "variable holding it with teacher_api_key_env")
        return value

    @model_validator(mode="after")
    def _own_teacher(self) -> TaskDeployment:
        # The process's key (and model) are for the process's teacher: sent to this task's own
        # host they would leak (and name a model that host may not serve).
        if self.settings.get("teacher_base_url"):
            missing = [k for k, have in (("teacher_api_key_env", self.teacher_api_key_env),
                                         ("settings.teacher_model", self.settings.get("teacher_model"))) if not have]
            if missing:
                raise ValueError(f"task {self.name!r} has a teacher_base_url of its own: it needs "
                                 f"{' and '.join(missing)} too (the process's TRIAGE_TEACHER_API_KEY "
                                 "and TRIAGE_TEACHER_MODEL are never sent to another host)")
        return self


class Deployment(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[TaskDeployment] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self) -> Deployment:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique: {names}")
        for t in self.tasks:
            if t.route is None:
                continue
            for label, target in t.route.to.items():
                if target not in names or target == t.name:
                    raise ValueError(f"task {t.name!r}: route {label!r} -> {target!r} names no other task")
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> Deployment:
        """Relative paths in the file are its own folder's, not the working directory's: the
        same file works from a checkout, inside the image and in a ConfigMap beside its TaskSpecs."""
        path = Path(path)
        return cls.model_validate(json.loads(path.read_text(encoding="utf-8"))).resolved(path.absolute().parent)

    def resolved(self, base: Path) -> Deployment:
        """Every task's relative task_path, registry_dir and data_dir taken as under `base`."""
        def under(p: Path | None) -> Path | None:
            return p if p is None or p.is_absolute() else base / p

        return self.model_copy(update={"tasks": [
            t.model_copy(update={k: under(getattr(t, k)) for k in ("task_path", "registry_dir", "data_dir")})
            for t in self.tasks]})

    def task(self, name: str) -> TaskDeployment:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task {name!r} in the deployment (tasks: {[t.name for t in self.tasks]})")

    def task_settings(self, base: Settings, name: str, *, with_key: bool = True) -> Settings:
        """The Settings one task runs with: the process's, with the task's topics, groups,
        registry, training log, teacher key and overrides. Loads nothing (the TaskSpec is read
        later); a task's missing key variable fails that task (ValueError) only."""
        t = self.task(name)
        prefix = f"triage.{t.name}"
        values: dict[str, Any] = {
            "task_path": t.task_path,
            "tickets_topic": t.tickets_topic or f"{prefix}.tickets",
            "results_topic": t.results_topic or f"{prefix}.results",
            "dead_letter_topic": t.dead_letter_topic or f"{prefix}.dead-letter",
            "escalations_topic": t.escalations_topic or f"{prefix}.escalations",
            "feedback_topic": f"{prefix}.feedback",
            "feedback_consumer_group": f"triage-feedback.{t.name}",
            "consumer_group": t.consumer_group or prefix,
            "teacher_consumer_group": t.teacher_consumer_group or f"triage-teacher.{t.name}",
            "registry_dir": t.registry_dir or base.registry_dir / t.name,
            "data_dir": t.data_dir or base.data_dir / t.name,
            **t.settings,
        }
        if t.teacher_api_key_env and with_key:
            key = os.environ.get(t.teacher_api_key_env)
            if key is None:
                raise ValueError(f"task {t.name!r}: teacher_api_key_env names {t.teacher_api_key_env}, "
                                 "which is not set")
            values["teacher_api_key"] = key
        merged = {**base.model_dump(), **values}
        return type(base).model_validate(merged)

    def check_unique(self, base: Settings) -> Deployment:
        """ValueError unless every task has its own topics, consumer groups, registry and data
        dirs: on one results topic tasks overwrite each other's answers (same key), in one group
        they take each other's partitions, on one registry or training log they serve and train
        each other's adapters. The control topic is the process's, shared by design."""
        owner: dict[tuple[str, str], str] = {("topic", base.control_topic): "the process's control_topic"}
        clashes = []
        for t in self.tasks:
            s = self.task_settings(base, t.name, with_key=False)
            for kind, name in [("topic", "tickets_topic"), ("topic", "results_topic"),
                               ("topic", "dead_letter_topic"), ("topic", "escalations_topic"),
                               ("topic", "feedback_topic"), ("group", "feedback_consumer_group"),
                               ("group", "consumer_group"), ("group", "teacher_consumer_group"),
                               ("dir", "registry_dir"), ("dir", "data_dir")]:
                value = str(Path(getattr(s, name)).resolve()) if kind == "dir" else getattr(s, name)
                here = f"task {t.name!r} {name}"
                if (kind, value) in owner:
                    clashes.append(f"{here} {value!r} is also {owner[kind, value]}")
                owner.setdefault((kind, value), here)
        if clashes:
            raise ValueError("each task needs topics, consumer groups, registry_dir and data_dir of "
                             "its own: " + "; ".join(clashes))
        return self

    def router(self, base: Settings, name: str, inputs: dict[str, frozenset[str]] | None = None) -> Router | None:
        """`inputs`: task -> its TaskSpec's input names, for the tasks whose spec loaded."""
        from schemas.forwarding import Router

        t = self.task(name)
        if t.route is None:
            return None
        topics = {target: self.task_settings(base, target, with_key=False).tickets_topic
                  for target in set(t.route.to.values())}
        return Router(task=t.name, field=t.route.field, targets=dict(t.route.to), topics=topics,
                      inputs=dict(inputs or {}))

    def engine_loras(self) -> int:
        """Adapters one engine step must hold: each task's live one + one being swapped in."""
        return 2 * len(self.tasks)


def settings_for(task: str | None, deployment_path: str | Path | None = None) -> Settings:
    """The Settings of `task` in the process's deployment (TRIAGE_DEPLOYMENT_PATH, or
    `deployment_path`); with no task, the process's own (the single-task layout)."""
    from services.settings import Settings

    base = Settings()
    if task is None:
        return base
    path = deployment_path or base.deployment_path
    if path is None:
        raise ValueError(f"--task {task}: no deployment file (set TRIAGE_DEPLOYMENT_PATH or pass --deployment)")
    return Deployment.from_file(path).check_unique(base).task_settings(base, task)
