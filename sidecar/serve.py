"""``sidecar serve``: one server process on uvloop, stopped gracefully.

One process per container, as is usual in Kubernetes: replicas scale it, and each process's
``/metrics`` is its own (sum across pods in queries). On SIGTERM (or SIGINT) readiness fails at
once, the listener closes and in-flight requests get ``SIDECAR_SHUTDOWN_TIMEOUT_S`` to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from sidecar import __version__, tracing
from sidecar.app import create_app
from sidecar.logs import access_log_options
from sidecar.runner import SidecarRunner
from sidecar.settings import Settings, upstream_base

__all__ = ["run_server"]

log = logging.getLogger("sidecar")


def run_server(settings: Settings) -> int:
    """Serve until SIGTERM; 1 if the port cannot be listened on."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover (installed with the package where it exists)
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    tracing.setup_tracing(tracing.SIDECAR_SERVICE)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_serve(settings))
    finally:
        tracing.shutdown_tracing()


async def _serve(settings: Settings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    embedded = None
    if not settings.redis_url:
        from worker.embedded import start_embedded_worker  # the embedded default's worker

        embedded = start_embedded_worker
    app = create_app(settings, embedded_worker=embedded)
    runner = SidecarRunner(
        app, shutdown_timeout=settings.shutdown_timeout_s, **access_log_options(settings)
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port).start()
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        await runner.cleanup()
        return 1
    log.info(
        "sidecar %s: %s upstream %s, listening on %s:%d",
        __version__,
        settings.upstream_kind,
        upstream_base(settings),
        settings.host,
        settings.port,
    )
    await stop.wait()
    await runner.cleanup()  # the app's on_shutdown fails readiness before requests finish
    return 0
