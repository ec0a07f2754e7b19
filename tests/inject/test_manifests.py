"""deploy/kubernetes/injector as ``kubectl kustomize`` renders it: it injects the base's sidecar,
cannot block a pod or review one twice, and its TLS, Service and command fit together. (Every
object is also validated against the Kubernetes schemas with the other kustomizations, in
tests/deploy/test_manifests.py.)"""

from __future__ import annotations

import json
from typing import Any

import pytest

from sidecar.inject import Template
from sidecar.webhook import create_injector_app
from tests.deploy.conftest import render
from tests.inject.support import TEMPLATE_FILE, Object

INJECTOR = "deploy/kubernetes/injector"
NAME = "bifrost-sidecar-injector"


class Rendered:
    """The injector's objects."""

    def __init__(self) -> None:
        self.objects = render(INJECTOR)

    def get(self, kind: str, name: str = NAME) -> Object:
        # A generated ConfigMap's name carries a hash suffix.
        (found,) = [o for o in self.objects if o["kind"] == kind
                    and o["metadata"]["name"].startswith(name)]  # fmt: skip
        return found

    @property
    def pod(self) -> Object:
        pod: Object = self.get("Deployment")["spec"]["template"]
        return pod

    @property
    def container(self) -> Object:
        (container,) = self.pod["spec"]["containers"]
        return container


@pytest.fixture(scope="module")
def rendered() -> Rendered:
    return Rendered()


def _matches(selector: Object, labels: dict[str, str]) -> bool:
    """Whether a label selector selects ``labels`` (Kubernetes' rules)."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        held = {"In": key in labels and labels[key] in values,
                "NotIn": key not in labels or labels[key] not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[operator]  # fmt: skip
        if not held:
            return False
    return True


def test_the_mounted_template_is_the_base_example_apps_sidecar(rendered: Rendered) -> None:
    (text,) = rendered.get("ConfigMap")["data"].values()
    assert json.loads(text) == json.loads(TEMPLATE_FILE.read_text())
    injected = json.loads(text)
    (sidecar,) = injected["spec"]["initContainers"]
    image = {v["name"]: v["value"] for v in rendered.container["env"]}["INJECTED_IMAGE"]
    assert image == rendered.container["image"], "the sidecar runs the injector's own image"
    sidecar["image"] = image
    base = {o["metadata"]["name"]: o for o in render("deploy/kubernetes/overlays/single-redis")}
    example = base["example-app"]["spec"]["template"]
    assert example["spec"]["initContainers"] == [sidecar], (
        "deploy/kubernetes/injector/sidecar.json differs from the example app's sidecar "
        "(base/example-app.yaml and base/sizing/sidecar.yaml): make them equal"
    )
    assert injected["metadata"]["labels"].items() <= example["metadata"]["labels"].items()
    for volume in injected["spec"]["volumes"]:
        assert volume in example["spec"]["volumes"]
    grace_s = injected["spec"]["terminationGracePeriodSeconds"]
    assert grace_s == example["spec"]["terminationGracePeriodSeconds"]


def test_webhooks_cannot_block_a_pod_and_review_each_at_most_once(rendered: Rendered) -> None:
    configuration = rendered.get("MutatingWebhookConfiguration")
    service, namespace = rendered.get("Service"), rendered.get("Namespace")
    routes = {
        r.canonical for r in create_injector_app(Template.load(TEMPLATE_FILE)).router.resources()
    }
    webhooks = configuration["webhooks"]
    assert len(webhooks) == 2
    for webhook in webhooks:
        assert webhook["admissionReviewVersions"] == ["v1"]
        assert webhook["sideEffects"] == "None"
        assert webhook["failurePolicy"] == "Ignore"
        assert webhook["timeoutSeconds"] <= 5
        assert webhook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                                     "resources": ["pods"], "scope": "Namespaced"}]  # fmt: skip
        target = webhook["clientConfig"]["service"]
        assert (target["name"], target["namespace"]) == (NAME, service["metadata"]["namespace"])
        assert target["port"] in [p["port"] for p in service["spec"]["ports"]]
        assert target["path"] in routes
        assert not _matches(webhook["objectSelector"], rendered.pod["metadata"]["labels"])

    def reviewed_by(labels: dict[str, str]) -> list[str]:
        return [w["clientConfig"]["service"]["path"] for w in webhooks
                if _matches(w["namespaceSelector"], labels)]  # fmt: skip

    def namespace_labels(name: str, **labels: str) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": name, **labels}

    enabled = {"bifrost-container-sidecar/inject": "enabled"}
    assert reviewed_by(namespace_labels("shop")) == ["/mutate"]
    assert reviewed_by(namespace_labels("shop", **enabled)) == ["/mutate/namespace"]
    for excluded in ("kube-system", namespace["metadata"]["name"]):
        assert reviewed_by(namespace_labels(excluded)) == []
        assert reviewed_by(namespace_labels(excluded, **enabled)) == []
    assert namespace["metadata"]["name"] == service["metadata"]["namespace"]


def test_tls_comes_from_cert_manager_for_the_services_name(rendered: Rendered) -> None:
    certificate, issuer = rendered.get("Certificate"), rendered.get("Issuer")
    service = rendered.get("Service")
    for obj in (certificate, issuer):
        assert obj["apiVersion"] == "cert-manager.io/v1"
        assert obj.keys() == {"apiVersion", "kind", "metadata", "spec"}
    assert certificate["spec"]["issuerRef"] == {
        "kind": "Issuer",
        "name": issuer["metadata"]["name"],
    }
    assert "selfSigned" in issuer["spec"]
    dns_name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert dns_name in certificate["spec"]["dnsNames"]  # the name the API server calls
    annotation = rendered.get("MutatingWebhookConfiguration")["metadata"]["annotations"]
    where = f"{certificate['metadata']['namespace']}/{certificate['metadata']['name']}"
    assert annotation == {"cert-manager.io/inject-ca-from": where}
    volumes = {v["name"]: v for v in rendered.pod["spec"]["volumes"]}
    assert certificate["spec"]["secretName"] in [
        v.get("secret", {}).get("secretName") for v in volumes.values()
    ]


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in args[1:])


def test_the_injector_runs_two_locked_down_replicas_of_the_inject_command(
    rendered: Rendered,
) -> None:
    deployment, budget = rendered.get("Deployment"), rendered.get("PodDisruptionBudget")
    assert deployment["spec"]["replicas"] == 2
    assert budget["spec"]["minAvailable"] == 1
    assert _matches(budget["spec"]["selector"], rendered.pod["metadata"]["labels"])
    assert _matches({"matchLabels": rendered.get("Service")["spec"]["selector"]},
                    rendered.pod["metadata"]["labels"])  # fmt: skip
    container, spec = rendered.container, rendered.pod["spec"]
    assert container["args"][0] == "inject"
    flags = _flags(container["args"])
    assert flags.keys() == {"cert-file", "key-file", "port", "template", "image"}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    tls = volumes[mounts[flags["cert-file"].rpartition("/")[0]]]["secret"]
    assert flags["key-file"].startswith(flags["cert-file"].rpartition("/")[0])
    assert tls["secretName"] == rendered.get("Certificate")["spec"]["secretName"]
    directory, _, key = flags["template"].rpartition("/")
    config_map = volumes[mounts[directory]]["configMap"]["name"]
    assert config_map == rendered.get("ConfigMap")["metadata"]["name"]
    assert key in rendered.get("ConfigMap")["data"]
    assert flags["image"] == "$(INJECTED_IMAGE)"
    (port,) = container["ports"]
    assert int(flags["port"]) == port["containerPort"]
    routes = {
        r.canonical for r in create_injector_app(Template.load(TEMPLATE_FILE)).router.resources()
    }
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get: dict[str, Any] = container[probe]["httpGet"]
        assert (get["scheme"], get["port"]) == ("HTTPS", port["name"])
        assert get["path"] in routes
    context = {**spec["securityContext"], **container["securityContext"]}
    assert context["runAsNonRoot"] is True
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False, "it calls no API"
    assert spec["enableServiceLinks"] is False
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= container["resources"][bound].keys()
    assert container["image"].rpartition(":")[2] not in {"", "latest"}
