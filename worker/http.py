"""The worker's own HTTP endpoint: ``/healthz``, ``/readyz`` and ``/metrics`` on its port.

Every answer comes from memory, whatever Redis does: a background probe reads the refresh
backlog from the queue every second under a timeout, and the endpoints report its last reading
(``sidecar_redis_up`` is 0 while the probe or the cache's breaker finds Redis failing or hung).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from sidecar.metrics import CONTENT_TYPE, gauge
from sidecar.queue import refresh_backlog
from sidecar.store import REDIS_ERRORS

if TYPE_CHECKING:
    from worker.main import WorkerDeps

__all__ = ["QueueProbe", "create_worker_http_app", "start_worker_http"]

log = logging.getLogger(__name__)

DEPS: web.AppKey[Any] = web.AppKey("deps", object)
PROBE: web.AppKey[Any] = web.AppKey("probe", object)


class QueueProbe:
    """Reads the refresh backlog every ``every_s``, giving up after ``timeout_s``."""

    def __init__(
        self, deps: WorkerDeps, queue: Any, every_s: float = 1.0, timeout_s: float = 0.5
    ) -> None:
        self._deps = deps
        self._queue = queue
        self._every_s = every_s
        self._timeout_s = timeout_s
        self.backlog = 0
        """The last backlog read (kept while the queue cannot be read)."""
        self.up = True
        """The last read succeeded in time."""
        self.error = ""

    async def run(self) -> None:
        """Probe until cancelled."""
        while True:
            try:
                backlog = await asyncio.wait_for(
                    refresh_backlog(self._queue, self._deps.settings), self._timeout_s
                )
            except (TimeoutError, *REDIS_ERRORS) as exc:
                self.up, self.error = False, f"{type(exc).__name__}: {exc}".rstrip(": ")
            else:
                self.up, self.error, self.backlog = True, "", backlog
            await asyncio.sleep(self._every_s)

    @property
    def redis_up(self) -> bool:
        """The queue answered the last probe and the cache's Redis is not failing."""
        return self.up and not self._deps.store.breaker.down


def create_worker_http_app(deps: WorkerDeps, queue: Any) -> web.Application:
    """The worker's health and metrics endpoints; ``queue`` is arq's Redis (for the backlog)."""
    app = web.Application()
    probe = QueueProbe(deps, queue)
    app[DEPS] = deps
    app[PROBE] = probe
    app.cleanup_ctx.append(_probing)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics, allow_head=False)
    throttle = deps.runner.throttle
    deps.metrics.watch(
        lambda: [
            gauge("sidecar_refresh_backlog", "Refresh jobs due and not finished", probe.backlog),
            gauge("sidecar_redis_up", "1 while this process can use Redis", int(probe.redis_up)),
            gauge(
                "sidecar_upstream_backoff_seconds",
                "Seconds left of a provider's 429 back-off, as this process knows it",
                throttle.remaining(),
                label="provider",
            ),
        ]
    )
    return app


async def _probing(app: web.Application) -> Any:
    task = asyncio.ensure_future(app[PROBE].run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.Response:
    probe = request.app[PROBE]
    if not probe.up:
        return web.json_response({"status": "queue unreachable", "error": probe.error}, status=503)
    return web.json_response({"status": "ready", "refresh_backlog": probe.backlog})


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[DEPS].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


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
