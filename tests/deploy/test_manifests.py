"""The Kubernetes manifests, as each overlay renders them: valid, locked down, true to the code."""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from sidecar.app import create_app
from sidecar.queue import queue_redis_settings
from sidecar.settings import PROVIDERS, Settings, load_settings
from tests.deploy.conftest import KUSTOMIZATIONS, Object, load_documents, render, tool
from worker.cli import main as worker_main

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if p.is_dir())
SECRET_TEMPLATE = KUBERNETES / "base" / "secret.example.yaml"
# Native sidecars need 1.29; the preStop sleep action is on by default from 1.30.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
OPERATOR_API = "monitoring.coreos.com/v1"
# cert-manager's Issuer and Certificate (deploy/kubernetes/injector): checked in tests/inject.
CERT_MANAGER_API = "cert-manager.io/v1"
SIDECAR, WORKER, APP = "bifrost-sidecar", "bifrost-sidecar-worker", "example-app"
SETTING_NAMES = {"SIDECAR_" + name.upper() for name in Settings.__struct_fields__}
PER_PROVIDER_KEY = re.compile(r"^SIDECAR_SERVICE_API_KEY_([A-Z0-9]+)$")
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@dataclass
class Rendered:
    """One overlay's objects, plus the Secret that the operator creates from the template."""

    overlay: str
    objects: list[Object]
    secret: Object

    def get(self, kind: str, name: str) -> Object:
        (found,) = [o for o in self.objects if (o["kind"], o["metadata"]["name"]) == (kind, name)]
        return found

    def pods(self) -> Iterator[tuple[Object, Object]]:
        """(workload, pod template) of every workload."""
        for obj in self.objects:
            if "template" in obj.get("spec", {}):
                yield obj, obj["spec"]["template"]

    def env(self, pod: Object, container: Object) -> dict[str, str]:
        """The environment the container starts with."""
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                config_map = self.get("ConfigMap", source["configMapRef"]["name"])
                env.update(config_map.get("data", {}))
            else:
                assert source["secretRef"]["name"] == self.secret["metadata"]["name"]
                env.update(self.secret["stringData"])
        for variable in container.get("env", []):
            assert "value" in variable, f"{variable}: only literal env values are checked here"
            env[variable["name"]] = variable["value"]
        return env

    def container(self, workload: str, name: str) -> tuple[Object, Object]:
        """(pod spec, container) of a workload's container or init container."""
        pod = self.get("Deployment", workload)["spec"]["template"]["spec"]
        every = pod.get("initContainers", []) + pod["containers"]
        (container,) = [c for c in every if c["name"] == name]
        return pod, container

    def settings(self, workload: str, name: str) -> Settings:
        pod, container = self.container(workload, name)
        return load_settings(self.env(pod, container))


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> Rendered:
    (secret,) = load_documents(SECRET_TEMPLATE)
    return Rendered(request.param, render(f"deploy/kubernetes/overlays/{request.param}"), secret)


def test_both_overlays_exist() -> None:
    assert OVERLAYS == ["cluster-sentinel", "single-redis"]
    assert KUSTOMIZATIONS == [
        "deploy/grafana",
        "deploy/kubernetes/base",
        "deploy/kubernetes/injector",
        "deploy/kubernetes/overlays/cluster-sentinel",
        "deploy/kubernetes/overlays/single-redis",
        "deploy/prometheus",
    ]


def test_kubectl_renders_with_kustomize_v5() -> None:
    done = subprocess.run([tool("kubectl"), "version", "--client", "-o", "json"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    version = json.loads(done.stdout)["kustomizeVersion"]
    assert version.startswith("v5."), f"kubectl's kustomize is {version}: install kubectl 1.27+"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_kustomization_renders_objects_of_the_kubernetes_schemas(
    kustomization: str, version: str
) -> None:
    objects = render(kustomization)
    assert objects, f"kubectl kustomize {kustomization} renders nothing"
    if kustomization.endswith("/base"):
        (secret,) = load_documents(SECRET_TEMPLATE)
        objects.append(secret)
    for obj in objects:
        if obj["apiVersion"] in (OPERATOR_API, CERT_MANAGER_API):
            continue  # no schema offline: checked by structure below, the rules by promtool
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")


def _check_keys(where: str, obj: Object, required: set[str], allowed: set[str]) -> None:
    assert isinstance(obj, dict), f"{where}: expected a mapping"
    assert required <= obj.keys(), f"{where}: missing {sorted(required - obj.keys())}"
    assert obj.keys() <= required | allowed, f"{where}: unknown {sorted(obj.keys() - allowed)}"


def _check_metadata(obj: Object) -> None:
    _check_keys(f"{obj['kind']} metadata", obj["metadata"], {"name"}, {"labels", "annotations"})
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", obj["metadata"]["name"])
    for value in obj["metadata"].get("labels", {}).values():
        assert isinstance(value, str), f"{obj['metadata']['name']}: label values are strings"


def test_prometheus_operator_objects_are_well_formed(rendered: Rendered) -> None:
    operator = [o for o in rendered.objects if o["apiVersion"] == OPERATOR_API]
    assert sorted(o["kind"] for o in operator) == ["PodMonitor", "PodMonitor", "PrometheusRule"]
    for obj in operator:
        _check_keys(obj["kind"], obj, {"apiVersion", "kind", "metadata", "spec"}, set())
        _check_metadata(obj)
        if obj["kind"] == "PodMonitor":
            _check_keys("PodMonitor spec", obj["spec"], {"selector", "podMetricsEndpoints"},
                        {"namespaceSelector", "jobLabel", "podTargetLabels"})  # fmt: skip
            for endpoint in obj["spec"]["podMetricsEndpoints"]:
                _check_keys("podMetricsEndpoint", endpoint, {"port", "path"},
                            {"interval", "scrapeTimeout", "relabelings", "metricRelabelings"})  # fmt: skip
            continue
        _check_keys("PrometheusRule spec", obj["spec"], {"groups"}, set())
        for group in obj["spec"]["groups"]:
            _check_keys("rule group", group, {"name", "rules"}, {"interval", "limit"})
            for rule in group["rules"]:
                kind = "alert" if "alert" in rule else "record"
                _check_keys(f"rule {rule.get(kind)}", rule, {kind, "expr"},
                            {"for", "keep_firing_for", "labels", "annotations"})  # fmt: skip
                assert re.fullmatch(r"(\d+[smhdwy])+", rule.get("for", "0s")), rule
                for field in ("labels", "annotations"):
                    assert all(isinstance(v, str) for v in rule.get(field, {}).values()), rule


def _selects(selector: Object, labels: dict[str, str]) -> bool:
    assert selector.keys() == {"matchLabels"}, "only matchLabels selectors are checked here"
    return selector["matchLabels"].items() <= labels.items()


def test_pod_monitors_scrape_named_ports_of_real_pods(rendered: Rendered) -> None:
    for monitor in (o for o in rendered.objects if o["kind"] == "PodMonitor"):
        pods = [
            t
            for _, t in rendered.pods()
            if _selects(monitor["spec"]["selector"], t["metadata"]["labels"])
        ]
        assert pods, f"PodMonitor/{monitor['metadata']['name']} selects no pod"
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for pod in pods:
                spec = pod["spec"]
                ports = {
                    p.get("name")
                    for c in spec.get("initContainers", []) + spec["containers"]
                    for p in c.get("ports", [])
                }
                assert endpoint["port"] in ports, (
                    f"{monitor['metadata']['name']}: no port {endpoint['port']}"
                )


def test_no_pod_gets_service_link_variables(rendered: Rendered) -> None:
    # Kubernetes gives every pod <SERVICE>_PORT=tcp://... for each Service of the namespace
    # unless told not to: a Service named "sidecar" would set SIDECAR_PORT.
    for workload, template in rendered.pods():
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        assert template["spec"].get("enableServiceLinks") is False, (
            f"{name}: set enableServiceLinks: false on its pod spec"
        )


def test_operator_objects_carry_the_release_label_set_in_one_place(rendered: Rendered) -> None:
    (kustomization,) = load_documents(KUBERNETES / "base" / "kustomization.yaml")
    (patch,) = [p for p in kustomization["patches"]
                if p.get("target", {}).get("group") == "monitoring.coreos.com"]  # fmt: skip
    assert patch["target"].keys() == {"group"}, "every PodMonitor and PrometheusRule"
    (operation,) = yaml.safe_load(patch["patch"])
    assert operation["path"] == "/metadata/labels/release"
    for obj in rendered.objects:
        labels = obj["metadata"].get("labels", {})
        if obj["apiVersion"] == OPERATOR_API:
            assert labels.get("release") == operation["value"], obj["metadata"]["name"]
        else:
            assert "release" not in labels, f"{obj['kind']}: only the operator selects on it"


def _setting_names(mapping: dict[str, Any]) -> set[str]:
    return {name for name in mapping if name.startswith("SIDECAR_")}


def test_every_sidecar_variable_is_a_setting(rendered: Rendered) -> None:
    names = _setting_names(rendered.secret["stringData"])
    for obj in rendered.objects:
        if obj["kind"] == "ConfigMap":
            names |= _setting_names(obj.get("data", {}))
    for _, template in rendered.pods():
        spec = template["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            names |= _setting_names({v["name"]: v for v in container.get("env", [])})
    assert names
    for name in sorted(names):
        match = PER_PROVIDER_KEY.match(name)
        assert name in SETTING_NAMES or (match and match.group(1).lower() in PROVIDERS), (
            f"{name} is set by the manifests but is not a field of sidecar.settings.Settings"
        )


def test_sidecar_and_worker_get_every_required_setting(rendered: Rendered) -> None:
    envs = {
        "sidecar": rendered.env(*rendered.container(APP, SIDECAR)),
        "worker": rendered.env(*rendered.container(WORKER, "worker")),
    }
    for who, env in envs.items():
        required = {"SIDECAR_REDIS_URL", "SIDECAR_KEY_SECRET"}
        if env.get("SIDECAR_UPSTREAM_KIND", "bifrost") == "bifrost":
            required.add("SIDECAR_UPSTREAM_URL")
        missing = sorted(name for name in required if not env.get(name))
        assert not missing, f"the {who} is not given {missing}"
        settings = load_settings(env)
        queue = queue_redis_settings(settings)
        assert settings.refresh_enabled, f"the {who} has no service credential: no refresh"
        if settings.redis_cluster:
            assert queue.sentinel, "with a Redis Cluster the queue must be on a Sentinel set"
    shared = ("redis_url", "redis_cluster", "queue_redis_url", "queue_name", "key_prefix",
              "key_secret", "upstream_url")  # fmt: skip
    sidecar, worker = (load_settings(env) for env in envs.values())
    for field in shared:
        assert getattr(sidecar, field) == getattr(worker, field), field


def test_redis_urls_point_at_what_the_overlay_provides(rendered: Rendered) -> None:
    settings = rendered.settings(APP, SIDECAR)
    services = {o["metadata"]["name"]: o for o in rendered.objects if o["kind"] == "Service"}
    host = urlsplit(settings.redis_url).hostname
    if rendered.overlay == "single-redis":
        assert not settings.redis_cluster
        assert host in services, f"SIDECAR_REDIS_URL names {host}, not a Service of the overlay"
        ports = [p["port"] for p in services[host]["spec"]["ports"]]
        assert (urlsplit(settings.redis_url).port or 6379) in ports
        assert rendered.get("StatefulSet", host)["spec"]["replicas"] == 1
    else:
        assert settings.redis_cluster
        assert settings.queue_redis_url.startswith("redis+sentinel://")
        assert "StatefulSet" not in {o["kind"] for o in rendered.objects}
        assert host not in services, "the cluster comes from an operator or a managed service"


def _http_probe(container: Object, kind: str) -> tuple[str, int]:
    probe = container[kind]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return probe["path"], ports.get(probe["port"], probe["port"])


def _security(pod: Object, container: Object) -> dict[str, Any]:
    return {**pod.get("securityContext", {}), **container.get("securityContext", {})}


def _assert_locked_down(pod: Object, container: Object) -> None:
    context = _security(pod, container)
    assert context.get("runAsNonRoot") is True, container["name"]
    assert context.get("runAsUser", 0) != 0, container["name"]
    assert context.get("readOnlyRootFilesystem") is True, container["name"]
    assert context.get("allowPrivilegeEscalation") is False, container["name"]
    assert context.get("capabilities") == {"drop": ["ALL"]}, container["name"]
    assert context.get("seccompProfile") == {"type": "RuntimeDefault"}, container["name"]


def test_sidecar_is_a_locked_down_native_sidecar(rendered: Rendered) -> None:
    pod, sidecar = rendered.container(APP, SIDECAR)
    assert sidecar in pod.get("initContainers", []), "a native sidecar is an init container"
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["args"] == ["serve"]
    assert "command" not in sidecar
    port = rendered.settings(APP, SIDECAR).port
    assert _http_probe(sidecar, "startupProbe") in {("/healthz", port), ("/readyz", port)}
    assert _http_probe(sidecar, "livenessProbe") == ("/healthz", port)
    assert _http_probe(sidecar, "readinessProbe") == ("/readyz", port)
    _assert_locked_down(pod, sidecar)
    (app,) = pod["containers"]
    base_url = {v["name"]: v["value"] for v in app["env"]}["OPENAI_BASE_URL"]
    assert base_url == f"http://127.0.0.1:{port}/openai/v1"


def test_probed_and_scraped_paths_are_sidecar_routes(rendered: Rendered) -> None:
    _, sidecar = rendered.container(APP, SIDECAR)
    paths = {
        sidecar[p]["httpGet"]["path"] for p in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    monitor = rendered.get("PodMonitor", "bifrost-sidecar")
    paths |= {endpoint["path"] for endpoint in monitor["spec"]["podMetricsEndpoints"]}
    app = create_app(rendered.settings(APP, SIDECAR))  # no I/O until it starts
    routes = {resource.canonical for resource in app.router.resources()}
    assert paths <= routes, f"the sidecar serves none of {sorted(paths - routes)}"


def _pre_stop_s(container: Object) -> float:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if pre_stop is None:
        return 0.0
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] in {"sleep", "/bin/sleep"}, command
    assert len(command) == 2, command
    return float(command[1])


def test_grace_period_covers_pre_stop_and_shutdown(rendered: Rendered) -> None:
    pod, sidecar = rendered.container(APP, SIDECAR)
    assert _pre_stop_s(sidecar) > 0, "the sidecar needs a preStop sleep"
    pre_stops = sum(_pre_stop_s(c) for c in pod["initContainers"] + pod["containers"])
    shutdown_s = rendered.settings(APP, SIDECAR).shutdown_timeout_s
    assert pod["terminationGracePeriodSeconds"] > pre_stops + shutdown_s
    worker_pod, _ = rendered.container(WORKER, "worker")
    worker_shutdown_s = rendered.settings(WORKER, "worker").shutdown_timeout_s
    assert worker_pod["terminationGracePeriodSeconds"] > worker_shutdown_s


def test_worker_runs_the_worker_script_with_its_probes(
    rendered: Rendered, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment = rendered.get("Deployment", WORKER)
    assert deployment["spec"]["replicas"] == 2
    pod, worker = rendered.container(WORKER, "worker")
    assert worker["command"] == ["sidecar-worker"]
    assert "sidecar-worker" in SCRIPTS
    assert worker["livenessProbe"]["exec"]["command"] == ["sidecar-worker", "--check"]
    with pytest.raises(SystemExit, match="0"):
        worker_main(["--help"])
    assert "--check" in capsys.readouterr().out
    metrics_port = rendered.settings(WORKER, "worker").worker_metrics_port
    assert _http_probe(worker, "readinessProbe") == ("/readyz", metrics_port)
    _assert_locked_down(pod, worker)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    budget = rendered.get("PodDisruptionBudget", WORKER)["spec"]
    assert budget["minAvailable"] == 1
    assert _selects(budget["selector"], labels)
    autoscaler = rendered.get("HorizontalPodAutoscaler", WORKER)["spec"]
    assert autoscaler["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": WORKER,
    }
    assert autoscaler["minReplicas"] == 2
    assert autoscaler["maxReplicas"] >= 2
    (metric,) = autoscaler["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert "cpu" in worker["resources"]["requests"], "CPU utilisation is relative to the request"


def test_our_containers_have_resources_and_pinned_images(rendered: Rendered) -> None:
    for _, template in rendered.pods():
        spec = template["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            if container["name"] == "app":
                continue  # the example app: yours to size
            _assert_locked_down(spec, container)
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= container["resources"][bound].keys(), container["name"]
            tag = container["image"].rpartition("/")[2].partition(":")[2]
            assert tag not in {"", "latest"}, f"{container['name']}: pin the image's tag"


def test_dashboard_is_a_grafana_config_map(rendered: Rendered) -> None:
    dashboards = [
        o for o in rendered.objects
        if o["kind"] == "ConfigMap" and o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]  # fmt: skip
    (dashboard,) = dashboards
    (source,) = dashboard["data"].values()
    assert json.loads(source)["uid"] == "bifrost-sidecar"
    # kubectl's client-side apply copies it into an annotation, limited to 256 KiB.
    assert len(source.encode()) < 200_000, "use kubectl apply --server-side for a larger one"


def test_secret_template_holds_only_placeholders() -> None:
    (secret,) = load_documents(SECRET_TEMPLATE)
    assert secret["kind"] == "Secret"
    assert {"SIDECAR_KEY_SECRET", "SIDECAR_SERVICE_API_KEY"} <= secret["stringData"].keys()
    for name, value in secret["stringData"].items():
        assert "REPLACE_ME" in value, f"{name}: the template must not hold a real secret"
    for kustomization in KUSTOMIZATIONS:
        assert "Secret" not in {o["kind"] for o in render(kustomization)}
