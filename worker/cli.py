"""``sidecar-worker``: the arq worker that keeps cached containers fresh."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from arq.worker import async_check_health

from sidecar import __version__, tracing
from sidecar.logs import configure_logging
from sidecar.queue import queue_redis_settings
from sidecar.settings import SettingsError, load_settings
from worker.main import create_worker
from worker.queue_worker import QuietJobStarts

__all__ = ["main"]

log = logging.getLogger("worker")


def _parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sidecar-worker`` console script."""
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        redis_settings = queue_redis_settings(settings)
        tracing.tracing_exporters()  # an OTEL_* mistake stops start-up, naming the variable
    except (SettingsError, tracing.TracingConfigError) as exc:
        print(f"sidecar-worker: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    logging.getLogger("arq.worker").addFilter(QuietJobStarts())
    if args.check:
        return int(asyncio.run(async_check_health(redis_settings, queue_name=settings.queue_name)))
    if not settings.refresh_enabled:
        print(
            "sidecar-worker: configuration error: SIDECAR_SERVICE_API_KEY: required (the "
            "credential the workers refresh with); without it the sidecar revalidates inline",
            file=sys.stderr,
        )
        return 2
    _use_uvloop()
    if tracing.setup_tracing(tracing.WORKER_SERVICE):
        tracing.instrument_redis()
    try:
        create_worker(settings, burst=args.burst).run()
    finally:
        tracing.shutdown_tracing()
    return 0


def _use_uvloop() -> None:
    """Run on uvloop where it is installed (a third less CPU a refresh)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return
    asyncio.set_event_loop(uvloop.new_event_loop())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
