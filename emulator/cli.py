"""The ``sidecar emulate`` flags, and the :class:`EmulatorConfig` they describe."""

from __future__ import annotations

import argparse

from emulator.config import STANDARD_PROVIDERS, EmulatorConfig

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


def _custom_provider(text: str) -> tuple[str, str]:
    name, sep, base = (part.strip() for part in text.partition("="))
    if not sep or not name or base not in STANDARD_PROVIDERS:
        raise argparse.ArgumentTypeError(
            "expected NAME=BASE with BASE a built-in provider, e.g. my-openai-eu=openai; "
            f"got {text!r}"
        )
    return name, base


def _providers(text: str) -> frozenset[str]:
    names = frozenset(name.strip() for name in text.split(",") if name.strip())
    unknown = names - STANDARD_PROVIDERS
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown provider(s): {', '.join(sorted(unknown))}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the emulator's flags to ``parser``."""
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8090, help="port to listen on")
    parser.add_argument(
        "--latency-ms", type=_latency, default=0.0, help="delay added to every API answer"
    )
    parser.add_argument(
        "--stream-delay-ms",
        type=_latency,
        default=0.0,
        help="pause between two events of a streamed answer (chat completions, responses)",
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
    gateway = parser.add_argument_group(
        "gateway face", "how /openai/v1/... and /openai/... stand in for a Bifrost gateway"
    )
    gateway.add_argument(
        "--custom-provider",
        action="append",
        default=[],
        type=_custom_provider,
        metavar="NAME=BASE",
        help="an operator-named provider built on a built-in one, e.g. my-openai-eu=openai "
        "(repeatable); it answers like its base provider",
    )
    gateway.add_argument(
        "--container-providers",
        type=_providers,
        default=frozenset({"openai", "azure"}),
        metavar="P[,P...]",
        help="built-in providers with a containers API (default: openai,azure); the others "
        "answer unsupported_operation",
    )
    gateway.add_argument(
        "--optional-virtual-keys",
        action="store_true",
        help="serve requests without any credential with the gateway's own key "
        "(default: they get 401 virtual_key_required)",
    )
    gateway.add_argument(
        "--gateway-key",
        default="sk-emulator-gateway-key",
        metavar="KEY",
        help="the gateway's own provider key, which serves requests without a credential",
    )
    gateway.add_argument(
        "--gateway-version",
        choices=("current", "legacy"),
        default="current",
        help="current: unsupported operations are 400 and extra_fields carry routing_info and "
        "upstream_latency; legacy: 500 and neither",
    )
    gateway.add_argument(
        "--v1-as-gateway",
        action="store_true",
        help="answer /v1/... as the gateway's native routes (provider/model names, provider "
        "required on container routes) instead of as OpenAI itself",
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
        stream_delay_ms=ns.stream_delay_ms,
        projects=projects,
        revoked_keys=frozenset(ns.revoked_key),
        default_expires_minutes=ns.default_expires_minutes,
        custom_providers=tuple(ns.custom_provider),
        container_providers=ns.container_providers,
        virtual_keys="optional" if ns.optional_virtual_keys else "required",
        gateway_key=ns.gateway_key,
        gateway_version=ns.gateway_version,
        v1_face="gateway" if ns.v1_as_gateway else "openai",
    )
