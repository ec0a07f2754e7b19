"""Which containers are being read, batched into the refresh-ahead index by ``flush_every``."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

from sidecar.errors import StoreUnavailable
from sidecar.keys import member
from sidecar.store import CacheStore

__all__ = ["ReadTracker", "flush_every"]


class ReadTracker:
    """Collects reads in memory and writes them with one ``ZADD`` per interval."""

    def __init__(self, store: CacheStore) -> None:
        self._store = store
        self._pending: set[str] = set()

    def note(self, provider: str, container_id: str) -> None:
        """Remember that a container was read."""
        self._pending.add(member(provider, container_id))

    async def flush(self) -> None:
        """Write the reads noted so far (dropped if Redis is unavailable)."""
        if not self._pending:
            return
        names, self._pending = list(self._pending), set()
        with contextlib.suppress(StoreUnavailable):
            await self._store.mark_read(names, time.time_ns() // 1_000_000)


async def flush_every(interval_s: float, *flushes: Callable[[], Awaitable[None]]) -> None:
    """Run the flushes every interval until cancelled, then once more."""
    try:
        while True:
            await asyncio.sleep(interval_s)
            for flush in flushes:
                await flush()
    finally:
        for flush in flushes:
            await asyncio.shield(flush())
