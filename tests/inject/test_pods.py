"""Pods of Deployments, reviewed as the API server sends them: the patched pod is what a user
gets, so every patch is applied with a JSON Patch library and the result validated as a Pod."""

from __future__ import annotations

import pytest

from sidecar.inject import STATUS
from tests.inject.support import (
    IMAGE,
    Injector,
    Object,
    containers,
    deployment_review,
    env,
    review_of,
    validate_pod,
)

GATEWAY = "http://bifrost.gateway.svc.cluster.local:8080"
SIDECAR = "bifrost-sidecar"


def test_the_reviewed_pod_is_a_valid_pod() -> None:
    validate_pod(deployment_review()["request"]["object"])


async def test_an_annotated_pod_gets_the_sidecar_and_its_app_points_at_it(
    injector: Injector,
) -> None:
    answer = await injector.send(deployment_review())
    pod = answer.pod()
    validate_pod(pod)
    sidecar = pod["spec"]["initContainers"][0]
    assert sidecar["name"] == SIDECAR
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["image"] == IMAGE
    assert {"startupProbe", "readinessProbe", "livenessProbe", "securityContext"} <= sidecar.keys()
    assert sidecar["envFrom"] == [{"configMapRef": {"name": "bifrost-sidecar"}},
                                  {"secretRef": {"name": "bifrost-sidecar"}}]  # fmt: skip
    assert env(sidecar) == {"SIDECAR_PORT": "8080", "SIDECAR_UPSTREAM_URL": GATEWAY}
    app = containers(pod)["app"]
    assert env(app) == {"OPENAI_BASE_URL": "http://127.0.0.1:8080/openai/v1", "LOG_LEVEL": "info"}
    volumes = [v["name"] for v in pod["spec"]["volumes"]]
    assert volumes == ["kube-api-access-x7k2p", "bifrost-sidecar-tmp"]
    assert pod["metadata"]["labels"]["bifrost-sidecar/attached"] == "true"  # the PodMonitor's
    assert pod["metadata"]["annotations"][STATUS] == "injected"
    assert pod["spec"]["terminationGracePeriodSeconds"] == 45  # was 30: room for both to stop
    assert answer.warnings == []
    # Nothing else of the pod changed.
    original = deployment_review()["request"]["object"]
    assert pod["metadata"]["ownerReferences"] == original["metadata"]["ownerReferences"]
    assert pod["metadata"]["generateName"] == original["metadata"]["generateName"]
    assert {k: v for k, v in app.items() if k != "env"} == {
        k: v for k, v in original["spec"]["containers"][0].items() if k != "env"
    }


async def test_a_second_review_of_an_injected_pod_adds_nothing(injector: Injector) -> None:
    injected = (await injector.send(deployment_review())).pod()
    review = deployment_review()
    review["request"]["object"] = injected
    again = await injector.send(review)
    assert again.patch == []
    assert again.warnings == []
    assert again.pod() == injected


async def test_every_container_pointing_at_the_gateway_is_pointed_at_the_sidecar(
    injector: Injector,
) -> None:
    def several(pod: Object) -> None:
        app = pod["spec"]["containers"][0]
        pod["spec"]["containers"] += [
            {**app, "name": "worker", "ports": [],
             "env": [{"name": "OPENAI_BASE_URL", "value": GATEWAY + "/openai/v1/"}]},
            {**app, "name": "metrics-exporter", "ports": [], "env": []},
        ]  # fmt: skip

    answer = await injector.send(review_of(several))
    pod = answer.pod()
    validate_pod(pod)
    found = containers(pod)
    assert list(found) == [SIDECAR, "app", "worker", "metrics-exporter"]
    assert env(found["app"])["OPENAI_BASE_URL"] == "http://127.0.0.1:8080/openai/v1"
    assert env(found["worker"])["OPENAI_BASE_URL"] == "http://127.0.0.1:8080/openai/v1"
    assert env(found["metrics-exporter"]) == {}
    assert env(found[SIDECAR])["SIDECAR_UPSTREAM_URL"] == GATEWAY


async def test_the_sidecar_starts_before_existing_init_containers(injector: Injector) -> None:
    migrate = {"name": "migrate", "image": "registry.example.com/checkout:2.4.1",
               "command": ["checkout", "migrate"], "terminationMessagePath": "/dev/termination-log",
               "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"}  # fmt: skip
    log_shipper = {**migrate, "name": "log-shipper", "restartPolicy": "Always"}

    def with_init(pod: Object) -> None:
        pod["spec"]["initContainers"] = [migrate, log_shipper]

    pod = (await injector.send(review_of(with_init))).pod()
    validate_pod(pod)
    assert [c["name"] for c in pod["spec"]["initContainers"]] == [SIDECAR, "migrate", "log-shipper"]
    assert pod["spec"]["initContainers"][1:] == [migrate, log_shipper]


@pytest.mark.parametrize(
    "source",
    [
        {"configMapKeyRef": {"name": "checkout", "key": "gateway-url"}},
        {"secretKeyRef": {"name": "checkout", "key": "gateway-url"}},
    ],
    ids=["configmap", "secret"],
)
async def test_a_base_url_from_value_from_leaves_the_pod_as_it_was(
    injector: Injector, source: Object
) -> None:
    # The injector cannot read the value: a sidecar the app would not call is no help, and a
    # guessed URL could break the app. The pod says why, so does the warning.
    def from_source(pod: Object) -> None:
        pod["spec"]["containers"][0]["env"][0] = {"name": "OPENAI_BASE_URL", "valueFrom": source}

    review = review_of(from_source)
    answer = await injector.send(review)
    pod = answer.pod()
    validate_pod(pod)
    assert SIDECAR not in containers(pod)
    assert env(containers(pod)["app"])["OPENAI_BASE_URL"] == source
    assert pod["metadata"]["annotations"][STATUS] == "skipped: value-from"
    (warning,) = answer.warnings
    assert "value-from" in warning
    assert "OPENAI_BASE_URL" in warning


async def test_a_base_url_the_pod_does_not_show_keeps_the_configmaps_upstream(
    injector: Injector,
) -> None:
    # envFrom a ConfigMap: the injector cannot see the variable, so it attaches the sidecar
    # (upstream from its own ConfigMap) and says how to point the app at it.
    def from_config_map(pod: Object) -> None:
        app = pod["spec"]["containers"][0]
        del app["env"]
        app["envFrom"] = [{"configMapRef": {"name": "checkout"}}]

    answer = await injector.send(review_of(from_config_map))
    pod = answer.pod()
    validate_pod(pod)
    assert env(containers(pod)[SIDECAR]) == {"SIDECAR_PORT": "8080"}
    assert containers(pod)["app"]["envFrom"] == [{"configMapRef": {"name": "checkout"}}]
    (warning,) = answer.warnings
    assert "http://127.0.0.1:8080/openai/v1" in warning


@pytest.mark.parametrize(
    ("base_url", "upstream", "local"),
    [
        ("https://gw.example.com/openai/v1", "https://gw.example.com", "/openai/v1"),
        (
            "https://gw.example.com/bifrost/openai/v1",
            "https://gw.example.com/bifrost",
            "/openai/v1",
        ),
        ("http://bifrost:8080/v1", "http://bifrost:8080", "/v1"),
        ("http://bifrost:8080/openai", "http://bifrost:8080", "/openai"),
    ],
)
async def test_the_gateways_path_prefix_moves_to_the_sidecar_and_the_route_stays(
    injector: Injector, base_url: str, upstream: str, local: str
) -> None:
    def pointing(pod: Object) -> None:
        pod["spec"]["containers"][0]["env"][0]["value"] = base_url

    pod = (await injector.send(review_of(pointing))).pod()
    assert env(containers(pod)[SIDECAR])["SIDECAR_UPSTREAM_URL"] == upstream
    assert env(containers(pod)["app"])["OPENAI_BASE_URL"] == "http://127.0.0.1:8080" + local


async def test_annotations_set_port_resources_image_upstream_kind_and_variable(
    injector: Injector,
) -> None:
    def annotated(pod: Object) -> None:
        pod["metadata"]["annotations"].update({
            "bifrost-container-sidecar/port": "9091",
            "bifrost-container-sidecar/cpu-request": "100m",
            "bifrost-container-sidecar/cpu-limit": "2",
            "bifrost-container-sidecar/memory-request": "64Mi",
            "bifrost-container-sidecar/memory-limit": "0.5Gi",
            "bifrost-container-sidecar/image": "mirror.example.com/bcs:0.1.0",
            "bifrost-container-sidecar/upstream-kind": "openai",
            "bifrost-container-sidecar/base-url-env": "GATEWAY_URL",
        })  # fmt: skip
        pod["spec"]["containers"][0]["env"] = [
            {"name": "GATEWAY_URL", "value": "https://api.openai.com/v1"},
            {"name": "OPENAI_BASE_URL", "value": GATEWAY + "/openai/v1"},
        ]

    pod = (await injector.send(review_of(annotated))).pod()
    validate_pod(pod)
    sidecar, app = containers(pod)[SIDECAR], containers(pod)["app"]
    assert sidecar["ports"] == [{"name": "bcs-http", "containerPort": 9091}]
    assert sidecar["resources"] == {"requests": {"cpu": "100m", "memory": "64Mi"},
                                    "limits": {"cpu": "2", "memory": "0.5Gi"}}  # fmt: skip
    assert sidecar["image"] == "mirror.example.com/bcs:0.1.0"
    assert env(sidecar) == {"SIDECAR_PORT": "9091", "SIDECAR_UPSTREAM_URL": "https://api.openai.com",
                            "SIDECAR_UPSTREAM_KIND": "openai"}  # fmt: skip
    assert env(app) == {"GATEWAY_URL": "http://127.0.0.1:9091/v1",
                        "OPENAI_BASE_URL": GATEWAY + "/openai/v1"}  # fmt: skip


BAD_ANNOTATIONS: list[tuple[str, str]] = [
    ("inject", "yes"),
    ("port", "80"),
    ("port", "8080x"),
    ("port", "70000"),
    ("cpu-request", "lots"),
    ("memory-limit", "1Qi"),
    ("cpu-request", "2"),  # above the template's limit of 1: the API server would refuse the pod
    ("memory-request", "1Gi"),
    ("image", "not an image"),
    ("upstream-kind", "azure"),
    ("base-url-env", "OPENAI BASE URL"),
]


@pytest.mark.parametrize(("name", "value"), BAD_ANNOTATIONS)
async def test_a_bad_annotation_leaves_the_pod_as_it_was_and_says_which(
    injector: Injector, name: str, value: str
) -> None:
    def annotated(pod: Object) -> None:
        pod["metadata"]["annotations"][f"bifrost-container-sidecar/{name}"] = value

    answer = await injector.send(review_of(annotated))
    pod = answer.pod()
    validate_pod(pod)
    assert SIDECAR not in containers(pod)
    assert pod["metadata"]["annotations"][STATUS] == "skipped: bad-annotation"
    assert pod["spec"] == deployment_review()["request"]["object"]["spec"]
    (warning,) = answer.warnings
    assert "bad-annotation" in warning
    assert name in warning or name.endswith(("request", "limit"))


@pytest.mark.parametrize(
    ("base_urls", "reason"),
    [
        (["http://bifrost:8080/somewhere/else"], "base-url"),
        (["not a url"], "base-url"),
        (
            ["http://bifrost-a:8080/openai/v1", "http://bifrost-b:8080/openai/v1"],
            "upstream-conflict",
        ),
    ],
)
async def test_a_base_url_the_sidecar_cannot_front_leaves_the_pod_as_it_was(
    injector: Injector, base_urls: list[str], reason: str
) -> None:
    def pointing(pod: Object) -> None:
        app = pod["spec"]["containers"][0]
        pod["spec"]["containers"] = [
            {
                **app,
                "name": f"app-{i}",
                "ports": [],
                "env": [{"name": "OPENAI_BASE_URL", "value": url}],
            }
            for i, url in enumerate(base_urls)
        ]

    answer = await injector.send(review_of(pointing))
    pod = answer.pod()
    assert SIDECAR not in containers(pod)
    assert pod["metadata"]["annotations"][STATUS] == f"skipped: {reason}"
    assert len(answer.warnings) == 1


async def test_a_port_taken_by_the_app_leaves_the_pod_as_it_was(injector: Injector) -> None:
    def on_8080(pod: Object) -> None:
        pod["spec"]["containers"][0]["ports"][0]["containerPort"] = 8080

    answer = await injector.send(review_of(on_8080))
    assert SIDECAR not in containers(answer.pod())
    assert "bifrost-container-sidecar/port" in answer.warnings[0]


async def test_a_pod_on_the_nodes_network_is_left_as_it_was(injector: Injector) -> None:
    def host_network(pod: Object) -> None:
        pod["spec"]["hostNetwork"] = True

    answer = await injector.send(review_of(host_network))
    assert SIDECAR not in containers(answer.pod())
    assert answer.pod()["metadata"]["annotations"][STATUS] == "skipped: host-network"


async def test_an_app_already_pointed_at_localhost_is_left_alone(injector: Injector) -> None:
    def local(pod: Object) -> None:
        pod["spec"]["containers"][0]["env"][0]["value"] = "http://127.0.0.1:8080/openai/v1"

    pod = (await injector.send(review_of(local))).pod()
    assert env(containers(pod)["app"])["OPENAI_BASE_URL"] == "http://127.0.0.1:8080/openai/v1"
    assert env(containers(pod)[SIDECAR]) == {"SIDECAR_PORT": "8080"}


async def test_pods_not_asking_are_not_touched(injector: Injector) -> None:
    def unannotated(pod: Object) -> None:
        del pod["metadata"]["annotations"]

    for review in (review_of(unannotated), deployment_review()):
        review["request"]["object"]["metadata"].pop("annotations", None)
        answer = await injector.send(review)
        assert (answer.patch, answer.warnings) == ([], [])


async def test_a_namespace_asks_for_every_pod_and_a_pod_opts_out(injector: Injector) -> None:
    def unannotated(pod: Object) -> None:
        del pod["metadata"]["annotations"]

    def opted_out(pod: Object) -> None:
        pod["metadata"]["annotations"]["bifrost-container-sidecar/inject"] = "false"

    asked = await injector.send(review_of(unannotated), "/mutate/namespace")
    pod = asked.pod()
    validate_pod(pod)
    assert pod["spec"]["initContainers"][0]["name"] == SIDECAR
    assert pod["metadata"]["annotations"] == {STATUS: "injected"}
    for path in ("/mutate", "/mutate/namespace"):
        answer = await injector.send(review_of(opted_out), path)
        assert (answer.patch, answer.warnings) == ([], [])
    metrics = await injector.metrics()
    assert 'sidecar_injector_pods_total{outcome="injected",reason="namespace"} 1.0' in metrics
    assert 'sidecar_injector_pods_total{outcome="skipped",reason="opted-out"} 2.0' in metrics
