"""``sidecar-worker``: the arq worker that keeps cached containers fresh."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

from arq.worker import async_check_health

from sidecar import __version__, tracing
from sidecar.logs import configure_logging
from sidecar.queue import queue_redis_settings
from sidecar.settings import Settings, SettingsError, load_settings
from worker.main import run_worker

__all__ = ["main"]

log = logging.getLogger("worker")


def _quiet_job_starts(record: logging.LogRecord) -> bool:
    """arq's job-start lines (``→ job(...)``) only at DEBUG: the end line says what happened and
    how long it took, one line a job."""
    if record.levelno == logging.INFO and str(record.msg).startswith("%6.2fs → "):
        return log.isEnabledFor(logging.DEBUG)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sidecar-worker`` console script."""
    parser = argparse.ArgumentParser(
        prog="sidecar-worker",
        description=(
            "Refresh cached containers in the background (arq): stale entries on demand and "
            "recently read entries ahead of going stale. Settings: SIDECAR_* environment "
            "variables (see README.md); SIDECAR_SERVICE_API_KEY is required."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 0 if a worker of this queue reported healthy recently (a liveness probe)",
    )
    parser.add_argument(
        "--burst", action="store_true", help="run the queued jobs, then exit (for tests and cron)"
    )
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        redis_settings = queue_redis_settings(settings)
        tracing.tracing_exporters()  # an OTEL_* mistake stops start-up, naming the variable
    except (SettingsError, tracing.TracingConfigError) as exc:
        print(f"sidecar-worker: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    logging.getLogger("arq.worker").addFilter(_quiet_job_starts)
    if args.check:
        return int(asyncio.run(async_check_health(redis_settings, queue_name=settings.queue_name)))
    if not settings.refresh_enabled:
        print(
            "sidecar-worker: configuration error: SIDECAR_SERVICE_API_KEY: required (the "
            "credential the workers refresh with); without it the sidecar revalidates inline",
            file=sys.stderr,
        )
        return 2
    tracing.setup_tracing(tracing.WORKER_SERVICE)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_run(settings, args.burst))
    finally:
        tracing.shutdown_tracing()
    return 0


async def _run(settings: Settings, burst: bool) -> None:
    """Run the worker until SIGTERM or SIGINT, then stop gracefully."""
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stopping.set)
    await run_worker(settings, burst=burst, stopping=stopping)


def _loop_factory() -> Any:
    """uvloop where it is installed (a third less CPU a refresh)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return None
    return uvloop.new_event_loop
