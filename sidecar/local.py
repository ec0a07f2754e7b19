"""Per-process copies of records and grants: a hit that needs no Redis round trip.

A copy lives at most ``SIDECAR_LOCAL_TTL_S`` and never past its grant; a process drops a
container's copies as soon as a worker or another replica announces a change on the Redis
channel (``sidecar.announce``). Bounded: past ``max_entries`` the oldest copies go first.
"""

from __future__ import annotations

import time

from sidecar.records import Record

__all__ = ["LocalCache"]


class LocalCache:
    """Recent records and grants of this process."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._records: dict[tuple[str, str], tuple[Record, float]] = {}
        # grant key -> (keep the copy until (monotonic), the grant's own expiry (unix ms))
        self._grants: dict[tuple[str, str, str], tuple[float, int]] = {}

    def __len__(self) -> int:
        return len(self._records)

    @property
    def enabled(self) -> bool:
        """False when ``SIDECAR_LOCAL_TTL_S`` is 0."""
        return self._ttl_s > 0

    def get(self, provider: str, container_id: str, fingerprint: str) -> tuple[Record, int] | None:
        """The local copy of a record and its grant's expiry (unix ms), if this credential may
        see it and the copy is recent."""
        now = time.monotonic()
        entry = self._records.get((provider, container_id))
        if entry is None or entry[1] <= now:
            return None
        grant = self._grants.get((provider, container_id, fingerprint))
        if grant is None or grant[0] <= now:
            return None
        return entry[0], grant[1]

    def put(self, record: Record, fingerprint: str | None = None, grant_expiry_ms: int = 0) -> None:
        """Keep a copy of ``record`` and, with a fingerprint, of that credential's grant."""
        if self._ttl_s <= 0:
            return
        now = time.monotonic()
        key = (record.provider, record.container_id)
        self._records.pop(key, None)
        self._records[key] = (record, now + self._ttl_s)
        grant_left_s = (grant_expiry_ms - time.time_ns() // 1_000_000) / 1000
        if fingerprint is not None and grant_left_s > 0:
            grant_key = (record.provider, record.container_id, fingerprint)
            self._grants.pop(grant_key, None)
            self._grants[grant_key] = (now + min(self._ttl_s, grant_left_s), grant_expiry_ms)
        self._evict()

    def drop(self, provider: str, container_id: str) -> None:
        """Forget a container (it changed elsewhere); its grants lapse with their TTL."""
        self._records.pop((provider, container_id), None)

    def revoke(self, provider: str, container_id: str, fingerprint: str) -> None:
        """Forget one credential's grant (the upstream refused it)."""
        self._grants.pop((provider, container_id, fingerprint), None)

    def clear(self) -> None:
        """Forget everything (e.g. the announcement channel was lost)."""
        self._records.clear()
        self._grants.clear()

    def _evict(self) -> None:
        while len(self._records) > self._max:
            del self._records[next(iter(self._records))]
        while len(self._grants) > self._max:
            del self._grants[next(iter(self._grants))]
