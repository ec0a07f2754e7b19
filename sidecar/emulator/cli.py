"""The ``sidecar emulate`` flags, and the :class:`EmulatorConfig` they describe."""

from __future__ import annotations

import argparse

from sidecar.emulator.state import EmulatorConfig

__all__ = ["add_arguments", "config_from_args"]


def _minutes(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1440:
        raise argparse.ArgumentTypeError("must be between 1 and 1440")
    return value


def _latency(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the emulator's flags to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8090, help="port to listen on")
    parser.add_argument(
        "--latency-ms", type=_latency, default=0.0, help="delay added to every API answer"
    )
    parser.add_argument(
        "--project",
        action="append",
        default=[],
        metavar="KEY[,KEY...]",
        help="API keys sharing one project (repeatable); other keys each get their own",
    )
    parser.add_argument(
        "--revoked-key",
        action="append",
        default=[],
        metavar="KEY",
        help="an API key answered 401 invalid_api_key (repeatable)",
    )
    parser.add_argument(
        "--default-expires-minutes",
        type=_minutes,
        default=20,
        help="idle minutes before a container expires, when its creator does not say",
    )


def config_from_args(ns: argparse.Namespace) -> EmulatorConfig:
    """The emulator's configuration from parsed flags."""
    projects = tuple(
        keys
        for group in ns.project
        if (keys := tuple(key.strip() for key in group.split(",") if key.strip()))
    )
    return EmulatorConfig(
        latency_ms=ns.latency_ms,
        projects=projects,
        revoked_keys=frozenset(ns.revoked_key),
        default_expires_minutes=ns.default_expires_minutes,
    )
