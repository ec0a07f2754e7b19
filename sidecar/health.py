"""Operations endpoints of every process (sidecar, worker, injector): ``/healthz`` (alive),
``/readyz`` (take traffic), ``/metrics``."""

from __future__ import annotations

import time
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler

from sidecar.metrics import CONTENT_TYPE
from sidecar.state import DRAINING, SERVICES

__all__ = ["add_routes", "alive", "readyz"]

_UPSTREAM_FAILING_FOR_S = 30.0


async def alive(request: web.Request) -> web.Response:
    """The process serves."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """The sidecar is ready for traffic unless draining. Redis and the upstream are reported, never
    gating: the sidecar serves fail-open, and in a native sidecar pod its readiness gates the
    app's."""
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


def add_routes(
    router: web.UrlDispatcher,
    *,
    ready: Handler,
    render: Callable[[], bytes],
    healthz: Handler = alive,
) -> None:
    """Register the operations endpoints; ``render`` gives the Prometheus text exposition."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=render(), headers={"Content-Type": CONTENT_TYPE})

    router.add_get("/healthz", healthz)
    router.add_get("/readyz", ready)
    router.add_get("/metrics", metrics, allow_head=False)
