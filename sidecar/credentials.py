"""The caller's credential: the one definition of which headers identify a caller.

Retrieval, the relay, seeding and forwarding all use the :class:`Credential` read here once per
request. Its ``headers`` are what the upstream authenticates with (forwarded as they are); its
``fingerprint`` (HMAC-SHA256 under ``SIDECAR_KEY_SECRET``) is the only form of them that leaves
the process: grants, locks and negative entries in Redis are keyed by it.

An identity header sent twice, or two different virtual keys in different headers, is refused
(400) before anything is forwarded or cached: an upstream and a cache reading "the" credential
from such a request may each pick a different one (Go's ``Header.Get`` takes the first value, a
dict built from the headers keeps the last), which is how one tenant could read another's
container.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from sidecar.errors import AmbiguousCredential, InvalidParameter, MissingCredential
from sidecar.flight import remember

__all__ = ["ANONYMOUS", "Credential", "CredentialReader", "check_forwardable", "identity_header"]

# The gateway's virtual-key headers (transports/bifrost-http/lib/ctx.go): x-bf-vk with any value;
# Authorization (Bearer), x-api-key and x-goog-api-key when the value starts with sk-bf-.
_VK_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "x-bf-vk")
# What else selects the key the gateway calls the provider with, or is sent to the provider
# (x-bf-eh-<name>: extra headers, which may carry a provider's auth): part of the identity.
_GATEWAY_IDENTITY = frozenset((*_VK_HEADERS, "x-bf-direct-key", "x-bf-api-key"))
_EXTRA_HEADER_PREFIX = "x-bf-eh-"
# OpenAI scopes a key further by organisation and project: part of the identity too.
_OPENAI_IDENTITY = frozenset(("authorization", "openai-organization", "openai-project"))
_CACHE_MAX = 4096
# Request headers that are not an identity but go to the upstream on every path: the gateway
# acts on them (transports/bifrost-http/lib/ctx.go), and trace context flows through.
_PASS_ALONG = {
    "bifrost": frozenset(
        ("x-bf-send-back-raw-response", "x-bf-session-id", "traceparent", "tracestate")
    ),
    "openai": frozenset(("traceparent", "tracestate")),
}


@dataclass(frozen=True, slots=True, eq=False)
class Credential:
    """The identity headers of one request and their fingerprint (its repr shows only that)."""

    headers: tuple[tuple[str, str], ...] = field(repr=False)
    """``(lower-case name, value)`` pairs, forwarded to the upstream exactly as they are."""
    fingerprint: str


ANONYMOUS = Credential((), "anonymous")
"""The identity of credential-less requests: only they share its grants."""


def identity_header(kind: str, name: str) -> bool:
    """Whether a lower-case header name is part of a caller's identity for this upstream kind."""
    if kind == "bifrost":
        return name in _GATEWAY_IDENTITY or name.startswith(_EXTRA_HEADER_PREFIX)
    return name in _OPENAI_IDENTITY


class CredentialReader:
    """Reads credentials from request headers for one upstream kind, remembering up to 4,096
    fingerprints (the oldest go first): a poller sends the same credential every time, and an
    HMAC per request would be the hit path's largest cost."""

    def __init__(self, kind: str, secret: str | None) -> None:
        self._kind = kind
        self._openai = kind == "openai"
        self._pass_along = _PASS_ALONG[kind]
        key = secret.encode() if secret else secrets.token_bytes(32)
        self._mac = hmac.new(key, digestmod=hashlib.sha256)
        self._known: dict[tuple[tuple[str, str], ...], Credential] = {}

    def read(self, headers: Iterable[tuple[str, str]]) -> Credential:
        """The request's credential (``ANONYMOUS`` for none, gateway mode only); raises
        ``AmbiguousCredential`` or (an OpenAI-style upstream given no key) ``MissingCredential``."""
        return self.scan(headers)[0]

    def scan(
        self, headers: Iterable[tuple[str, str]]
    ) -> tuple[Credential, tuple[tuple[str, str], ...]]:
        """The request's credential and the headers passed along with it (one pass)."""
        found: list[tuple[str, str]] = []
        passed: list[tuple[str, str]] = []
        for raw_name, value in headers:
            name = raw_name.lower()
            if not identity_header(self._kind, name):
                if name in self._pass_along:
                    passed.append((name, check_forwardable(name, value)))
                continue
            value = check_forwardable(name, value).strip()
            if not value or (name == "authorization" and value.lower() in ("bearer", "basic")):
                continue
            found.append((name, value))
        if not found and not self._openai:
            return ANONYMOUS, tuple(passed)
        key = tuple(sorted(found))
        return self._known.get(key) or self._make(key), tuple(passed)

    def _make(self, pairs: tuple[tuple[str, str], ...]) -> Credential:
        names = [name for name, _ in pairs]
        for name in names:
            if names.count(name) > 1:
                raise AmbiguousCredential(
                    f"the {name} header is sent more than once: send one credential",
                    param=name,
                )
        if not self._openai and len(set(_virtual_keys(pairs))) > 1:
            raise AmbiguousCredential(
                "two different virtual keys in one request: send one credential",
                param="authorization",
            )
        if self._openai and "authorization" not in names:  # none at all, or only a scope
            raise MissingCredential(
                "a credential is required: send it as 'Authorization: Bearer <key>'"
            )
        mac = self._mac.copy()
        for name, value in pairs:
            mac.update(f"{name}\n{value}\n".encode())
        # 96 bits in 16 characters: every byte of a fingerprint is paid once per grant key (a
        # grant key of 41 bytes takes a 48-byte allocation, one of 47 a 64-byte one).
        fingerprint = base64.urlsafe_b64encode(mac.digest()[:12]).decode()
        credential = Credential(pairs, fingerprint)
        remember(self._known, pairs, credential, _CACHE_MAX)
        return credential


def check_forwardable(name: str, value: str) -> str:
    """``value``, unless it is not UTF-8 (aiohttp keeps such bytes as surrogates): unforwardable."""
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise InvalidParameter(
                f"the {name} header is not valid UTF-8", param=name[:64]
            ) from None
    return value


def _virtual_keys(pairs: Iterable[tuple[str, str]]) -> Iterable[str]:
    for name, value in pairs:
        if name == "x-bf-vk":
            yield value
        elif name in _VK_HEADERS:
            token = value[7:].strip() if value[:7].lower() == "bearer " else value
            if token[:6].lower() == "sk-bf-":
                yield token
