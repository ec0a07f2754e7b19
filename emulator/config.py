"""How the emulator starts: :class:`EmulatorConfig`, for its OpenAI face and its gateway face."""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["STANDARD_PROVIDERS", "EmulatorConfig", "GatewayVersion", "V1Face", "VirtualKeys"]

#: The gateway's built-in providers (the enum of the endpoint's reference page): every one of
#: them is configured on the emulated gateway, and only those in ``container_providers`` (or a
#: custom provider built on one of them) has a containers API.
STANDARD_PROVIDERS: frozenset[str] = frozenset(
    (
        "openai", "azure", "anthropic", "bedrock", "cohere", "vertex", "vllm", "mistral",
        "ollama", "groq", "sgl", "parasail", "perplexity", "replicate", "cerebras", "gemini",
        "openrouter", "elevenlabs", "huggingface", "nebius", "xai", "runway", "fireworks",
    )
)  # fmt: skip
VirtualKeys = Literal["required", "optional"]
# "current": unsupported operations are 400, extra_fields carry routing_info and
# upstream_latency. "legacy": unsupported operations are 500 on /openai/..., no routing_info.
GatewayVersion = Literal["current", "legacy"]
# Who answers /v1: OpenAI itself (the emulator is then OpenAI and a gateway in front of it), or
# the gateway's native routes (a gateway alone: provider/model names, ``provider`` required on
# container routes, the gateway's keys and shapes).
V1Face = Literal["openai", "gateway"]


class EmulatorConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How the emulator starts; latency, faults, keys and the clock can change later over HTTP.

    The OpenAI face (``/v1``) authenticates with the caller's API key: keys in one of
    ``projects`` share containers and files, any other key is a project of its own. The gateway
    face (``/openai/v1``, ``/openai``) stands in for a Bifrost gateway in front of that API.
    """

    latency_ms: float = 0.0
    # The pause between two events of a stream (chat completions, responses).
    stream_delay_ms: float = 0.0
    # Groups of API keys sharing one project; a key listed nowhere is a project of its own.
    projects: tuple[tuple[str, ...], ...] = ()
    # Keys answered with OpenAI's 401 invalid_api_key.
    revoked_keys: frozenset[str] = frozenset()
    default_expires_minutes: int = 20
    # Operator-named providers of the gateway and the built-in provider each is built on,
    # e.g. (("my-openai-eu", "openai"),): they answer like their base provider.
    custom_providers: tuple[tuple[str, str], ...] = ()
    # Base providers whose containers API the gateway implements.
    container_providers: frozenset[str] = frozenset({"openai", "azure"})
    # "required": a gateway request without any credential is a 401 virtual_key_required;
    # "optional": it is served with the gateway's own provider key, ``gateway_key``.
    virtual_keys: VirtualKeys = "required"
    gateway_key: str = "sk-emulator-gateway-key"
    gateway_version: GatewayVersion = "current"
    v1_face: V1Face = "openai"

    def __post_init__(self) -> None:
        if self.latency_ms < 0 or self.stream_delay_ms < 0:
            raise ValueError("latency_ms and stream_delay_ms must be >= 0")
        if not 1 <= self.default_expires_minutes <= 1440:
            raise ValueError("default_expires_minutes must be between 1 and 1440")
        keys = [key for group in self.projects for key in group]
        if len(keys) != len(set(keys)):
            raise ValueError("an API key may belong to one project only")
        if not self.gateway_key:
            raise ValueError("gateway_key must not be empty")
        for name, base in self.custom_providers:
            if not name or name in STANDARD_PROVIDERS:
                raise ValueError(f"custom provider {name!r} must be a new, non-empty name")
            if base not in STANDARD_PROVIDERS:
                raise ValueError(f"custom provider {name!r}: unknown base provider {base!r}")
        names = [name for name, _ in self.custom_providers]
        if len(names) != len(set(names)):
            raise ValueError("a custom provider may be named once only")

    def base_provider(self, provider: str) -> str | None:
        """The built-in provider behind a provider name, or None if the gateway has no such one."""
        if provider in STANDARD_PROVIDERS:
            return provider
        return dict(self.custom_providers).get(provider)

    def __repr__(self) -> str:
        # The keys are secrets, even in an emulator: show only how many there are.
        return (
            f"EmulatorConfig(latency_ms={self.latency_ms}, stream_delay_ms={self.stream_delay_ms}, "
            f"projects=<{len(self.projects)} groups>, "
            f"revoked_keys=<{len(self.revoked_keys)} keys>, "
            f"default_expires_minutes={self.default_expires_minutes}, "
            f"custom_providers={dict(self.custom_providers)!r}, "
            f"container_providers={sorted(self.container_providers)!r}, "
            f"virtual_keys={self.virtual_keys!r}, gateway_version={self.gateway_version!r}, "
            f"v1_face={self.v1_face!r})"
        )
