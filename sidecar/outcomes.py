"""The retrieve use case's vocabulary: the query, how it was answered, and who refreshes."""

from __future__ import annotations

from typing import Any, Protocol

import msgspec

from sidecar.controls import Rules
from sidecar.credentials import Credential
from sidecar.policy import Freshness
from sidecar.records import Record

__all__ = ["Outcome", "Query", "Refresher"]


class Query(msgspec.Struct, frozen=True, gc=False):
    """One parsed retrieve request."""

    provider: str
    container_id: str
    credential: Credential
    rules: Rules = Rules()
    passed: tuple[tuple[str, str], ...] = ()
    """Headers passed to the upstream beside the credential (trace context, gateway options)."""

    @property
    def headers(self) -> tuple[tuple[str, str], ...]:
        """Everything this request sends upstream: its credential and the passed headers."""
        return self.credential.headers + self.passed


class Outcome(msgspec.Struct, frozen=True, gc=False):
    """How a retrieve was answered; ``record`` is the container (or the cached 404) served."""

    kind: str
    """``hit``, ``stale``, ``negative``, ``miss`` or ``stale_if_error``: one spelling throughout."""
    record: Record
    cache_id: str
    freshness: Freshness | None = None
    forward: str = ""
    """Why the upstream was asked (RFC 9211 ``fwd``): uri-miss, stale or request."""
    upstream_status: int | None = None
    """What the upstream answered when it was asked (``fwd-status``)."""
    collapsed: str = ""
    """Waited for another request's fetch in this ``process`` or on another ``replica``."""
    stored: bool = False
    """The upstream's answer was written to the cache."""
    copy: Any = None
    """The process's own copy the answer came from (a ``local.Copy``), if any."""


class Refresher(Protocol):
    """Schedules background refreshes (the arq queue); absent when there is no service key."""

    async def refresh_stale(self, store: Any, renewal: tuple[str, str, int]) -> None:
        """Have a worker renew ``(provider, container_id, due_ms)``, claimed in ``store``."""

    async def backlog(self) -> int | None:
        """Refresh jobs waiting, if known."""

    async def close(self) -> None:
        """Release its resources."""
