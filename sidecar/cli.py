"""The ``sidecar`` command (also ``python -m sidecar``): ``serve`` (production), ``emulate`` (a
fake upstream), ``demo``."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence

from sidecar import __version__, tracing
from sidecar.logs import AccessLogger, configure_logging
from sidecar.settings import Settings, SettingsError, load_settings

__all__ = ["main"]

log = logging.getLogger("sidecar")
#: What ``emulate`` and ``demo`` read of the environment: how to log.
_LOGGING_VARIABLES = ("SIDECAR_LOG_LEVEL", "SIDECAR_LOG_FORMAT", "SIDECAR_ACCESS_LOG")


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError("must be between 0 and 65535")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description=(
            "A caching sidecar for container retrievals through a Bifrost gateway or the OpenAI "
            "API: answers GET /openai/v1/containers/{id} (and /openai/containers/{id}, "
            "/v1/containers/{id}) from Redis in the gateway's exact format."
        ),
        epilog="Settings come from SIDECAR_* environment variables: see README.md. Tracing: "
        "the standard OTEL_* variables (off unless they name an exporter or an endpoint).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the sidecar (configured from SIDECAR_* environment variables)",
        description="Run the production server. Configuration: SIDECAR_* environment "
        "variables; the flags override them.",
    )
    serve.add_argument("--host", help="address to listen on (default SIDECAR_HOST)")
    serve.add_argument("--port", type=_port, help="port to listen on (default SIDECAR_PORT)")
    emulate = commands.add_parser(
        "emulate",
        help="run an emulator of the OpenAI Containers API (and the gateway's routes)",
        description="An OpenAI Containers API emulator for development, tests and benchmarks.",
    )
    try:
        from emulator.cli import add_arguments
    except ImportError:  # the production image ships without the emulator package
        pass
    else:
        add_arguments(emulate)
    demo = commands.add_parser(
        "demo",
        help="emulator + sidecar + embedded store on localhost, with requests to try",
        description="Start the emulator and the sidecar on embedded defaults and show a miss "
        "then a hit (on stdout; logs on stderr, SIDECAR_LOG_FORMAT=json for JSON). Ctrl-C "
        "stops it.",
    )
    demo.add_argument("--port", type=_port, default=8080, help="sidecar port (default 8080)")
    demo.add_argument("--once", action="store_true", help="show the requests, then exit")
    inject = commands.add_parser(
        "inject",
        help="run the admission webhook that attaches the sidecar to annotated pods",
        description="A mutating admission webhook (AdmissionReview v1 over TLS): pods annotated "
        'bifrost-container-sidecar/inject: "true" get the sidecar. See deploy/README.md.',
    )
    inject.add_argument("--cert-file", required=True, help="the TLS certificate (PEM)")
    inject.add_argument("--key-file", required=True, help="the TLS private key (PEM)")
    inject.add_argument("--port", type=_port, default=8443, help="port (default 8443)")
    inject.add_argument("--host", help="address to listen on (default all, IPv4 and IPv6)")
    inject.add_argument(
        "--template",
        default="/etc/bifrost-sidecar-injector/template/sidecar.json",
        help="the sidecar to inject (deploy/kubernetes/injector/sidecar.json)",
    )
    inject.add_argument("--image", help="the sidecar's image (default the template's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sidecar`` console script and of ``python -m sidecar``."""
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "inject":
        return inject(args)
    if importlib.util.find_spec("emulator") is None:
        print(
            f"sidecar: {args.command} needs the emulator, a development tool this installation "
            "lacks: install the project from its source tree (pip install -e .)",
            file=sys.stderr,
        )
        return 2
    if args.command == "emulate":
        return emulate(args)
    return demo(args)


def _configuration_error(message: str) -> int:
    print(f"sidecar: configuration error: {message}", file=sys.stderr)
    return 2


def serve(args: argparse.Namespace) -> int:
    """``sidecar serve``: the production server; SIGTERM drains in-flight requests."""
    flags = {"host": args.host, "port": args.port}
    try:
        settings = load_settings(
            **{name: value for name, value in flags.items() if value is not None}
        )
        tracing.tracing_exporters()  # checked here, started in each serving process
    except (SettingsError, tracing.TracingConfigError) as exc:
        return _configuration_error(str(exc))
    configure_logging(settings)
    from sidecar.serve import run_server

    return run_server(settings)


def inject(args: argparse.Namespace) -> int:
    """``sidecar inject``: the admission webhook, until SIGTERM."""
    from aiohttp import web

    from sidecar.inject import Template, TemplateError
    from sidecar.webhook import CertificateFiles, create_injector_app

    try:
        _configure_logging()
        template = Template.load(args.template, args.image)
        certificate = CertificateFiles(args.cert_file, args.key_file)
    except (SettingsError, TemplateError, OSError, ValueError) as exc:
        return _configuration_error(str(exc))
    log.info("injector listening on https://%s:%d", args.host or "*", args.port)
    web.run_app(create_injector_app(template, certificate), host=args.host, port=args.port,
                ssl_context=certificate.context, print=None, access_log=None,
                # The API server waits 5 s at most: nothing in flight lasts longer.
                shutdown_timeout=5)  # fmt: skip
    return 0


def _configure_logging() -> Settings:
    """Configure logging from the environment's logging variables only (emulate, demo, inject)."""
    env = {name: os.environ[name] for name in _LOGGING_VARIABLES if name in os.environ}
    settings = load_settings(env, upstream_kind="openai")
    configure_logging(settings)
    return settings


def emulate(args: argparse.Namespace) -> int:
    """``sidecar emulate``: the OpenAI Containers API emulator."""
    from aiohttp import web

    from emulator import create_emulator_app
    from emulator.cli import config_from_args

    try:
        log_settings = _configure_logging()
    except SettingsError as exc:
        return _configuration_error(str(exc))
    config = config_from_args(args)
    log.info("emulator listening on http://%s:%d", args.host, args.port)
    web.run_app(
        create_emulator_app(config),
        host=args.host,
        port=args.port,
        print=None,
        access_log_class=AccessLogger,
        access_log=logging.getLogger("emulator.access") if log_settings.access_log else None,
    )
    return 0


def demo(args: argparse.Namespace) -> int:
    """``sidecar demo``: emulator, sidecar and embedded store on localhost, a miss then a hit."""
    try:
        log_settings = _configure_logging()
        tracing.tracing_exporters()
    except (SettingsError, tracing.TracingConfigError) as exc:
        return _configuration_error(str(exc))
    from emulator.demo import run_demo

    tracing.setup_tracing(tracing.SIDECAR_SERVICE)
    try:
        return run_demo(port=args.port, once=args.once, log_settings=log_settings)
    finally:
        tracing.shutdown_tracing()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
