"""What a deployment must say before it runs: a teacher URL names its model, tasks do not
share topics, groups or dirs, a task's own teacher gets a key of its own (never the
process's), and /metrics binds the configured address."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from services.deployment import Deployment, settings_for
from services.settings import Settings

REPO = Path(__file__).resolve().parents[2]
TASK = str(REPO / "schemas/tasks/banking77.json")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    for key in [k for k in os.environ if k.startswith(("TRIAGE_", "OPENAI_"))]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no .env of the checkout
    return monkeypatch


def base(tmp_path, **values) -> Settings:
    return Settings(_env_file=None, bootstrap_servers="127.0.0.1:9", registry_dir=tmp_path / "reg",
                    data_dir=tmp_path / "data", **values)


def test_a_teacher_url_without_a_model_is_refused_naming_the_setting(clean_env):
    clean_env.setenv("TRIAGE_TEACHER_BASE_URL", "https://api.example.com/v1")
    with pytest.raises(ValidationError, match="TRIAGE_TEACHER_MODEL"):
        Settings()
    clean_env.setenv("TRIAGE_TEACHER_MODEL", "gpt-4o-mini")
    assert Settings().teacher_model == "gpt-4o-mini"
    clean_env.delenv("TRIAGE_TEACHER_BASE_URL")
    clean_env.delenv("TRIAGE_TEACHER_MODEL")
    assert Settings().teacher_model == ""  # no teacher: nothing to name


@pytest.mark.parametrize("second, clash", [
    ({"results_topic": "triage.a.results"}, "results_topic 'triage.a.results' is also task 'a' results_topic"),
    ({"settings": {"consumer_group": "triage.a"}}, "consumer_group 'triage.a' is also task 'a' consumer_group"),
    ({"escalations_topic": "triage.control"}, "is also the process's control_topic"),
    ({"registry_dir": "REG/a"}, "registry_dir"),
    ({"data_dir": "DATA/a"}, "data_dir"),
])
def test_tasks_sharing_a_topic_group_or_dir_are_refused_naming_both(tmp_path, second, clash):
    second = {k: v.replace("REG", str(tmp_path / "reg")).replace("DATA", str(tmp_path / "data"))
              if isinstance(v, str) else v for k, v in second.items()}
    deployment = Deployment.model_validate({"tasks": [
        {"name": "a", "task_path": TASK}, {"name": "b", "task_path": TASK, **second}]})
    with pytest.raises(ValueError, match="each task needs") as info:
        deployment.check_unique(base(tmp_path))
    assert clash in str(info.value) and "task 'b'" in str(info.value)
    from services.stream.swarm import SwarmService, plan_task_topics

    with pytest.raises(ValueError, match="each task needs"):
        SwarmService(base(tmp_path), deployment)  # the process stops: not one task failing
    with pytest.raises(ValueError, match="each task needs"):
        plan_task_topics(base(tmp_path), deployment)  # before --create-topics creates anything


def test_the_example_deployment_and_distinct_tasks_pass(tmp_path):
    assert Deployment.from_file(REPO / "deploy" / "tasks.json").check_unique(base(tmp_path))
    Deployment.model_validate({"tasks": [{"name": "a", "task_path": TASK}, {"name": "b", "task_path": TASK}]}) \
        .check_unique(base(tmp_path))


OWN = {"teacher_base_url": "https://other.example.com/v1", "teacher_model": "other-model"}


@pytest.mark.parametrize("entry, why", [
    ({"settings": OWN}, "needs teacher_api_key_env"),
    ({"settings": {"teacher_base_url": OWN["teacher_base_url"]}, "teacher_api_key_env": "K"},
     "needs settings.teacher_model"),
    ({"settings": {**OWN, "teacher_api_key": "sk-in-a-file"}}, "does not belong in the deployment file"),
    ({"teacher_api_key_env": "not a name"}, "pattern"),
])
def test_a_task_teacher_of_its_own_needs_its_own_key_variable_and_model(entry, why):
    with pytest.raises(ValidationError, match=why):
        Deployment.model_validate({"tasks": [{"name": "a", "task_path": TASK, **entry}]})


def test_the_process_key_never_goes_to_a_tasks_own_teacher(tmp_path, clean_env):
    process = base(tmp_path, teacher_base_url="https://main.example.com/v1", teacher_model="main-model",
                   teacher_api_key="sk-process")
    deployment = Deployment.model_validate({"tasks": [
        {"name": "own", "task_path": TASK, "teacher_api_key_env": "OWN_TEACHER_KEY", "settings": OWN},
        {"name": "main", "task_path": TASK}]})
    with pytest.raises(ValueError, match="OWN_TEACHER_KEY, which is not set"):
        deployment.task_settings(process, "own")
    assert deployment.check_unique(process)  # a missing key fails that task, not the file
    clean_env.setenv("OWN_TEACHER_KEY", "sk-own")
    own, main = deployment.task_settings(process, "own"), deployment.task_settings(process, "main")
    assert (own.teacher_base_url, own.teacher_model, own.teacher_api_key.get_secret_value()) == \
        (OWN["teacher_base_url"], "other-model", "sk-own")
    assert (main.teacher_base_url, main.teacher_api_key.get_secret_value()) == \
        ("https://main.example.com/v1", "sk-process")


def test_settings_for_a_task_checks_the_whole_file(tmp_path, clean_env):
    path = tmp_path / "tasks.json"
    path.write_text('{"tasks": [{"name": "a", "task_path": "%s"}, {"name": "b", "task_path": "%s", '
                    '"consumer_group": "triage.a"}]}' % (TASK, TASK))
    with pytest.raises(ValueError, match="consumer_group 'triage.a'"):
        settings_for("b", path)


async def test_metrics_bind_the_configured_address(tmp_path, monkeypatch):
    """Both a single-task replica and a multi-task process pass TRIAGE_METRICS_HOST on."""
    import services.stream.metrics as metrics_module
    from services.stream.app import TriageService
    from services.stream.swarm import SwarmService

    bound = []

    @contextlib.asynccontextmanager
    async def serve_metrics(metrics, host, port, *args, **kwargs):
        bound.append(host)
        yield 1

    monkeypatch.setattr(metrics_module, "serve_metrics", serve_metrics)
    settings = base(tmp_path, metrics_port=19464, metrics_host="127.0.0.1", role="teacher", teacher_base_url="")
    async with TriageService(settings).resources():
        pass
    deployment = Deployment.model_validate({"tasks": [{"name": "a", "task_path": TASK}]})
    async with SwarmService(settings, deployment).resources():
        pass
    assert bound == ["127.0.0.1", "127.0.0.1"]
    assert Settings(_env_file=None).metrics_host == "0.0.0.0"  # the default: probes reach the pod IP
