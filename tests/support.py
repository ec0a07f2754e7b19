"""What tests share besides fixtures: the test credentials, a GET that answers status, body and
headers, a wait on a condition (no test sleeps in place of one), and a stale read's refresh."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from arq.connections import create_pool

from sidecar.keys import KeySpace
from sidecar.metrics import Metrics
from sidecar.queue import Batch, enqueue_batch, queue_redis_settings, refresh_stale
from sidecar.settings import Settings
from sidecar.store import Breaker, CacheStore

KEY_A = "sk-bf-team-a"
KEY_A2 = "sk-bf-team-a2"  # same project as KEY_A
KEY_B = "sk-bf-team-b"  # another project
AUTH_A = {"Authorization": f"Bearer {KEY_A}"}


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], Any]:
    """GET ``url`` (as KEY_A unless ``headers`` say otherwise): status, JSON body, headers."""
    async with http.get(url, headers=headers if headers is not None else AUTH_A) as response:
        return response.status, await response.json(), response.headers


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``predicate()`` holds; fail the test after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def request_refresh(settings: Settings, container_id: str, due_ms: int) -> bool:
    """Ask for a stale read's refresh of an ``openai`` container whose record goes stale at
    ``due_ms``, as a sidecar does (claim, then queue a batch of one); False when another
    refresh held the claim."""
    pool = await create_pool(queue_redis_settings(settings))
    client = aioredis.Redis.from_url(settings.redis_url)
    store = CacheStore(client, KeySpace(settings.key_prefix), Breaker(1.0))
    queued: list[Batch] = []

    async def enqueue(batch: Batch, carrier: Any) -> bool:
        await enqueue_batch(pool, settings, batch, carrier)
        queued.append(batch)
        return True

    try:
        renewal = ("openai", container_id, due_ms)
        await refresh_stale(store, settings, Metrics("test"), enqueue, renewal)
    finally:
        await store.close()
        await client.aclose()
        await pool.aclose()
    return bool(queued)
