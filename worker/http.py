"""The worker's own HTTP endpoint: ``/healthz``, ``/readyz`` and ``/metrics`` on its port."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web
from redis.exceptions import RedisError

from sidecar.metrics import CONTENT_TYPE, gauge

if TYPE_CHECKING:
    from worker.main import WorkerDeps

__all__ = ["create_worker_http_app", "start_worker_http"]

log = logging.getLogger(__name__)

DEPS: web.AppKey[Any] = web.AppKey("deps", object)
QUEUE: web.AppKey[Any] = web.AppKey("queue", object)
BACKLOG: web.AppKey[list[int]] = web.AppKey("backlog", list)


def create_worker_http_app(deps: WorkerDeps, queue: Any) -> web.Application:
    """The worker's health and metrics endpoints; ``queue`` is arq's Redis (for the backlog)."""
    app = web.Application()
    app[DEPS] = deps
    app[QUEUE] = queue
    app[BACKLOG] = [0]
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics, allow_head=False)
    breaker = deps.store.breaker
    throttle = deps.runner.throttle
    backlog = app[BACKLOG]
    deps.metrics.watch(
        lambda: [
            gauge("sidecar_refresh_backlog", "Refresh jobs waiting in the queue", backlog[0]),
            gauge(
                "sidecar_redis_up", "1 while this process can use Redis", 0 if breaker.down else 1
            ),
            gauge(
                "sidecar_upstream_backoff_seconds",
                "Seconds left of a provider's 429 back-off, as this process knows it",
                throttle.remaining(),
                label="provider",
            ),
        ]
    )
    return app


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    try:
        await request.app[QUEUE].ping()
    except (RedisError, OSError) as exc:
        return web.json_response({"status": "queue unreachable", "error": str(exc)}, status=503)
    return web.json_response({"status": "ready"})


async def _metrics(request: web.Request) -> web.Response:
    deps = request.app[DEPS]
    with contextlib.suppress(RedisError, OSError):
        request.app[BACKLOG][0] = int(await request.app[QUEUE].zcard(deps.settings.queue_name))
    return web.Response(body=deps.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def start_worker_http(deps: WorkerDeps, queue: Any) -> web.AppRunner | None:
    """Serve the endpoints on ``SIDECAR_WORKER_METRICS_PORT`` (0: not at all)."""
    port = deps.settings.worker_metrics_port
    if not port:
        return None
    runner = web.AppRunner(create_worker_http_app(deps, queue), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, deps.settings.host, port).start()
    log.info("worker health and metrics on :%d", port)
    return runner
