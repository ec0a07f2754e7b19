"""What the conformance tests share: keys, modes, and how an app would look at an answer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import openai
from openai import AsyncOpenAI

from tests.conftest import Emulator, Running

KEY_A = "sk-bf-team-a"
KEY_A2 = "sk-bf-team-a2"  # same project as KEY_A
KEY_B = "sk-bf-team-b"  # another project
REVOKED = "sk-bf-revoked-0001"
CUSTOM = "my-openai-eu"  # an operator-named provider built on openai
# Per-request headers of an app that sends no credential at all (the SDK insists on one unless
# the Authorization header is explicitly omitted).
ANONYMOUS: dict[str, Any] = {"Authorization": openai.Omit()}
NO_CACHE = {"Cache-Control": "no-cache"}
# Fields of a container an app reads, beside network_policy, which the gateway drops.
FIELDS = ("id", "object", "name", "created_at", "status", "expires_after", "last_active_at",
          "memory_limit")  # fmt: skip

Kind = Literal["openai", "bifrost"]


@dataclass
class Stack:
    """A sidecar in front of the emulator (as OpenAI or as the gateway), and SDK clients."""

    kind: Kind
    cache: Literal["warm", "no-cache"]
    emulator: Emulator
    sidecar: Running
    clients: list[AsyncOpenAI] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        """Where an app points the SDK: the sidecar's ``/openai/v1``, as it would the gateway's."""
        return f"{self.sidecar.url}/openai/v1"

    @property
    def direct_url(self) -> str:
        """The same API straight on the upstream, without the sidecar."""
        return self.emulator.url + ("/openai/v1" if self.kind == "bifrost" else "/v1")

    def sdk(self, key: str = KEY_A, *, base_url: str | None = None, **options: Any) -> AsyncOpenAI:
        """An SDK client through the sidecar (closed after the test), no retries."""
        headers = dict(NO_CACHE) if self.cache == "no-cache" else {}
        headers.update(options.pop("default_headers", {}))
        client = AsyncOpenAI(
            api_key=key, base_url=base_url or self.base_url, max_retries=0, timeout=10,
            default_headers=headers, **options,
        )  # fmt: skip
        self.clients.append(client)
        return client

    def direct(self, key: str = KEY_A, **options: Any) -> AsyncOpenAI:
        """An SDK client straight on the upstream, to compare with what the sidecar answers."""
        return self.sdk(key, base_url=self.direct_url, **options)

    def held(self, container_id: str) -> dict[str, Any]:
        """The container as the emulator holds it, without touching it."""
        held: dict[str, Any] = self.emulator.state.peek_container(container_id)
        return held

    def project(self, key: str = KEY_A) -> str:
        project: str = self.emulator.state.authenticate(key)
        return project


def assert_matches(container: Any, held: dict[str, Any], kind: Kind) -> None:
    """The SDK's parsed container says what the emulator holds.

    ``network_policy`` is a field the gateway's container does not have: a retrieve answers it
    inside ``extra_fields.raw_response`` only (see :func:`raw_policy`), while the other routes
    pass OpenAI's own answer through in ``openai`` mode.
    """
    seen = container.model_dump(mode="json", exclude_none=True)
    for name in FIELDS:
        assert seen.get(name) == held.get(name), name
    if "network_policy" in seen:
        assert kind == "openai", "the gateway has no network_policy outside raw_response"
        assert seen["network_policy"] == held["network_policy"]


def raw_policy(raw: Any) -> Any:
    """The network policy an app finds in a retrieve's ``extra_fields.raw_response``."""
    return extra_fields(raw)["raw_response"]["network_policy"]


def known(model: Any) -> dict[str, Any]:
    """The fields an SDK model declares (extras such as ``extra_fields`` left out)."""
    fields: dict[str, Any] = model.model_dump(mode="json", include=set(type(model).model_fields))
    return fields


def extra_fields(raw: Any) -> dict[str, Any]:
    """``extra_fields`` of a raw SDK response (the SDK's models do not keep it)."""
    document = raw.http_response.json()
    extra: dict[str, Any] = document["extra_fields"]
    return extra


def cache_hit(raw: Any) -> bool:
    """Whether a raw SDK response says it came from the cache."""
    return bool(extra_fields(raw)["cache_debug"]["cache_hit"])


def error_of(exc: openai.APIStatusError) -> dict[str, Any]:
    """The error as an app reads it: class, status, message, code."""
    body = exc.body if isinstance(exc.body, dict) else {}
    return {
        "class": type(exc).__name__,
        "status": exc.status_code,
        "message": body.get("message"),
        "code": body.get("code") or None,
    }
