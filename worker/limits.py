"""A per-provider cap on concurrent upstream calls, shared by every worker through Redis.

Each call holds a lease in a sorted set scored by when it started; a lease older than
``lease_ms`` (a crashed holder) no longer counts.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sidecar.errors import UpstreamTimeout
from sidecar.keys import KeySpace

__all__ = ["ProviderLimiter"]

_ACQUIRE = """
local now = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
redis.call('zremrangebyscore', KEYS[1], '-inf', now - lease)
if redis.call('zcard', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('zadd', KEYS[1], now, ARGV[4])
  redis.call('pexpire', KEYS[1], lease)
  return 1
end
return 0
"""


class ProviderLimiter:
    """At most ``limit`` upstream calls in flight per provider, across all workers."""

    def __init__(self, redis: Any, keys: KeySpace, limit: int, lease_s: float) -> None:
        self._redis = redis
        self._keys = keys
        self._limit = limit
        self._lease_s = lease_s
        self._acquire = redis.register_script(_ACQUIRE)

    @asynccontextmanager
    async def slot(self, provider: str) -> AsyncIterator[None]:
        """Hold one of the provider's slots; waits at most one lease for it."""
        key = self._keys.semaphore(provider)
        token = secrets.token_hex(8)
        lease_ms = int(self._lease_s * 1000)
        deadline = time.monotonic() + self._lease_s
        delay = 0.005
        while not await self._acquire(
            keys=[key], args=[time.time_ns() // 1_000_000, lease_ms, self._limit, token]
        ):
            if time.monotonic() > deadline:
                raise UpstreamTimeout(f"no upstream slot for {provider} within {self._lease_s}s")
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.1)
        try:
            yield
        finally:
            await self._redis.zrem(key, token)
