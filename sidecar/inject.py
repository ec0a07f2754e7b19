"""What the injector adds to a pod that asks for the sidecar, as a JSON Patch (RFC 6902).

The sidecar comes from a template (``deploy/kubernetes/injector/sidecar.json``, mounted from the
injector's ConfigMap) that tests/inject keep equal to ``deploy/kubernetes/base``'s sidecar;
per-pod annotations change only its port, resources, image and upstream kind.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

__all__ = ["INJECT", "INJECTED", "PREFIX", "REFUSED", "SKIPPED", "STATUS", "Decision", "Template",
           "TemplateError", "decide"]  # fmt: skip

PREFIX = "bifrost-container-sidecar"
INJECT = PREFIX + "/inject"  # "true" asks for the sidecar; "false" opts out of a namespace's
STATUS = PREFIX + "/status"  # set by the injector: "injected" or "skipped: <reason>"
BASE_URL_ENV = PREFIX + "/base-url-env"
PORT = PREFIX + "/port"
IMAGE = PREFIX + "/image"
UPSTREAM_KIND = PREFIX + "/upstream-kind"
RESOURCES = {
    PREFIX + f"/{resource}-{bound}": (bound + "s", resource)
    for resource in ("cpu", "memory")
    for bound in ("request", "limit")
}
DEFAULT_BASE_URL_ENV = "OPENAI_BASE_URL"

Outcome = Literal["injected", "skipped", "refused"]
#: The closed sets of reasons, as the metrics label them. Injected pods say how they asked.
INJECTED = ("annotation", "namespace")
SKIPPED = ("not-requested", "opted-out", "already-injected", "value-from", "base-url",
           "upstream-conflict", "bad-annotation", "port-in-use", "host-network")  # fmt: skip
REFUSED = ("malformed", "no-uid", "too-large", "error")

Object = dict[str, Any]
# The routes the sidecar serves at its root: the app keeps its route, the gateway's path prefix
# (anything before the route) moves to the sidecar's upstream URL.
_ROUTE = re.compile(r"(?P<prefix>(?:/[^/]+)*?)(?P<route>/openai/v1|/openai|/v1)/?")
_LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_IMAGE = re.compile(r"[\w][\w.\-/:@]{0,511}")
_QUANTITY = re.compile(
    r"(?P<number>\d+(?:\.\d*)?|\.\d+)(?P<suffix>[eE][+-]?\d+|[KMGTPE]i|[mkMGTPE])?"
)
_SCALE = {"m": Decimal("0.001"), "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9),
          "T": Decimal(10**12), "P": Decimal(10**15), "E": Decimal(10**18),
          **{p + "i": Decimal(2 ** (10 * (n + 1))) for n, p in enumerate("KMGTPE")}}  # fmt: skip


class TemplateError(ValueError):
    """The sidecar template file is missing or not shaped like a pod template's sidecar."""


class BadAnnotation(ValueError):
    """A per-pod annotation has a value the injector cannot use; the message names it."""


@dataclass(frozen=True)
class Template:
    """The sidecar as the template file gives it: labels, grace period, container, volumes."""

    labels: dict[str, str]
    grace_s: int
    container: Object
    volumes: list[Object]

    @classmethod
    def load(cls, path: str | Path, image: str | None = None) -> Template:
        """Read the template; ``image`` (in the manifests the injector's own) replaces its own."""
        try:
            raw = json.loads(Path(path).read_text())
            spec = raw["spec"]
            (container,) = spec["initContainers"]
            grace_s = int(spec["terminationGracePeriodSeconds"])
            template = cls(raw["metadata"]["labels"], grace_s, container, spec["volumes"])
            int(template.container["ports"][0]["containerPort"])
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            raise TemplateError(f"{path}: not a sidecar template ({exc!r})") from exc
        if image:
            template.container["image"] = image
        return template


@dataclass(frozen=True)
class Decision:
    """What to do with one pod: the outcome, its reason, the patch and warnings for the user."""

    outcome: Outcome
    reason: str
    patch: list[Object]
    warnings: list[str]


@dataclass(frozen=True)
class _Options:
    base_url_env: str
    port: int
    image: str
    upstream_kind: str | None
    resources: dict[str, dict[str, str]]


def decide(pod: Object, template: Template, *, namespace_enabled: bool) -> Decision:
    """The decision for ``pod``; ``namespace_enabled`` when its namespace asks for the sidecar."""
    annotations = pod["metadata"].get("annotations") or {}
    spec = pod["spec"]
    requested = annotations.get(INJECT)
    if requested == "false":
        return Decision("skipped", "opted-out", [], [])
    if requested is None and not namespace_enabled:
        return Decision("skipped", "not-requested", [], [])
    if requested not in (None, "true"):
        return _skipped(
            pod, "bad-annotation", f'{INJECT}: expected "true" or "false", got {requested!r}'
        )
    containers: list[Object] = spec["containers"]
    others = (spec.get("initContainers") or []) + containers
    if any(c["name"] == template.container["name"] for c in others):
        return Decision("skipped", "already-injected", [], [])
    if spec.get("hostNetwork"):
        # Every such pod of a node would want the same port of the node.
        return _skipped(pod, "host-network", "a pod on the node's network cannot have the sidecar")
    try:
        options = _options(annotations, template)
    except BadAnnotation as exc:
        return _skipped(pod, "bad-annotation", str(exc))
    if any(p.get("containerPort") == options.port for c in others for p in c.get("ports") or []):
        return _skipped(pod, "port-in-use", f"port {options.port} is taken: set {PORT}")
    upstreams: set[str] = set()
    patch: list[Object] = []
    for i, container in enumerate(containers):
        for j, variable in enumerate(container.get("env") or []):
            if variable["name"] != options.base_url_env:
                continue
            where = f"container {container['name']}: {options.base_url_env}"
            if variable.get("valueFrom") is not None:
                return _skipped(pod, "value-from", f"{where} comes from valueFrom, which the "
                                "injector cannot read: set it as a literal value")  # fmt: skip
            value = variable.get("value") or ""
            if not value or _hostname(value) in _LOOPBACK:
                continue  # unset, or already pointed at something on localhost
            gateway = _gateway(value)
            if gateway is None:
                return _skipped(pod, "base-url", f"{where}={value!r} is not a gateway URL ending "
                                "in /openai/v1, /openai or /v1")  # fmt: skip
            upstreams.add(gateway[0])
            local = f"http://127.0.0.1:{options.port}{gateway[1]}"
            patch.append(_op(local, "spec", "containers", i, "env", j, "value"))
    if len(upstreams) > 1:
        gateways = ", ".join(sorted(upstreams))
        return _skipped(pod, "upstream-conflict", f"containers point {options.base_url_env} at "
                        f"different gateways ({gateways}): one sidecar, one upstream")  # fmt: skip
    warnings = []
    if not upstreams:
        warnings.append(f"no container sets {options.base_url_env} to a gateway URL: the sidecar "
                        "uses SIDECAR_UPSTREAM_URL of its ConfigMap; point the app at "
                        f"http://127.0.0.1:{options.port}/openai/v1")  # fmt: skip
    sidecar = _sidecar(template, options, next(iter(upstreams), None))
    if isinstance(spec.get("initContainers"), list):
        # First: a native sidecar starts before the init containers that follow it.
        patch.append(_op(sidecar, "spec", "initContainers", 0))
    else:
        patch.append(_op([sidecar], "spec", "initContainers"))
    names = {v["name"] for v in spec.get("volumes") or []}
    volumes = [v for v in template.volumes if v["name"] not in names]
    if isinstance(spec.get("volumes"), list):
        patch += [_op(v, "spec", "volumes", "-") for v in volumes]
    elif volumes:
        patch.append(_op(volumes, "spec", "volumes"))
    if (spec.get("terminationGracePeriodSeconds") or 0) < template.grace_s:
        # Room for the sidecar's preStop and shutdown after the app's: a bound, not a delay.
        patch.append(_op(template.grace_s, "spec", "terminationGracePeriodSeconds"))
    patch += _merge(pod, "labels", template.labels)
    patch += _merge(pod, "annotations", {STATUS: "injected"})
    how = "annotation" if requested == "true" else "namespace"
    return Decision("injected", how, patch, warnings)


def _skipped(pod: Object, reason: str, warning: str) -> Decision:
    """Skip a pod that asked for the sidecar, saying why on the pod (warnings on a pod made by a
    controller reach only the controller) and to whoever created it."""
    return Decision("skipped", reason, _merge(pod, "annotations", {STATUS: f"skipped: {reason}"}),
                    [f"not injected ({reason}): {warning}"])  # fmt: skip


def _options(annotations: dict[str, str], template: Template) -> _Options:
    base_url_env = str(annotations.get(BASE_URL_ENV, DEFAULT_BASE_URL_ENV))
    if not _ENV_NAME.fullmatch(base_url_env):
        raise BadAnnotation(f"{BASE_URL_ENV}: not a variable name: {base_url_env!r}")
    port = int(template.container["ports"][0]["containerPort"])
    if PORT in annotations:
        text = annotations[PORT]
        port = int(text) if text.isascii() and text.isdigit() else 0
        if not 1024 <= port <= 65535:  # the sidecar runs as a user that cannot bind below 1024
            raise BadAnnotation(f"{PORT}: expected a port from 1024 to 65535, got {text!r}")
    image = annotations.get(IMAGE, str(template.container["image"]))
    if not _IMAGE.fullmatch(image):
        raise BadAnnotation(f"{IMAGE}: not an image reference: {image!r}")
    kind = annotations.get(UPSTREAM_KIND)
    if kind not in (None, "bifrost", "openai"):
        raise BadAnnotation(f'{UPSTREAM_KIND}: expected "bifrost" or "openai", got {kind!r}')
    resources = copy.deepcopy(template.container.get("resources", {}))
    for annotation, (bound, resource) in RESOURCES.items():
        if annotation in annotations:
            _quantity(annotation, annotations[annotation])
            resources.setdefault(bound, {})[resource] = annotations[annotation]
    for resource in ("cpu", "memory"):
        request = resources.get("requests", {}).get(resource)
        limit = resources.get("limits", {}).get(resource)
        if request and limit and _quantity(resource, request) > _quantity(resource, limit):
            # The API server would refuse the pod itself: better a pod without the sidecar.
            raise BadAnnotation(f"{resource} request {request} exceeds its limit {limit}")
    return _Options(base_url_env, port, image, kind, resources)


def _quantity(name: str, text: str) -> Decimal:
    match = _QUANTITY.fullmatch(text)
    if match is None:
        raise BadAnnotation(f"{name}: not a Kubernetes quantity: {text!r}")
    number, suffix = match["number"], match["suffix"] or ""
    try:
        if suffix[:1] in ("e", "E") and len(suffix) > 1:
            return Decimal(number + suffix)
        return Decimal(number) * _SCALE.get(suffix, Decimal(1))
    except InvalidOperation as exc:
        raise BadAnnotation(f"{name}: not a Kubernetes quantity: {text!r}") from exc


def _hostname(url: str) -> str | None:
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def _gateway(url: str) -> tuple[str, str] | None:
    """(the sidecar's upstream URL, the app's route) of a gateway base URL, else None."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    match = _ROUTE.fullmatch(parts.path)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or not match:
        return None
    return f"{parts.scheme}://{parts.netloc}{match['prefix']}", match["route"]


def _sidecar(template: Template, options: _Options, upstream: str | None) -> Object:
    sidecar = copy.deepcopy(template.container)
    sidecar["image"] = options.image
    sidecar["ports"][0]["containerPort"] = options.port
    sidecar["resources"] = options.resources
    # Explicit env wins over envFrom: these override the ConfigMap for this pod only. The port
    # is always set, so a Service named "sidecar" (its service-link SIDECAR_PORT) cannot clash.
    env = [{"name": "SIDECAR_PORT", "value": str(options.port)}]
    if upstream:
        env.append({"name": "SIDECAR_UPSTREAM_URL", "value": upstream})
    if options.upstream_kind:
        env.append({"name": "SIDECAR_UPSTREAM_KIND", "value": options.upstream_kind})
    sidecar["env"] = env + sidecar.get("env", [])
    return sidecar


def _merge(pod: Object, field: str, entries: dict[str, str]) -> list[Object]:
    """Operations that set ``entries`` in the pod's labels or annotations, nothing if set."""
    current = pod["metadata"].get(field)
    if not isinstance(current, dict):
        return [_op(entries, "metadata", field)]
    return [_op(v, "metadata", field, k) for k, v in entries.items() if current.get(k) != v]


def _op(value: Any, *path: str | int) -> Object:
    pointer = "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in path)
    return {"op": "add", "path": "/" + pointer, "value": value}
