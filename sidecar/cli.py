"""The ``sidecar`` command: ``serve`` (production), ``emulate`` (a fake upstream), ``demo``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from aiohttp import web

from sidecar import __version__
from sidecar.settings import Settings, SettingsError, load_settings

__all__ = ["configure_logging", "main"]

log = logging.getLogger("sidecar")
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'


def configure_logging(level: str) -> None:
    """One log format for every entry point."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description=(
            "A caching sidecar for container retrievals through a Bifrost gateway or the OpenAI "
            "API: answers GET /openai/v1/containers/{id} (and /openai/containers/{id}, "
            "/v1/containers/{id}) from Redis in the gateway's exact format."
        ),
        epilog="Settings come from SIDECAR_* environment variables: see README.md.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser(
        "serve",
        help="run the sidecar (configured from SIDECAR_* environment variables)",
        description="Run the production server. Configuration: SIDECAR_* environment variables.",
    )
    emulate = commands.add_parser(
        "emulate",
        help="run an emulator of the OpenAI Containers API (and the gateway's routes)",
        description="An OpenAI Containers API emulator for development, tests and benchmarks.",
    )
    from sidecar.emulator.cli import add_arguments

    add_arguments(emulate)
    demo = commands.add_parser(
        "demo",
        help="emulator + sidecar + embedded store on localhost, with requests to try",
        description="Start the emulator and the sidecar on embedded defaults and show a miss "
        "then a hit. Ctrl-C stops it.",
    )
    demo.add_argument("--port", type=int, default=8080, help="sidecar port (default 8080)")
    demo.add_argument("--once", action="store_true", help="show the requests, then exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sidecar`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve()
    if args.command == "emulate":
        return emulate(args)
    from sidecar.demo import run_demo

    configure_logging("INFO")
    return run_demo(port=args.port, once=args.once)


def _settings_or_exit() -> Settings | None:
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"sidecar: configuration error: {exc}", file=sys.stderr)
        return None


def serve() -> int:
    """``sidecar serve``: the production server; SIGTERM drains in-flight requests."""
    settings = _settings_or_exit()
    if settings is None:
        return 2
    configure_logging(settings.log_level)
    from sidecar.app import create_app
    from worker.embedded import start_embedded_worker  # the embedded default's worker

    log.info(
        "sidecar %s: %s upstream %s, listening on %s:%d",
        __version__,
        settings.upstream_kind,
        settings.upstream_url or "https://api.openai.com",
        settings.host,
        settings.port,
    )
    web.run_app(
        create_app(settings, embedded_worker=start_embedded_worker),
        host=settings.host,
        port=settings.port,
        access_log=logging.getLogger("sidecar.access") if settings.access_log else None,
        access_log_format=ACCESS_LOG_FORMAT,
        shutdown_timeout=settings.shutdown_timeout_s,
        print=None,
    )
    return 0


def emulate(args: argparse.Namespace) -> int:
    """``sidecar emulate``: the OpenAI Containers API emulator."""
    from sidecar.emulator import create_emulator_app
    from sidecar.emulator.cli import config_from_args

    configure_logging("INFO")
    config = config_from_args(args)
    log.info("emulator listening on http://%s:%d", args.host, args.port)
    web.run_app(create_emulator_app(config), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
