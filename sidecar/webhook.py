"""``sidecar inject``: the mutating admission webhook that attaches the sidecar to pods.

AdmissionReview ``v1`` on ``POST /mutate`` (annotated pods) and ``POST /mutate/namespace`` (pods
of a labelled namespace: a review does not carry its namespace's labels, so the webhook
configuration's namespaceSelector sends them there). A pod is never blocked: every review with
a uid is answered 200, allowed, unchanged with a warning when the injector cannot use it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, generate_latest

from sidecar import health
from sidecar.inject import INJECTED, PREFIX, REFUSED, SKIPPED, Decision, Object, Template, decide

__all__ = ["MAX_REVIEW_BYTES", "CertificateFiles", "create_injector_app"]

log = logging.getLogger(__name__)

#: A pod is at most ~1.5 MiB (etcd's limit); a review holds one, plus its envelope.
MAX_REVIEW_BYTES = 3 * 1024 * 1024
_API_VERSION = "admission.k8s.io/v1"
_RELOAD_EVERY_S = 60.0
_POD = {"group": "", "version": "v1", "kind": "Pod"}
_TEMPLATE = web.AppKey("template", Template)
_PODS = web.AppKey("pods", Counter)


class CertificateFiles:
    """A TLS server context whose certificate is reloaded when its files change (cert-manager
    renews the Secret in place; the kubelet updates the mounted files)."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._stamp: tuple[float, float] | None = None
        self.reload()

    def reload(self) -> bool:
        """Load the files again if they changed (for new connections); whether they did."""
        stamp = (os.stat(self.cert_file).st_mtime, os.stat(self.key_file).st_mtime)
        if stamp == self._stamp:
            return False
        self.context.load_cert_chain(self.cert_file, self.key_file)
        self._stamp = stamp
        return True

    async def reloading(self, app: web.Application) -> AsyncIterator[None]:
        """The injector's cleanup context: the files are checked every minute while it runs."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(_RELOAD_EVERY_S)
                try:
                    if self.reload():
                        log.info("injector: reloaded %s", self.cert_file)
                except (OSError, ssl.SSLError) as exc:  # mid-update: keep the old one, retry
                    log.warning("injector: cannot reload %s: %s", self.cert_file, exc)

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def create_injector_app(
    template: Template, certificate: CertificateFiles | None = None
) -> web.Application:
    """The injector's application; with ``certificate``, its files are reloaded as they change."""
    app = web.Application(client_max_size=MAX_REVIEW_BYTES)
    app[_TEMPLATE] = template
    registry = CollectorRegistry()
    about = "Pods reviewed by the injector, by outcome and reason"
    app[_PODS] = pods = Counter(
        "sidecar_injector_pods", about, ["outcome", "reason"], registry=registry
    )
    for outcome, reasons in (("injected", INJECTED), ("skipped", SKIPPED), ("refused", REFUSED)):
        for reason in reasons:
            pods.labels(outcome, reason)  # at 0 from the start, so rate() sees the first one
    if certificate is not None:
        app.cleanup_ctx.append(certificate.reloading)
    app.router.add_post("/mutate", mutate)
    app.router.add_post("/mutate/namespace", mutate)
    # Ready as soon as it serves: the template is loaded before the port opens.
    health.add_routes(app.router, ready=_ok, healthz=_ok, render=partial(generate_latest, registry))
    return app


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def mutate(request: web.Request) -> web.Response:
    """``POST /mutate`` and ``/mutate/namespace``: one AdmissionReview, answered allowed."""
    started = time.perf_counter()
    pods = request.app[_PODS]
    try:
        review = msgspec.json.decode(await request.read())
    except web.HTTPRequestEntityTooLarge:
        pods.labels("refused", "too-large").inc()
        log.warning("injector: refused a review over %d bytes", MAX_REVIEW_BYTES)
        return web.Response(
            status=413, text=f"an AdmissionReview is at most {MAX_REVIEW_BYTES} bytes\n"
        )
    except msgspec.DecodeError:
        review = None
    uid = _get(review, "request", "uid")
    if not isinstance(uid, str) or not uid:
        pods.labels("refused", "no-uid").inc()
        log.warning("injector: refused a request that is not an AdmissionReview with a uid")
        return web.Response(status=400, text="expected an AdmissionReview v1 with request.uid\n")
    problem = _problem(review)
    if problem:
        pods.labels("refused", "malformed").inc()
        log.warning("injector: review %s: %s; allowed unchanged", uid, problem)
        return _answer(uid, Decision("refused", "malformed", [], [f"{problem}; allowed unchanged"]))
    pod: Object = review["request"]["object"]
    try:
        decision = decide(pod, request.app[_TEMPLATE],
                          namespace_enabled=request.path.endswith("/namespace"))  # fmt: skip
    except (KeyError, TypeError, AttributeError) as exc:
        warning = f"the pod is not shaped as a v1 Pod ({exc!r}); allowed unchanged"
        decision = Decision("refused", "malformed", [], [warning])
    except Exception:  # never a 500: the pod is allowed, the bug logged
        log.exception("injector: review %s", uid)
        decision = Decision("refused", "error", [], ["the injector failed; allowed unchanged"])
    pods.labels(decision.outcome, decision.reason).inc()
    metadata = pod.get("metadata") or {}
    name = metadata.get("name") or f"{metadata.get('generateName', '')}*"
    level = logging.DEBUG if decision.reason == "not-requested" else logging.INFO
    namespace, took_ms = review["request"].get("namespace"), (time.perf_counter() - started) * 1e3
    log.log(level, "injector: pod %s/%s %s (%s) in %.1f ms",
            namespace, name, decision.outcome, decision.reason, took_ms)  # fmt: skip
    return _answer(uid, decision)


def _get(obj: Any, *path: str) -> Any:
    for key in path:
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


def _problem(review: Object) -> str | None:
    """What makes the review unusable, if anything (the injector reviews pod creations only)."""
    request = review["request"]
    if review.get("apiVersion") != _API_VERSION or review.get("kind") != "AdmissionReview":
        return f"expected an AdmissionReview {_API_VERSION}"
    if request.get("kind") != _POD or request.get("operation") != "CREATE":
        return "expected the creation of a v1 Pod"
    pod = request.get("object")
    if not isinstance(_get(pod, "metadata"), dict) or not isinstance(_get(pod, "spec"), dict):
        return "request.object is not a Pod with metadata and spec"
    if not isinstance(pod["spec"].get("containers"), list):
        return "request.object has no containers"
    annotations = pod["metadata"].get("annotations") or {}
    if not isinstance(annotations, dict) or not all(
        isinstance(v, str) for v in annotations.values()
    ):
        return "request.object's annotations are not strings"
    return None


def _answer(uid: str, decision: Decision) -> web.Response:
    response: Object = {"uid": uid, "allowed": True}
    if decision.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(msgspec.json.encode(decision.patch)).decode()
    if decision.warnings:
        # The API server passes warnings on up to 256 characters each.
        warnings = [f"{PREFIX}: {w}" for w in decision.warnings]
        response["warnings"] = [w if len(w) <= 256 else w[:253] + "..." for w in warnings]
    return web.json_response({"apiVersion": _API_VERSION, "kind": "AdmissionReview",
                              "response": response})  # fmt: skip
