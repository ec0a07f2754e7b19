"""A per-provider cap on concurrent upstream calls, shared by every worker through Redis.

Slots are leases in a sorted set scored by when they were taken; a lease older than three call
timeouts (its worker died) no longer counts. A worker leases slots in blocks and hands them out
locally, so most calls cost no Redis round trip: a block takes new calls only while each would
end before its lease does, and is given back as soon as it is idle. Within a process, calls
beyond ``local_limit`` (the connection pool's size) queue on a semaphore instead of polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sidecar.errors import UpstreamTimeout
from sidecar.keys import KeySpace
from sidecar.store import REDIS_ERRORS

__all__ = ["ProviderLimiter"]

_ACQUIRE = """
local now = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
redis.call('zremrangebyscore', KEYS[1], '-inf', now - lease)
local free = tonumber(ARGV[3]) - redis.call('zcard', KEYS[1])
local granted = 0
for i = 4, #ARGV do
  if granted >= free then break end
  redis.call('zadd', KEYS[1], now, ARGV[i])
  granted = granted + 1
end
redis.call('pexpire', KEYS[1], lease)
return granted
"""
_BLOCK = 16  # slots leased at once, at most


@dataclass(eq=False)
class _Block:
    tokens: list[str]
    usable_until: float
    in_use: int = 0


class ProviderLimiter:
    """At most ``limit`` upstream calls in flight per provider, across all workers."""

    def __init__(
        self, redis: Any, keys: KeySpace, limit: int, call_s: float, local_limit: int
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._limit = limit
        self._call_s = call_s
        self._lease_s = call_s * 3
        self._local = asyncio.Semaphore(min(limit, local_limit))
        self._acquire = redis.register_script(_ACQUIRE)
        self._blocks: defaultdict[str, list[_Block]] = defaultdict(list)
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._ids = (f"{os.getpid()}:{n}" for n in itertools.count())

    @contextlib.asynccontextmanager
    async def slot(self, provider: str) -> AsyncIterator[None]:
        """Hold one of the provider's slots; waits at most one call's time for it (once this
        process has a free connection for the call)."""
        async with self._local:
            block = await self._take(provider)
            try:
                yield
            finally:
                block.in_use -= 1
                if block.in_use == 0:
                    await self._give_back_idle(provider)

    async def _take(self, provider: str) -> _Block:
        blocks = self._blocks[provider]
        deadline = time.monotonic() + self._call_s
        delay = 0.005
        while True:
            if (block := _free_block(blocks)) is None:
                async with self._locks[provider]:
                    if (block := _free_block(blocks)) is None:
                        # Redis failing: no slots for now (the call times out waiting, and is
                        # retried).
                        with contextlib.suppress(*REDIS_ERRORS):
                            await self._lease(provider, blocks)
                        block = _free_block(blocks)
            if block is not None:
                block.in_use += 1
                return block
            if time.monotonic() > deadline:
                raise UpstreamTimeout(f"no upstream slot for {provider} within {self._call_s}s")
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.1)

    async def _lease(self, provider: str, blocks: list[_Block]) -> None:
        tokens = [next(self._ids) for _ in range(_BLOCK)]
        granted = await self._acquire(
            keys=[self._keys.semaphore(provider)],
            args=[time.time_ns() // 1_000_000, int(self._lease_s * 1000), self._limit, *tokens],
        )
        if granted:
            usable_until = time.monotonic() + self._lease_s - self._call_s
            blocks.append(_Block(tokens[: int(granted)], usable_until))

    async def _give_back_idle(self, provider: str) -> None:
        """Give back idle blocks at once, so other workers can have their slots."""
        blocks = self._blocks[provider]
        idle = [block for block in blocks if block.in_use == 0]
        if not idle:  # given back meanwhile
            return
        for block in idle:
            blocks.remove(block)
        tokens = [token for block in idle for token in block.tokens]
        with contextlib.suppress(*REDIS_ERRORS):  # if not given back, they lapse with the lease
            await self._redis.zrem(self._keys.semaphore(provider), *tokens)


def _free_block(blocks: list[_Block]) -> _Block | None:
    now = time.monotonic()
    return next((b for b in blocks if b.in_use < len(b.tokens) and b.usable_until > now), None)
