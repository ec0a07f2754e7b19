"""Per-process copies of records and grants: a hit that needs no Redis round trip.

A copy serves while its record is fresh and its grant lasts, at most ``SIDECAR_LOCAL_TTL_S``;
announcements (``announce``) replace, drop or revoke copies at once. At most ``max_entries``
records and as many grants: past that the oldest go first.
"""

from __future__ import annotations

import random
import time

from sidecar.flight import remember
from sidecar.keys import cache_id_for
from sidecar.policy import Policy
from sidecar.records import Record

__all__ = ["Copy", "LocalCache"]


class Copy:
    """A record this process keeps, and the body of its fresh hit once rendered (at the default
    threshold, latency 0: ``(threshold, body)``)."""

    __slots__ = ("cache_id", "fresh_until_ms", "hit_body", "keep_until", "record")

    def __init__(self, record: Record, fresh_until_ms: int, keep_until: float) -> None:
        self.record = record
        self.cache_id = cache_id_for(record.provider, record.container_id)
        self.fresh_until_ms = fresh_until_ms
        self.keep_until = keep_until
        self.hit_body: tuple[float, bytes] | None = None


class LocalCache:
    """Recent records and grants of this process."""

    def __init__(self, policy: Policy, ttl_s: float, max_entries: int = 10_000) -> None:
        self._policy = policy
        self._ttl_s = ttl_s
        self._max = max_entries
        self._records: dict[tuple[str, str], Copy] = {}
        self._grants: dict[tuple[str, str, str], int] = {}  # -> the grant's expiry (unix ms)

    def __len__(self) -> int:
        return len(self._records)

    @property
    def enabled(self) -> bool:
        """False when ``SIDECAR_LOCAL_TTL_S`` is 0."""
        return self._ttl_s > 0

    def get(
        self, provider: str, container_id: str, fingerprint: str, now_ms: int
    ) -> tuple[Copy, int] | None:
        """A fresh copy and its grant's expiry (unix ms), if this credential may see it."""
        copy = self._records.get((provider, container_id))
        if copy is None or copy.fresh_until_ms <= now_ms:
            return None
        grant = self._grants.get((provider, container_id, fingerprint))
        if grant is None or grant <= now_ms:
            return None
        if copy.keep_until <= time.monotonic():
            del self._records[(provider, container_id)]
            return None
        return copy, grant

    def put(self, record: Record, fingerprint: str | None = None, grant_expiry_ms: int = 0) -> None:
        """Keep a copy of ``record`` and, with a fingerprint, of that credential's grant."""
        if self._ttl_s <= 0:
            return
        key = (record.provider, record.container_id)
        current = self._records.get(key)
        if current is None or _newer(record, current):
            remember(self._records, key, self._copy(record), self._max)
        if fingerprint is not None and grant_expiry_ms > 0:
            grant_key = (record.provider, record.container_id, fingerprint)
            remember(self._grants, grant_key, grant_expiry_ms, self._max)

    def update(self, record: Record) -> None:
        """Replace the copy of a record another process rewrote (if this one keeps a copy)."""
        key = (record.provider, record.container_id)
        current = self._records.get(key)
        if current is not None and _newer(record, current):
            self._records[key] = self._copy(record)

    def _copy(self, record: Record) -> Copy:
        # Copies made together (a warm-up, a burst of refreshes) must not all lapse together.
        keep_s = self._ttl_s * random.uniform(0.9, 1.0)
        return Copy(record, self._policy.fresh_until_ms(record), time.monotonic() + keep_s)

    def drop(self, provider: str, container_id: str) -> None:
        """Forget a container (deleted or purged elsewhere); its grants lapse with their TTL."""
        self._records.pop((provider, container_id), None)

    def revoke(self, provider: str, container_id: str, fingerprint: str) -> None:
        """Forget one credential's grant (the upstream refused it)."""
        self._grants.pop((provider, container_id, fingerprint), None)

    def clear(self) -> None:
        """Forget everything (e.g. announcements were missed)."""
        self._records.clear()
        self._grants.clear()


def _newer(record: Record, current: Copy) -> bool:
    """Whether ``record`` replaces ``current``'s: fetched no earlier, and not the same record
    (keeping the copy keeps its rendered body: a process hears its own saves announced)."""
    held = current.record
    return held.fetched_at_ms <= record.fetched_at_ms and held != record
