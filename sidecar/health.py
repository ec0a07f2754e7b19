"""Operations endpoints: ``/healthz`` (alive), ``/readyz`` (take traffic), ``/metrics``."""

from __future__ import annotations

import time

from aiohttp import web

from sidecar.metrics import CONTENT_TYPE
from sidecar.state import DRAINING, SERVICES

__all__ = ["add_routes"]

_UPSTREAM_FAILING_FOR_S = 30.0


async def healthz(request: web.Request) -> web.Response:
    """The process serves."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready for traffic unless draining. Redis and the upstream are reported, never gating: the
    sidecar serves fail-open, and in a native sidecar pod its readiness gates the app's."""
    services = request.app[SERVICES]
    draining = request.app[DRAINING].is_set()
    last_failure = services.upstream.last_failure
    upstream_failing = (
        last_failure is not None and time.monotonic() - last_failure < _UPSTREAM_FAILING_FOR_S
    )
    refresh = services.service.refresher
    body = {
        "status": "draining" if draining else "ready",
        "redis": "down (serving fail-open)" if services.store.breaker.down else "up",
        "upstream": "failing" if upstream_failing else "ok",
        "background_refresh": type(refresh).__name__ if refresh is not None else "off",
        "local_copies": len(services.service.local),
    }
    return web.json_response(body, status=503 if draining else 200)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition of this process's metrics."""
    body = request.app[SERVICES].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the operations endpoints."""
    router.add_get("/healthz", healthz, allow_head=True)
    router.add_get("/readyz", readyz, allow_head=True)
    router.add_get("/metrics", metrics, allow_head=False)
