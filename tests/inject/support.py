"""AdmissionReviews as the API server sends them, and what the injector's answers do to a pod."""

from __future__ import annotations

import base64
import copy
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import kubernetes_validate
import pytest

from tests.conftest import Running

REPO = Path(__file__).resolve().parents[2]
TEMPLATE_FILE = REPO / "deploy" / "kubernetes" / "injector" / "sidecar.json"
IMAGE = "registry.example.com/bifrost-container-sidecar:0.1.0"
# Native sidecars need 1.29; the sidecar's preStop sleep action is on by default from 1.30.
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
Object = dict[str, Any]


def deployment_review() -> Object:
    """A review of a Deployment's pod (one container, annotated), as the API server sends it."""
    with (Path(__file__).parent / "reviews" / "deployment-pod.json").open() as stream:
        review: Object = json.load(stream)
    return review


def review_of(change: Callable[[Object], None]) -> Object:
    """The Deployment pod's review, with ``change`` applied to its pod."""
    review = deployment_review()
    change(review["request"]["object"])
    return review


@dataclass
class Answer:
    """The injector's answer to one review."""

    status: int
    body: Object
    sent: Object

    @property
    def response(self) -> Object:
        assert self.body["apiVersion"] == "admission.k8s.io/v1"
        assert self.body["kind"] == "AdmissionReview"
        response: Object = self.body["response"]
        assert response["allowed"] is True, "the injector never blocks a pod"
        return response

    @property
    def patch(self) -> list[Object]:
        """The JSON Patch, decoded ([] when there is none)."""
        response = self.response
        if "patch" not in response:
            assert "patchType" not in response
            return []
        assert response["patchType"] == "JSONPatch"
        patch: list[Object] = json.loads(base64.b64decode(response["patch"]))
        return patch

    @property
    def warnings(self) -> list[str]:
        return list(self.response.get("warnings", []))

    def pod(self) -> Object:
        """The pod the API server would create: the patch applied with a JSON Patch library."""
        pod: Object = jsonpatch.apply_patch(self.sent["request"]["object"], self.patch)
        return pod


def validate_pod(pod: Object) -> None:
    """Fail unless ``pod`` is a valid v1 Pod of every Kubernetes version we support."""
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(pod, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"Kubernetes {version}: {path}: {exc.message}")


def containers(pod: Object) -> dict[str, Object]:
    """Every container and init container of ``pod`` by name."""
    spec = pod["spec"]
    return {c["name"]: c for c in spec.get("initContainers", []) + spec["containers"]}


def env(container: Object) -> dict[str, Any]:
    """A container's env entries by name: the value, or the valueFrom mapping."""
    return {v["name"]: v.get("value", v.get("valueFrom")) for v in container.get("env", [])}


@dataclass
class Injector:
    """The injector served on a free port, and a way to send it reviews."""

    running: Running
    http: aiohttp.ClientSession

    async def send(self, review: Object | bytes, path: str = "/mutate") -> Answer:
        body = review if isinstance(review, bytes) else json.dumps(review).encode()
        async with self.http.post(self.running.url + path, data=io.BytesIO(body),
                                  headers={"Content-Type": "application/json"}) as response:  # fmt: skip
            assert response.status != 500
            if response.status != 200:
                return Answer(response.status, {"text": await response.text()}, {})
            sent = review if isinstance(review, dict) else {}
            return Answer(response.status, await response.json(), sent)

    async def metrics(self) -> str:
        async with self.http.get(self.running.url + "/metrics") as response:
            assert response.status == 200
            return await response.text()


def copy_pod(review: Object) -> Object:
    """A copy of the review's pod."""
    pod: Object = copy.deepcopy(review["request"]["object"])
    return pod
