"""A delete wins: a deleted container is never served again, whatever was under way when it
landed (found by the second outside round: each failed on the code before the fix)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from redis.asyncio import Redis

from sidecar.keys import KeySpace
from sidecar.state import SERVICES
from tests.conftest import Emulator, Running, start_app, stop_app
from tests.support import AUTH_A, KEY_A, get

NO_CACHE = {**AUTH_A, "Cache-Control": "no-cache"}
ONLY_CACHED = {**AUTH_A, "Cache-Control": "only-if-cached, max-stale=600"}


async def test_a_fill_that_began_before_a_delete_never_lands_after_it(
    start_sidecar: Callable[..., Any],
    make_settings: Callable[..., Any],
    http: aiohttp.ClientSession,
) -> None:
    asked, release = asyncio.Event(), asyncio.Event()

    async def retrieve(request: web.Request) -> web.Response:
        asked.set()
        await release.wait()  # the answer is on its way while the delete happens
        cid = request.match_info["cid"]
        return web.json_response({"id": cid, "object": "container", "name": "n",
                                  "created_at": 1, "status": "running"})  # fmt: skip

    async def delete(request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["cid"], "deleted": True})

    app = web.Application()
    app.router.add_get("/openai/v1/containers/{cid}", retrieve)
    app.router.add_delete("/openai/v1/containers/{cid}", delete)
    upstream = await start_app(app)
    try:
        sidecar: Running = await start_sidecar(make_settings(upstream_url=upstream.url))
        url = f"{sidecar.url}/openai/v1/containers/cntr_late"
        fill = asyncio.create_task(get(http, url))
        await asyncio.wait_for(asked.wait(), 5)
        async with http.delete(url, headers=AUTH_A) as response:
            assert response.status == 200
        release.set()
        assert (await fill)[0] == 200  # the caller gets what the upstream answered it
        # ...but it is not stored: nobody is served the deleted container from the cache.
        status, body, _ = await get(http, url, ONLY_CACHED)
        assert status == 504, body
    finally:
        await stop_app(upstream)


async def test_straight_against_openai_a_delete_under_any_provider_name_drops_the_entry(
    start_sidecar: Callable[..., Any],
    make_settings: Callable[..., Any],
    emulator: Emulator,
    http: aiohttp.ClientSession,
) -> None:
    sidecar: Running = await start_sidecar(make_settings(upstream_kind="openai"))
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/v1/containers/{cid}"
    assert (await get(http, url))[0] == 200
    assert (await get(http, url + "?provider=azure", ONLY_CACHED))[0] == 200  # one entry
    async with http.delete(url + "?provider=azure", headers=AUTH_A) as response:
        assert response.status == 200
    for query in ("", "?provider=openai", "?provider=azure"):
        assert (await get(http, url + query, ONLY_CACHED))[0] == 504


async def test_waiters_of_a_fetch_lock_whose_holder_died_go_ahead_within_a_second(
    start_sidecar: Callable[..., Any],
    make_settings: Callable[..., Any],
    emulator: Emulator,
    redis_url: str,
    http: aiohttp.ClientSession,
) -> None:
    settings = make_settings(lock_age_s=30)
    sidecar: Running = await start_sidecar(settings)
    cid = (await emulator.create(KEY_A))["id"]
    fingerprint = sidecar.app[SERVICES].credentials.read(AUTH_A.items()).fingerprint
    lock = KeySpace(settings.key_prefix).lock("openai", cid, fingerprint)
    async with Redis.from_url(redis_url) as redis:
        # A live holder keeps a short lease, renewed for as long as its fetch takes.
        emulator.state.set_latency(1500)
        holder = asyncio.create_task(get(http, f"{sidecar.url}/openai/v1/containers/{cid}"))
        leases = []
        while not holder.done():
            leases.append(await redis.pttl(lock))
            await asyncio.sleep(0.05)  # kept: the lease is sampled every 50 ms (counted below)
        held = [ms for ms in leases if ms > 0]
        assert held
        assert max(held) <= 1000
        assert len(held) * 0.05 > 1.0  # held past its first lease: renewed
        emulator.state.set_latency(0)
        # A holder that took the lock's lease and died: nobody renews it.
        await redis.set(lock, "dead-holder", px=900)
    started = time.monotonic()
    answers = await asyncio.gather(
        *(get(http, f"{sidecar.url}/openai/v1/containers/{cid}", NO_CACHE) for _ in range(32))
    )
    assert [status for status, _, _ in answers] == [200] * 32
    # Far from the 30 s a waiter would give a live holder: the lease lapsed.
    assert time.monotonic() - started < 10
