"""What tests share besides fixtures: the test credentials, a GET that answers status, body and
headers, a wait on a condition (no test sleeps in place of one), a stale read's refresh, what a
sidecar has counted and still runs in its background, and records aged without waiting (the
record's ``fetched_at_ms`` is the clock freshness is read from: backdating it is the tests'
injectable clock)."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import redis.asyncio as aioredis
from aiohttp import web
from arq.connections import create_pool

from sidecar.connections import close_redis, create_redis
from sidecar.keys import KeySpace
from sidecar.metrics import Metrics
from sidecar.policy import Policy
from sidecar.queue import Batch, enqueue_batch, queue_redis_settings, refresh_stale
from sidecar.records import Record, decode_record
from sidecar.settings import Settings
from sidecar.state import SERVICES
from sidecar.store import Breaker, CacheStore

KEY_A = "sk-bf-team-a"
KEY_A2 = "sk-bf-team-a2"  # same project as KEY_A
KEY_B = "sk-bf-team-b"  # another project
AUTH_A = {"Authorization": f"Bearer {KEY_A}"}


BIN = Path(sys.executable).parent


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without SIDECAR_* or OTEL_* settings, plus ``extra``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "OTEL_"))},
            **extra}  # fmt: skip


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """A console script (``sidecar ...``) or, for ``python``, ``python -m ...``."""
    command = (
        [sys.executable, *args[1:]] if args[0] == "python" else [str(BIN / args[0]), *args[1:]]
    )
    return subprocess.run(
        command, env=clean_env(**(env or {})), capture_output=True, text=True, timeout=timeout
    )


async def get(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], Any]:
    """GET ``url`` (as KEY_A unless ``headers`` say otherwise): status, JSON body, headers."""
    async with http.get(url, headers=headers if headers is not None else AUTH_A) as response:
        return response.status, await response.json(), response.headers


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], timeout_s: float = 10.0
) -> None:
    """Wait until ``predicate()`` holds (a coroutine function's answer is awaited), checking
    every 20 ms; fail the test after ``timeout_s``."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def wait_until(
    predicate: Callable[[], bool], timeout_s: float = 10.0, what: str = "the condition"
) -> None:
    """``wait_for`` for synchronous tests and fixtures (it blocks the thread): wait until
    ``predicate()`` holds, checking every 20 ms; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen in {timeout_s} s")
        time.sleep(0.02)


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


async def backdate(
    settings: Settings, container_id: str, by_s: float, provider: str = "openai"
) -> Record:
    """Age the cached record of a container by ``by_s`` seconds without waiting, as if the
    upstream had answered that much earlier: its freshness, stale window and due entry move
    with it (saved as a refresh would save it, announced to the sidecars). The record as now
    stored; fails the test if nothing is cached. Plain Redis, Cluster or Sentinel, as the
    settings say."""
    client = create_redis(settings)
    store = CacheStore(client, KeySpace(settings.key_prefix), Breaker(1.0))
    try:
        raw = await client.get(store.keys.record(provider, container_id))
        assert raw is not None, f"nothing cached for {provider}/{container_id}"
        record = decode_record(raw)
        assert record is not None
        older = msgspec.structs.replace(
            record, fetched_at_ms=record.fetched_at_ms - int(by_s * 1000)
        )
        assert await store.save(older, Policy(settings))
    finally:
        await store.close()
        await close_redis(client)
    return older


def refresh_events(app: web.Application, event: str) -> int:
    """How many refresh-job events of one kind (``enqueued``, ``deduplicated``...) a sidecar
    counted (its ``sidecar_refresh_jobs_total``)."""
    return int(app[SERVICES].metrics.refresh_jobs.labels(event).value)


def background_idle(app: web.Application) -> bool:
    """True when a sidecar runs no background work (a stale read's enqueue, an early renewal):
    what a request set going has finished, so a check that it did nothing more can follow."""
    return len(app[SERVICES].service._background) == 0


async def paced_chat_text(stream: Any, streams: Any) -> str:
    """The text of a streamed chat completion the emulator paces (``streams.pace()``), checking
    that each chunk reached the app while the emulator still held the next one."""
    words: list[str] = []
    async with asyncio.timeout(10):
        async for chunk in stream:
            assert streams.sent["chat"] == len(words) + 1
            words.append(chunk.choices[0].delta.content or "")
            streams.release()
    return "".join(words)


async def realtime_reply(connection: Any) -> str:
    """The text of a realtime session's next response: its deltas until ``response.done``."""
    deltas: list[str] = []
    async with asyncio.timeout(10):
        async for event in connection:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
            if event.type == "response.done":
                break
    return "".join(deltas)
