"""Redis trouble is not the client's problem: requests are served from upstream."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

from tests.conftest import Emulator, RedisServer
from tests.support import KEY_A, get, wait_for


async def test_requests_are_served_from_upstream_while_redis_is_down(
    start_sidecar: Any,
    make_settings: Any,
    emulator: Emulator,
    own_redis: RedisServer,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sidecar = await start_sidecar(
        make_settings(redis_url=own_redis.url, redis_retry_after_s=0.2, local_ttl_s=0)
    )
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    assert (await get(http, url))[0] == 200
    assert (await get(http, url))[1]["extra_fields"]["cache_debug"]["cache_hit"] is True

    own_redis.stop()
    with caplog.at_level(logging.WARNING, logger="sidecar.store"):
        for _ in range(10):
            status, body, _ = await get(http, url)
            assert status == 200
            assert body["id"] == cid
            assert body["extra_fields"]["cache_debug"]["cache_hit"] is False
    outage_lines = [r for r in caplog.records if "redis unavailable" in r.getMessage()]
    assert len(outage_lines) == 1
    assert emulator.retrieves(cid) == 11

    own_redis.start()
    emulator.state.reset_stats()
    # After the retry window the cache is used again. Kept: the window (0.2 s) is real time,
    # and a wait polling reads would add upstream calls to the count checked below.
    await asyncio.sleep(0.3)
    await get(http, url)
    status, body, _ = await get(http, url)
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is True
    assert emulator.retrieves(cid) == 1


async def test_local_copies_keep_answering_while_redis_is_down(
    start_sidecar: Any,
    make_settings: Any,
    emulator: Emulator,
    own_redis: RedisServer,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.announce")
    sidecar = await start_sidecar(make_settings(redis_url=own_redis.url, local_ttl_s=30))
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    await get(http, url)
    own_redis.stop()
    # The sidecar notices that announcements are lost.
    await wait_for(lambda: "change announcements unavailable" in caplog.text)
    hits = []
    for _ in range(5):
        status, body, _ = await get(http, url)
        assert status == 200
        hits.append(body["extra_fields"]["cache_debug"]["cache_hit"])
    # Copies keep serving while they are fresh (without the channel no copy outlives its own
    # freshness): the outage costs the upstream nothing.
    assert hits == [True, True, True, True, True]
    assert emulator.retrieves(cid) == 1
