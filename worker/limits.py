"""A per-provider cap on concurrent upstream calls, shared by every worker through Redis.

Slots are leases in a sorted set scored by when they were taken; a lease older than
``lease_s`` (its worker died) no longer counts. A worker takes slots in blocks of up to
``block`` and hands them out locally, so most calls cost no Redis round trip: a block is used for
new calls only while every call started on it ends before the lease does, and is given back as
soon as it is idle. Within a process, calls beyond ``local_limit`` (the upstream connection
pool's size) queue in order on a semaphore instead of polling for slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
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


@dataclass(eq=False)
class _Block:
    tokens: list[str]
    usable_until: float
    in_use: int = 0


@dataclass
class _Provider:
    blocks: list[_Block] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class ProviderLimiter:
    """At most ``limit`` upstream calls in flight per provider, across all workers."""

    def __init__(
        self,
        redis: Any,
        keys: KeySpace,
        limit: int,
        call_s: float,
        block: int = 16,
        local_limit: int | None = None,
    ) -> None:
        self._redis = redis
        self._local = asyncio.Semaphore(min(limit, local_limit or limit))
        self._keys = keys
        self._limit = limit
        self._call_s = call_s
        self._lease_s = call_s * 3
        self._block = block
        self._acquire = redis.register_script(_ACQUIRE)
        self._providers: dict[str, _Provider] = {}
        self._ids = (f"{os.getpid()}:{n}" for n in itertools.count())

    @asynccontextmanager
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
                    await self._tidy(provider)

    async def _take(self, provider: str) -> _Block:
        state = self._providers.get(provider)
        if state is None:
            state = self._providers[provider] = _Provider()
        deadline = time.monotonic() + self._call_s
        delay = 0.005
        while True:
            if block := self._free_block(state):
                block.in_use += 1
                return block
            async with state.lock:
                if not self._free_block(state):
                    # Redis failing: no slots for now (the call times out waiting, and is retried).
                    with contextlib.suppress(*REDIS_ERRORS):
                        await self._lease(provider, state)
            if self._free_block(state):
                continue
            if time.monotonic() > deadline:
                raise UpstreamTimeout(f"no upstream slot for {provider} within {self._call_s}s")
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.1)

    def _free_block(self, state: _Provider) -> _Block | None:
        now = time.monotonic()
        for block in state.blocks:
            if block.in_use < len(block.tokens) and block.usable_until > now:
                return block
        return None

    async def _lease(self, provider: str, state: _Provider) -> None:
        tokens = [next(self._ids) for _ in range(self._block)]
        lease_ms = int(self._lease_s * 1000)
        granted = await self._acquire(
            keys=[self._keys.semaphore(provider)],
            args=[time.time_ns() // 1_000_000, lease_ms, self._limit, *tokens],
        )
        if granted:
            usable_until = time.monotonic() + self._lease_s - self._call_s
            state.blocks.append(_Block(tokens[: int(granted)], usable_until))

    async def _tidy(self, provider: str) -> None:
        """Give back idle blocks at once, so other workers can have their slots."""
        state = self._providers[provider]
        idle = [block for block in state.blocks if block.in_use == 0]
        if not idle:
            return
        for block in idle:
            state.blocks.remove(block)
        tokens = [token for block in idle for token in block.tokens]
        with contextlib.suppress(*REDIS_ERRORS):  # if not given back, they lapse with the lease
            await self._redis.zrem(self._keys.semaphore(provider), *tokens)
