"""The caller's credential: which headers carry it, and its HMAC fingerprint.

The fingerprint (HMAC-SHA256 under ``SIDECAR_KEY_SECRET``) is the only form of a credential that
leaves the process: grants and locks in Redis are keyed by it. The headers themselves are only
forwarded to the upstream.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping

__all__ = ["Credential", "CredentialReader"]

# The gateway accepts a virtual key in any of these (x-bf-vk with any value).
_GATEWAY_HEADERS = ("authorization", "x-api-key", "x-goog-api-key", "x-bf-vk")
# OpenAI scopes keys further by organisation and project: part of the identity too.
_OPENAI_HEADERS = ("authorization", "openai-organization", "openai-project")


class Credential:
    """The credential headers of one request and their fingerprint."""

    __slots__ = ("fingerprint", "headers")

    def __init__(self, headers: tuple[tuple[str, str], ...], fingerprint: str) -> None:
        self.headers = headers
        self.fingerprint = fingerprint

    def __repr__(self) -> str:
        return f"Credential(fingerprint={self.fingerprint!r})"


class CredentialReader:
    """Reads credentials from request headers for one upstream kind."""

    def __init__(self, kind: str, secret: str | None) -> None:
        self._names = _GATEWAY_HEADERS if kind == "bifrost" else _OPENAI_HEADERS
        # Organisation and project headers alone are no credential.
        self._required = _GATEWAY_HEADERS if kind == "bifrost" else ("authorization",)
        key = secret.encode() if secret else secrets.token_bytes(32)
        self._mac = hmac.new(key, digestmod=hashlib.sha256)

    def read(self, headers: Mapping[str, str]) -> Credential | None:
        """The request's credential, or None when it carries none."""
        found = []
        for name in self._names:
            value = headers.get(name)
            if value and value.strip() and not _empty_bearer(name, value):
                found.append((name, value))
        if not any(name in self._required for name, _ in found):
            return None
        mac = self._mac.copy()
        for name, value in found:
            mac.update(f"{name}\n{value}\n".encode())
        return Credential(tuple(found), mac.hexdigest()[:32])


def _empty_bearer(name: str, value: str) -> bool:
    return name == "authorization" and value.strip().lower() in ("bearer", "basic")
