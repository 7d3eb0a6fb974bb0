"""Kubernetes manifests (deploy/k8s): every overlay builds with kustomize, every object it
renders passes the strict Kubernetes schema of the oldest and newest versions supported, and
the rendered objects have the shape the service needs (probes, ports, resources, autoscaling,
a single beat, the migration Job, configuration that the real settings accept).

The checks are functions over the rendered objects; `test_a_broken_requirement_is_caught`
breaks each requirement in a copy and asserts its check fails, so none of them can pass
vacuously.
"""

from __future__ import annotations

import base64
import copy
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml  # type: ignore[import-untyped]
from pydantic import BaseModel, ValidationError
from pydantic_settings import BaseSettings

from taskapp.cli.migrate import cmd_migrate
from taskapp.cli.parser import build_parser
from taskapp.cli.serve import cmd_serve
from taskapp.cli.worker import cmd_beat, cmd_worker
from taskapp.config import Settings
from taskapp.system.router import PROBE_TIMEOUT
from tests.fixtures.tools import kustomize

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "k8s"
OVERLAYS = tuple(
    sorted(p.name for p in (K8S_DIR / "overlays").iterdir() if (p / "kustomization.yaml").exists())
)
# The oldest Kubernetes the manifests support (the preStop `sleep` action is on by default
# from 1.30) and the newest that kubernetes-validate carries schemas for.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
IMAGE = "ghcr.io/taskapp/taskapp"
API, WORKER, BEAT, MIGRATE = "taskapp-api", "taskapp-worker", "taskapp-beat", "taskapp-migrate"
CONFIG_MAP, SECRET = "taskapp-config", "taskapp-secrets"
# Settings that are secrets: in the Secret, never in the ConfigMap.
SECRET_KEYS = {
    "TASKAPP_DATABASE_URL",
    "TASKAPP_REDIS_URL",
    "TASKAPP_BROKER_URL",
    "TASKAPP_SMTP_USERNAME",
    "TASKAPP_SMTP_PASSWORD",
    "TASKAPP_METRICS_TOKEN",
}
# Every container gets a writable /tmp of its own (an emptyDir): the root is read-only.
TMP = "/tmp"  # noqa: S108
# Environment variables the pods set that are not taskapp settings.
OTHER_ENV = {"PROMETHEUS_MULTIPROC_DIR"}


def _scrape_token_if_served(settings: Settings) -> object:
    """In production `taskapp worker|beat` serve /metrics only with the scrape token."""
    return settings.metrics_token if settings.worker.metrics_port is not None else "no listener"


# What each command refuses to start without (taskapp/cli/).
REQUIRED_SETTINGS: dict[str, tuple[Callable[[Settings], object], ...]] = {
    "serve": (lambda s: s.database.url, lambda s: s.redis.url, lambda s: s.oidc.issuer),
    "worker": (
        lambda s: s.database.url,
        lambda s: s.celery_broker_url,
        lambda s: s.smtp.url,
        _scrape_token_if_served,
    ),
    "beat": (
        lambda s: s.database.url,
        lambda s: s.celery_broker_url,
        lambda s: s.smtp.url,
        _scrape_token_if_served,
    ),
    "migrate": (lambda s: s.database.url,),
}
POD_TEMPLATE_KINDS = {"Deployment", "Job"}

Objects = list[dict[str, Any]]


# --- rendering -----------------------------------------------------------------------------


def example_secrets(overlay: str) -> dict[str, str]:
    """The overlay's committed secret.env.example, as the variables it sets."""
    return read_env_file(K8S_DIR / "overlays" / overlay / "secret.env.example")


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value
    return values


def stand_in_secret(name: str) -> str:
    """A stand-in for a real secret: not a placeholder that production refuses."""
    return f"k8s-test-{name.lower().replace('_', '-')}-0123456789"


def render(overlay: str, workdir: Path) -> Objects:
    """The kustomize build of the overlay, with a secret.env made from its example (the real
    one is never in git): each placeholder password replaced, as an operator would."""
    tree = workdir / "k8s"
    shutil.copytree(K8S_DIR, tree, ignore=shutil.ignore_patterns("secret.env"))
    lines = []
    for name, value in example_secrets(overlay).items():
        lines.append(f"{name}={value.replace('changethis', stand_in_secret(name))}")
    (tree / "overlays" / overlay / "secret.env").write_text("\n".join(lines) + "\n")
    result = subprocess.run(
        [*kustomize(), str(tree / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kustomize {overlay}:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Objects]:
    return {overlay: render(overlay, tmp_path_factory.mktemp(overlay)) for overlay in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def objects(request: pytest.FixtureRequest, rendered: dict[str, Objects]) -> Objects:
    """One overlay's objects; a deep copy, so a test may change them."""
    return copy.deepcopy(rendered[request.param])


# --- lookups -------------------------------------------------------------------------------


def find(objects: Objects, kind: str, name: str) -> dict[str, Any]:
    """The object of that kind and name (generated ConfigMaps and Secrets: name-<hash>)."""
    found = [
        obj
        for obj in objects
        if obj["kind"] == kind
        and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", obj["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_templates(objects: Objects) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(owner, pod template) of every Deployment and Job."""
    for obj in objects:
        if obj["kind"] in POD_TEMPLATE_KINDS:
            yield obj, obj["spec"]["template"]


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def container(objects: Objects, kind: str, name: str) -> dict[str, Any]:
    main: dict[str, Any]
    [main] = find(objects, kind, name)["spec"]["template"]["spec"]["containers"]
    return main


def command_of(main: dict[str, Any]) -> Any:
    """The container's arguments as the real `taskapp` parser reads them."""
    assert main["command"] == ["taskapp"], main["command"]
    return build_parser().parse_args(main["args"])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def resolve_port(main: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in main.get("ports", []) if p.get("name") == port]
    return int(number)


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|k|M|G)?$")
_FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(value: str | int) -> float:
    match = _QUANTITY.match(str(value))
    assert match, f"not a resource quantity: {value!r}"
    return float(match.group(1)) * _FACTORS[match.group(2)]


def config_data(objects: Objects) -> dict[str, str]:
    return dict(find(objects, "ConfigMap", CONFIG_MAP)["data"])


def secret_data(objects: Objects) -> dict[str, str]:
    data = find(objects, "Secret", SECRET)["data"]
    return {key: base64.b64decode(value).decode() for key, value in data.items()}


def container_env(objects: Objects, main: dict[str, Any]) -> dict[str, str]:
    """The environment the kubelet would give the container (references resolved)."""
    env: dict[str, str] = {}
    for source in main.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_data(objects))
        if "secretRef" in source:
            env.update(secret_data(objects))
    for variable in main.get("env", []):
        reference = variable.get("valueFrom", {})
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        elif "secretKeyRef" in reference:
            env[variable["name"]] = secret_data(objects)[reference["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in reference:
            env[variable["name"]] = config_data(objects)[reference["configMapKeyRef"]["key"]]
    return env


def setting_names() -> set[str]:
    """Every environment variable that taskapp's Settings read."""
    names: set[str] = set()

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            kind = field.annotation
            if isinstance(kind, type) and issubclass(kind, BaseSettings):
                walk(kind, str(kind.model_config.get("env_prefix", "")))
            elif isinstance(field.validation_alias, str):
                names.add(field.validation_alias.upper())
            else:
                names.add(f"{prefix}{name}".upper())

    walk(Settings, str(Settings.model_config.get("env_prefix", "")))
    return names


def test_the_overlays_are_staging_and_production() -> None:
    assert set(OVERLAYS) >= {"staging", "production"}


def test_setting_names_are_the_documented_ones() -> None:
    names = setting_names()
    assert {
        "TASKAPP_ENV",
        "TASKAPP_DATABASE_URL",
        "TASKAPP_REDIS_URL",
        "TASKAPP_BROKER_URL",
        "TASKAPP_OIDC_ISSUER",
        "TASKAPP_RATE_LIMIT",
        "TASKAPP_RATE_LIMIT_ANONYMOUS",
        "TASKAPP_TRUSTED_PROXIES",
        "TASKAPP_SMTP_URL",
        "TASKAPP_METRICS_TOKEN",
    } <= names
    assert "TASKAPP_RATELIMIT" not in names
    assert "TASKAPP_RATE_LIMIT_PER_USER" not in names


# --- the checks ----------------------------------------------------------------------------


def check_inventory(objects: Objects) -> None:
    """The objects the deployment needs, each once."""
    for kind, name in [
        ("Namespace", None),
        ("ServiceAccount", "taskapp"),
        ("ConfigMap", CONFIG_MAP),
        ("Secret", SECRET),
        ("Service", API),
        ("Deployment", API),
        ("HorizontalPodAutoscaler", API),
        ("PodDisruptionBudget", API),
        ("Deployment", WORKER),
        ("Deployment", BEAT),
        ("Job", MIGRATE),
    ]:
        if name is None:
            assert sum(obj["kind"] == kind for obj in objects) == 1, kind
        else:
            find(objects, kind, name)
    namespace = next(obj for obj in objects if obj["kind"] == "Namespace")["metadata"]["name"]
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == namespace, obj["metadata"]["name"]


def check_api(objects: Objects) -> None:
    """`taskapp serve` on one port that the probes, the Service and the scrape all use."""
    deployment = find(objects, "Deployment", API)
    pod = deployment["spec"]["template"]
    main = container(objects, "Deployment", API)
    args = command_of(main)
    assert args.func is cmd_serve
    # Reachable from the kubelet (probes) and the Service, not just the pod itself.
    assert args.host == "0.0.0.0"  # noqa: S104
    assert args.workers >= 1
    port = args.port
    assert [p["containerPort"] for p in main["ports"]] == [port]

    probes = {kind: main.get(kind) for kind in ("readinessProbe", "livenessProbe", "startupProbe")}
    assert probes["readinessProbe"] is not None, "no readiness probe"
    assert probes["livenessProbe"] is not None, "no liveness probe"
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for kind, probe in probes.items():
        if probe is None:
            continue
        assert resolve_port(main, probe["httpGet"]["port"]) == port, kind
        assert probe["httpGet"].get("scheme", "HTTP") == "HTTP", kind
    # /readyz waits up to PROBE_TIMEOUT for PostgreSQL and Redis: a shorter probe would flap.
    assert probes["readinessProbe"].get("timeoutSeconds", 1) > PROBE_TIMEOUT
    # The liveness probe must not restart pods for a slow start.
    startup = probes["startupProbe"]
    if startup is not None:
        assert startup["httpGet"]["path"] == "/healthz"
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 30

    service = find(objects, "Service", API)
    assert selects(service["spec"]["selector"], pod["metadata"]["labels"])
    [service_port] = service["spec"]["ports"]
    assert resolve_port(main, service_port["targetPort"]) == port

    annotations = pod["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/port") == str(port)
    assert annotations.get("prometheus.io/path") == "/metrics"

    # The HPA owns the replica count; an applied value would reset it on every apply.
    assert "replicas" not in deployment["spec"], "the API Deployment sets replicas"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def check_graceful_shutdown(objects: Objects) -> None:
    """Endpoints drain before the API stops, and uvicorn's own grace fits in the pod's."""
    pod = find(objects, "Deployment", API)["spec"]["template"]["spec"]
    main = container(objects, "Deployment", API)
    pre_stop = main["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pre_stop >= 5
    source = (ROOT / "taskapp" / "cli" / "serve.py").read_text()
    match = re.search(r'"timeout_graceful_shutdown":\s*(\d+)', source)
    assert match, "taskapp serve no longer sets timeout_graceful_shutdown"
    assert pod["terminationGracePeriodSeconds"] > pre_stop + int(match.group(1))
    # Celery's warm shutdown lets running jobs finish; give an SMTP send time to end.
    worker = find(objects, "Deployment", WORKER)["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] >= 60


def check_autoscaling(objects: Objects) -> None:
    """The HPA scales the API Deployment on CPU; the PDB protects the API pods only."""
    api = find(objects, "Deployment", API)
    hpa = find(objects, "HorizontalPodAutoscaler", API)
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": api["metadata"]["name"],
    }
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource"
    assert metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100
    # Utilization is relative to the request: without one the HPA cannot work.
    assert "cpu" in container(objects, "Deployment", API)["resources"]["requests"]

    pdb = find(objects, "PodDisruptionBudget", API)
    selector = pdb["spec"]["selector"]["matchLabels"]
    assert selector == api["spec"]["selector"]["matchLabels"]
    for owner, template in pod_templates(objects):
        name = owner["metadata"]["name"]
        assert selects(selector, template["metadata"]["labels"]) == (name == API), name
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1


def check_workers(objects: Objects) -> None:
    """Workers without beat; beat alone, one replica, never two during a rollout."""
    worker = find(objects, "Deployment", WORKER)
    args = command_of(container(objects, "Deployment", WORKER))
    assert args.func is cmd_worker
    assert args.no_beat, "the worker Deployment runs beat too"
    assert worker["spec"].get("replicas", 1) >= 1

    beat = find(objects, "Deployment", BEAT)
    assert command_of(container(objects, "Deployment", BEAT)).func is cmd_beat
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    hpas = [obj for obj in objects if obj["kind"] == "HorizontalPodAutoscaler"]
    assert all(hpa["spec"]["scaleTargetRef"]["name"] != BEAT for hpa in hpas)
    # Nothing else schedules the sweep.
    for owner, template in pod_templates(objects):
        for main in containers(template["spec"]):
            args = command_of(main)
            runs_beat = args.func is cmd_beat or (args.func is cmd_worker and not args.no_beat)
            assert runs_beat == (owner["metadata"]["name"] == BEAT), owner["metadata"]["name"]


def check_worker_metrics(objects: Objects) -> None:
    """The worker and beat serve their own /metrics, on the port their scrape annotations
    name, to every interface of the pod, behind the scrape token."""
    for name in (WORKER, BEAT):
        pod = find(objects, "Deployment", name)["spec"]["template"]
        main = container(objects, "Deployment", name)
        env = container_env(objects, main)
        port = int(env["TASKAPP_WORKER_METRICS_PORT"])
        assert env.get("TASKAPP_WORKER_METRICS_HOST", "0.0.0.0") == "0.0.0.0", name  # noqa: S104
        assert env.get("TASKAPP_METRICS_TOKEN"), f"{name}: /metrics without the scrape token"
        assert resolve_port(main, "metrics") == port, name
        annotations = pod["metadata"].get("annotations", {})
        assert annotations.get("prometheus.io/scrape") == "true", name
        assert annotations.get("prometheus.io/port") == str(port), name
        assert annotations.get("prometheus.io/path") == "/metrics", name


def check_migration(objects: Objects) -> None:
    """One Job runs `taskapp migrate`, once, and cleans up after itself; nothing else does."""
    job = find(objects, "Job", MIGRATE)
    assert job["apiVersion"] == "batch/v1"
    assert command_of(container(objects, "Job", MIGRATE)).func is cmd_migrate
    spec = job["spec"]
    assert spec.get("parallelism", 1) == 1
    assert spec.get("completions", 1) == 1
    assert 1 <= spec["backoffLimit"] <= 10
    assert spec.get("ttlSecondsAfterFinished", 0) > 0
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    for owner, template in pod_templates(objects):
        for main in containers(template["spec"]):
            is_migrate = command_of(main).func is cmd_migrate
            assert is_migrate == (owner["metadata"]["name"] == MIGRATE), owner["metadata"]["name"]


def check_resources(objects: Objects) -> None:
    """Every container asks for CPU and memory and is bounded in both."""
    for owner, template in pod_templates(objects):
        for main in containers(template["spec"]):
            where = f"{owner['metadata']['name']}/{main['name']}"
            resources = main.get("resources", {})
            for resource in ("cpu", "memory"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                assert request is not None, f"{where}: no {resource} request"
                assert limit is not None, f"{where}: no {resource} limit"
                assert 0 < quantity(request) <= quantity(limit), f"{where}: {resource}"


def check_references(objects: Objects) -> None:
    """Every ConfigMap, Secret, key, volume and service account a pod names exists."""
    config, secrets = config_data(objects), secret_data(objects)
    config_name = find(objects, "ConfigMap", CONFIG_MAP)["metadata"]["name"]
    secret_name = find(objects, "Secret", SECRET)["metadata"]["name"]
    accounts = {obj["metadata"]["name"] for obj in objects if obj["kind"] == "ServiceAccount"}
    for owner, template in pod_templates(objects):
        pod = template["spec"]
        assert pod.get("serviceAccountName") in accounts, owner["metadata"]["name"]
        volumes = {volume["name"] for volume in pod.get("volumes", [])}
        for main in containers(pod):
            where = f"{owner['metadata']['name']}/{main['name']}"
            for source in main.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] == config_name, where
                if "secretRef" in source:
                    assert source["secretRef"]["name"] == secret_name, where
            for variable in main.get("env", []):
                reference = variable.get("valueFrom", {})
                if "secretKeyRef" in reference:
                    ref = reference["secretKeyRef"]
                    assert ref["name"] == secret_name, f"{where}: {variable['name']}"
                    assert ref["key"] in secrets, f"{where}: no Secret key {ref['key']}"
                    assert not ref.get("optional", False), f"{where}: {ref['key']} is optional"
                if "configMapKeyRef" in reference:
                    ref = reference["configMapKeyRef"]
                    assert ref["name"] == config_name, f"{where}: {variable['name']}"
                    assert ref["key"] in config, f"{where}: no ConfigMap key {ref['key']}"
            for mount in main.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{where}: no volume {mount['name']}"


def check_configuration(objects: Objects) -> None:
    """Secrets in the Secret, the rest in the ConfigMap, and every name a real setting."""
    config, secrets = config_data(objects), secret_data(objects)
    known = setting_names()
    assert not SECRET_KEYS & config.keys(), (
        f"secrets in the ConfigMap: {SECRET_KEYS & config.keys()}"
    )
    assert secrets.keys() == SECRET_KEYS
    assert config["TASKAPP_ENV"] == "production"
    assert "@" not in config.get("TASKAPP_SMTP_URL", ""), "SMTP credentials in the ConfigMap"
    for _, template in pod_templates(objects):
        for main in containers(template["spec"]):
            for name in container_env(objects, main):
                assert name in known | OTHER_ENV, f"{main['name']}: {name} is not a setting"


def check_security(objects: Objects) -> None:
    """Pod Security "restricted" in the namespace, and every pod meets it: non-root, no
    escalation, no capabilities, RuntimeDefault seccomp, read-only root, no API token."""
    namespace = next(obj for obj in objects if obj["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for owner, template in pod_templates(objects):
        pod = template["spec"]
        where = owner["metadata"]["name"]
        context = pod.get("securityContext", {})
        assert context.get("runAsNonRoot") is True, where
        assert isinstance(context.get("runAsUser"), int), where
        assert context["runAsUser"] > 0, where
        assert pod.get("automountServiceAccountToken") is False, where
        for host_namespace in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(host_namespace), f"{where}: {host_namespace}"
        for main in containers(pod):
            own = main.get("securityContext", {})
            seccomp = own.get("seccompProfile", context.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            assert own.get("runAsUser", context["runAsUser"]) > 0, where
            assert own.get("runAsNonRoot", True) is True, where
            assert own.get("allowPrivilegeEscalation") is False, where
            assert own.get("privileged", False) is False, where
            assert own.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not own.get("capabilities", {}).get("add"), where
            assert own.get("readOnlyRootFilesystem") is True, where


def check_writable_paths(objects: Objects) -> None:
    """With a read-only root, everything the processes write is on a volume: /tmp, the
    Prometheus multiprocess directory of the API and of the worker's pool, beat's schedule
    file in TASKAPP_DATA_DIR."""
    for owner, template in pod_templates(objects):
        pod = template["spec"]
        empty_dirs = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for main in containers(pod):
            mounts = {
                m["mountPath"]: m["name"]
                for m in main.get("volumeMounts", [])
                if m["name"] in empty_dirs and not m.get("readOnly")
            }
            env = container_env(objects, main)
            where = f"{owner['metadata']['name']}/{main['name']}"
            assert TMP in mounts, f"{where}: {TMP} is not writable"
            args = command_of(main)
            if args.func is cmd_serve or (args.func is cmd_worker and args.pool == "prefork"):
                assert env.get("PROMETHEUS_MULTIPROC_DIR") in mounts, where
            if args.func is cmd_beat:
                assert env.get("TASKAPP_DATA_DIR") in mounts, where


def check_images(objects: Objects) -> None:
    """One image at one pinned tag (or digest) for every container of the release."""
    images = {
        main["image"]
        for _, template in pod_templates(objects)
        for main in containers(template["spec"])
    }
    assert len(images) == 1, images
    [image] = images
    name, _, tag = image.partition("@") if "@" in image else image.rpartition(":")
    assert name == IMAGE, image
    assert tag not in ("", "latest"), f"{image} is not pinned"


CHECKS = [
    check_inventory,
    check_api,
    check_graceful_shutdown,
    check_autoscaling,
    check_workers,
    check_worker_metrics,
    check_migration,
    check_resources,
    check_references,
    check_configuration,
    check_security,
    check_writable_paths,
    check_images,
]


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_rendered_manifests_meet_the_requirements(
    objects: Objects, check: Callable[[Objects], None]
) -> None:
    check(objects)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_passes_the_strict_schema(objects: Objects, version: str) -> None:
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            pytest.fail(
                f"{obj['kind']} {obj['metadata']['name']} ({version}): {where}: {exc.message}"
            )


def test_the_schema_check_rejects_unknown_fields(objects: Objects) -> None:
    # A misspelt field is dropped silently by the API server: strict validation must catch it.
    api = find(objects, "Deployment", API)
    probe = api["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    probe["httpGet"]["paht"] = probe["httpGet"].pop("path")
    with pytest.raises(kubernetes_validate.ValidationError, match="paht"):
        kubernetes_validate.validate(api, KUBERNETES_VERSIONS[0], strict=True)


def clear_settings_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No TASKAPP_* variables from the caller, and no .env file to read."""
    for name in list(os.environ):
        if name.startswith("TASKAPP_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def check_settings(objects: Objects, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each container's environment passes taskapp's own production validation, with what
    its command refuses to start without."""
    clear_settings_env(monkeypatch, tmp_path)
    for owner, template in pod_templates(objects):
        for main in containers(template["spec"]):
            where = f"{owner['metadata']['name']}/{main['name']}"
            command = main["args"][0]
            with monkeypatch.context() as env:
                for name, value in container_env(objects, main).items():
                    env.setenv(name, value)
                settings = Settings()  # production validation: issuer, no placeholders, ...
                assert settings.is_production, where
                for required in REQUIRED_SETTINGS[command]:
                    assert required(settings) is not None, where


def test_every_container_has_the_settings_its_command_needs(
    objects: Objects, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    check_settings(objects, monkeypatch, tmp_path)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_example_secrets_are_refused_in_production(
    overlay: str, rendered: dict[str, Objects], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Deploying secret.env.example unchanged fails at start-up instead of running on it.
    clear_settings_env(monkeypatch, tmp_path)
    for name, value in {**config_data(rendered[overlay]), **example_secrets(overlay)}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as excinfo:
        Settings()
    message = str(excinfo.value)
    for name in ("TASKAPP_DATABASE_URL", "TASKAPP_REDIS_URL", "TASKAPP_METRICS_TOKEN"):
        assert name in message


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_real_secrets_stay_out_of_git(overlay: str) -> None:
    directory = K8S_DIR / "overlays" / overlay
    assert example_secrets(overlay).keys() == SECRET_KEYS
    secret_env = directory / "secret.env"
    ignored = subprocess.run(
        ["git", "check-ignore", "--quiet", "--no-index", str(secret_env)],
        cwd=ROOT,
        check=False,
    )
    assert ignored.returncode == 0, f"{secret_env} is not ignored by git"
    tracked = subprocess.run(
        ["git", "ls-files", "--error-unmatch", str(secret_env)],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    assert tracked.returncode != 0, f"{secret_env} is committed"
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    [generator] = kustomization["secretGenerator"]
    assert generator["envs"] == ["secret.env"]
    base = yaml.safe_load((K8S_DIR / "base" / "kustomization.yaml").read_text())
    assert "secretGenerator" not in base


# Each entry breaks one requirement in a copy of the rendered objects.
Path_ = tuple[str | int, ...]


def _parent(obj: Any, path: Path_) -> Any:
    for part in path[:-1]:
        obj = obj[part]
    return obj


def _set(*path: str | int, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda obj: _parent(obj, path).__setitem__(path[-1], value)


def _delete(*path: str | int) -> Callable[[dict[str, Any]], None]:
    return lambda obj: _parent(obj, path).__delitem__(path[-1])


def _drop_env(name: str) -> Callable[[dict[str, Any]], None]:
    def drop(obj: dict[str, Any]) -> None:
        [main] = obj["spec"]["template"]["spec"]["containers"]
        main["env"] = [variable for variable in main["env"] if variable["name"] != name]

    return drop


POD = ("spec", "template", "spec")
C0 = (*POD, "containers", 0)
COMPONENT = "app.kubernetes.io/component"
Breakage = tuple[str, Callable[[Objects], None], str, str, Callable[[dict[str, Any]], None]]
BREAKAGES: list[Breakage] = [
    (
        "readiness on /healthz",
        check_api,
        "Deployment",
        API,
        _set(*C0, "readinessProbe", "httpGet", "path", value="/healthz"),
    ),
    ("no liveness probe", check_api, "Deployment", API, _delete(*C0, "livenessProbe")),
    (
        "liveness on another port",
        check_api,
        "Deployment",
        API,
        _set(*C0, "livenessProbe", "httpGet", "port", value=9000),
    ),
    (
        "serve on another port",
        check_api,
        "Deployment",
        API,
        _set(*C0, "args", value=["serve", "--port", "9000"]),
    ),
    (
        "Service to another port",
        check_api,
        "Service",
        API,
        _set("spec", "ports", 0, "targetPort", value=8080),
    ),
    ("API replicas fixed", check_api, "Deployment", API, _set("spec", "replicas", value=3)),
    (
        "no scrape annotations",
        check_api,
        "Deployment",
        API,
        _delete("spec", "template", "metadata", "annotations"),
    ),
    (
        "no preStop drain",
        check_graceful_shutdown,
        "Deployment",
        API,
        _set(*C0, "lifecycle", "preStop", "sleep", "seconds", value=0),
    ),
    (
        "short grace period",
        check_graceful_shutdown,
        "Deployment",
        API,
        _set(*POD, "terminationGracePeriodSeconds", value=15),
    ),
    (
        "HPA on the worker",
        check_autoscaling,
        "HorizontalPodAutoscaler",
        API,
        _set("spec", "scaleTargetRef", "name", value=WORKER),
    ),
    (
        "HPA on memory",
        check_autoscaling,
        "HorizontalPodAutoscaler",
        API,
        _set("spec", "metrics", 0, "resource", "name", value="memory"),
    ),
    (
        "PDB on the workers",
        check_autoscaling,
        "PodDisruptionBudget",
        API,
        _set("spec", "selector", "matchLabels", COMPONENT, value="worker"),
    ),
    ("worker runs beat", check_workers, "Deployment", WORKER, _set(*C0, "args", value=["worker"])),
    ("two beats", check_workers, "Deployment", BEAT, _set("spec", "replicas", value=2)),
    (
        "beat rolls",
        check_workers,
        "Deployment",
        BEAT,
        _set("spec", "strategy", value={"type": "RollingUpdate"}),
    ),
    (
        "worker scraped on another port",
        check_worker_metrics,
        "Deployment",
        WORKER,
        _set("spec", "template", "metadata", "annotations", "prometheus.io/port", value="9000"),
    ),
    (
        "beat not scraped",
        check_worker_metrics,
        "Deployment",
        BEAT,
        _delete("spec", "template", "metadata", "annotations"),
    ),
    (
        "metrics port not the container's",
        check_worker_metrics,
        "ConfigMap",
        CONFIG_MAP,
        _set("data", "TASKAPP_WORKER_METRICS_PORT", value="9541"),
    ),
    (
        "worker metrics without token",
        check_worker_metrics,
        "Deployment",
        WORKER,
        _drop_env("TASKAPP_METRICS_TOKEN"),
    ),
    (
        "worker metrics on loopback",
        check_worker_metrics,
        "ConfigMap",
        CONFIG_MAP,
        _set("data", "TASKAPP_WORKER_METRICS_HOST", value="127.0.0.1"),
    ),
    ("Job serves", check_migration, "Job", MIGRATE, _set(*C0, "args", value=["serve"])),
    (
        "Job restarts in place",
        check_migration,
        "Job",
        MIGRATE,
        _set(*POD, "restartPolicy", value="OnFailure"),
    ),
    (
        "Job never cleaned up",
        check_migration,
        "Job",
        MIGRATE,
        _delete("spec", "ttlSecondsAfterFinished"),
    ),
    (
        "no memory limit",
        check_resources,
        "Deployment",
        WORKER,
        _delete(*C0, "resources", "limits", "memory"),
    ),
    (
        "request over limit",
        check_resources,
        "Deployment",
        BEAT,
        _set(*C0, "resources", "requests", "cpu", value="4"),
    ),
    (
        "missing Secret key",
        check_references,
        "Deployment",
        API,
        _set(*C0, "env", 0, "valueFrom", "secretKeyRef", "key", value="TASKAPP_NOPE"),
    ),
    (
        "missing volume",
        check_references,
        "Deployment",
        BEAT,
        _set(*C0, "volumeMounts", 0, "name", value="nope"),
    ),
    (
        "password in the ConfigMap",
        check_configuration,
        "ConfigMap",
        CONFIG_MAP,
        _set("data", "TASKAPP_DATABASE_URL", value="postgresql://u:p@db/x"),
    ),
    (
        "misspelt setting",
        check_configuration,
        "ConfigMap",
        CONFIG_MAP,
        _set("data", "TASKAPP_RATELIMIT", value="10/minute"),
    ),
    (
        "runs as root",
        check_security,
        "Deployment",
        WORKER,
        _set(*POD, "securityContext", "runAsUser", value=0),
    ),
    (
        "writable root",
        check_security,
        "Job",
        MIGRATE,
        _set(*C0, "securityContext", "readOnlyRootFilesystem", value=False),
    ),
    (
        "no metrics volume",
        check_writable_paths,
        "Deployment",
        API,
        _set(*C0, "volumeMounts", value=[{"name": "tmp", "mountPath": TMP}]),
    ),
    (
        "no worker metrics volume",
        check_writable_paths,
        "Deployment",
        WORKER,
        _set(*C0, "volumeMounts", value=[{"name": "tmp", "mountPath": TMP}]),
    ),
    (
        "image on latest",
        check_images,
        "Deployment",
        BEAT,
        _set(*C0, "image", value=f"{IMAGE}:latest"),
    ),
]


@pytest.mark.parametrize(
    ("check", "kind", "name", "breakage"),
    [entry[1:] for entry in BREAKAGES],
    ids=[entry[0] for entry in BREAKAGES],
)
def test_a_broken_requirement_is_caught(
    objects: Objects,
    check: Callable[[Objects], None],
    kind: str,
    name: str,
    breakage: Callable[[dict[str, Any]], None],
) -> None:
    check(objects)  # holds before
    breakage(find(objects, kind, name))
    with pytest.raises(AssertionError):
        check(objects)


def test_worker_metrics_without_the_scrape_token_are_caught(
    objects: Objects, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _drop_env("TASKAPP_METRICS_TOKEN")(find(objects, "Deployment", BEAT))
    with pytest.raises(AssertionError, match=BEAT):
        check_settings(objects, monkeypatch, tmp_path)


def test_a_missing_setting_is_caught(
    objects: Objects, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    del find(objects, "ConfigMap", CONFIG_MAP)["data"]["TASKAPP_OIDC_ISSUER"]
    with pytest.raises(ValidationError, match="TASKAPP_OIDC_ISSUER"):
        check_settings(objects, monkeypatch, tmp_path)
