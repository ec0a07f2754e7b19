"""The worker's own ``/healthz``, ``/readyz`` and ``/metrics``, answered from memory whatever
Redis does: a probe reads the refresh backlog from the queue every second (under a timeout), and
the endpoints report its last reading (``sidecar_redis_up`` is 0 while the probe or the cache's
breaker finds Redis failing or hung)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from sidecar import health
from sidecar.metrics import gauge, process_gauges
from sidecar.queue import refresh_backlog
from sidecar.store import REDIS_ERRORS
from worker.refresh import RefreshRunner

__all__ = ["start_worker_http"]

log = logging.getLogger(__name__)

_PROBE_EVERY_S = 1.0
_PROBE_TIMEOUT_S = 0.5


@dataclass
class _QueueProbe:
    """The last reading of the refresh backlog (kept while the queue cannot be read)."""

    backlog: int = 0
    up: bool = True
    error: str = ""

    async def run(self, queue: Any, runner: RefreshRunner) -> None:
        while True:
            try:
                reading = refresh_backlog(queue, runner.settings)
                backlog = await asyncio.wait_for(reading, _PROBE_TIMEOUT_S)
            except (TimeoutError, *REDIS_ERRORS) as exc:
                self.up, self.error = False, f"{type(exc).__name__}: {exc}".rstrip(": ")
            else:
                self.up, self.error, self.backlog = True, "", backlog
            await asyncio.sleep(_PROBE_EVERY_S)


async def start_worker_http(runner: RefreshRunner, queue: Any) -> web.AppRunner | None:
    """Serve the endpoints on ``SIDECAR_WORKER_METRICS_PORT`` (0: not at all); ``queue`` is
    arq's Redis."""
    settings, metrics = runner.settings, runner.metrics
    if not settings.worker_metrics_port:
        return None
    probe = _QueueProbe()

    async def probing(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.ensure_future(probe.run(queue, runner))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def readyz(request: web.Request) -> web.Response:
        if not probe.up:
            body = {"status": "queue unreachable", "error": probe.error}
            return web.json_response(body, status=503)
        return web.json_response({"status": "ready", "refresh_backlog": probe.backlog})

    metrics.watch(
        lambda: [
            gauge("sidecar_refresh_backlog", "Refresh jobs due and not finished", probe.backlog),
            *process_gauges(
                probe.up and not runner.store.breaker.down, runner.throttle.remaining()
            ),
        ]
    )
    app = web.Application()
    app.cleanup_ctx.append(probing)
    health.add_routes(app.router, ready=readyz, render=metrics.render)
    app_runner = web.AppRunner(app, access_log=None)
    await app_runner.setup()
    await web.TCPSite(app_runner, settings.host, settings.worker_metrics_port).start()
    log.info("worker health and metrics on :%d", settings.worker_metrics_port)
    return app_runner
