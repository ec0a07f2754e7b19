"""What a process collects between flushes (never on the hot path): fleet-wide counts for
``GET /api/cache/stats``, added to a Redis hash with one ``HINCRBY`` pipeline (a failed flush
keeps them), and the containers read, marked in the refresh-ahead index with one ``ZADD`` (a
failed flush drops them: the next reads mark them again).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from typing import Any

from sidecar.errors import StoreUnavailable
from sidecar.keys import member
from sidecar.store import CacheStore

__all__ = ["FleetStats"]


class FleetStats:
    """Counts of answers and upstream calls, shared by every sidecar and worker, and this
    process's reads."""

    def __init__(self, store: CacheStore) -> None:
        self._store = store
        self._pending: Counter[str] = Counter()
        self._reads: set[str] = set()

    def add(self, name: str) -> None:
        """Count one ``answers.<outcome>`` or ``upstream.<caller>``."""
        self._pending[name] += 1

    def note_read(self, provider: str, container_id: str) -> None:
        """Remember that a container was read."""
        self._reads.add(member(provider, container_id))

    async def flush(self) -> None:
        """Write the reads and add the counts noted since the last flush."""
        if self._reads:
            names, self._reads = list(self._reads), set()
            with contextlib.suppress(StoreUnavailable):
                await self._store.mark_read(names, time.time_ns() // 1_000_000)
        if not self._pending:
            return
        pending, self._pending = self._pending, Counter()
        key = self._store.keys.stats

        async def op() -> None:
            async with self._store.redis.pipeline(transaction=False) as pipe:
                for name, amount in pending.items():
                    pipe.hincrby(key, name, amount)
                pipe.hsetnx(key, "since", int(time.time()))
                await pipe.execute()

        try:
            await self._store.call(op)
        except StoreUnavailable:
            self._pending.update(pending)

    async def read(self) -> dict[str, Any]:
        """The shared counts, and what follows from them."""
        raw = await self._store.call(lambda: self._store.redis.hgetall(self._store.keys.stats))
        counts = {k.decode(): int(v) for k, v in raw.items()}
        answers = {k.split(".", 1)[1]: v for k, v in counts.items() if k.startswith("answers.")}
        from_cache = sum(answers.get(k, 0) for k in ("hit", "stale", "stale_if_error", "negative"))
        cacheable = from_cache + answers.get("miss", 0)
        return {
            "since": counts.get("since"),
            "answers": answers,
            "hit_ratio": round(from_cache / cacheable, 4) if cacheable else None,
            "upstream_calls": {
                caller: counts.get(f"upstream.{caller}", 0) for caller in ("sidecar", "worker")
            },
            "upstream_calls_saved": from_cache,
        }
