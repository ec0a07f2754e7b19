"""Fleet-wide counts for ``GET /api/cache/stats``: every process adds its own to a Redis hash,
with one ``HINCRBY`` pipeline per flush (never on the hot path); a failed flush keeps its counts.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from sidecar.errors import StoreUnavailable
from sidecar.store import CacheStore

__all__ = ["FleetStats"]


class FleetStats:
    """Counts of answers and upstream calls, shared by every sidecar and worker."""

    def __init__(self, store: CacheStore) -> None:
        self._store = store
        self._pending: Counter[str] = Counter()

    def add(self, name: str) -> None:
        """Count one ``answers.<outcome>`` or ``upstream.<caller>``."""
        self._pending[name] += 1

    async def flush(self) -> None:
        """Add what was counted since the last flush to the shared hash."""
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
