"""Caller controls and the headers that say what the cache did."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.conftest import Emulator, Running
from tests.sidecar.test_retrieve import AUTH_A, KEY_A, get


async def cached(sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession) -> str:
    cid = (await emulator.create(KEY_A))["id"]
    await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
    return cid


async def test_cache_status_and_age_on_miss_hit_and_collapsed_miss(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    emulator.state.set_latency(100)
    answers = await asyncio.gather(*(get(http, url) for _ in range(5)))
    statuses = sorted(headers["Cache-Status"] for _, _, headers in answers)
    assert statuses[0] == "bifrost-sidecar; fwd=uri-miss; fwd-status=200; stored"
    assert all(s.endswith("; collapsed") for s in statuses[1:])
    assert all("Age" not in headers for _, _, headers in answers)
    emulator.state.set_latency(0)
    _, _, headers = await get(http, url)
    assert headers["Cache-Status"].startswith("bifrost-sidecar; hit; ttl=")
    assert int(headers["Cache-Status"].rsplit("=", 1)[1]) in range(0, 11)
    assert headers["Age"] == "0"


async def test_stale_hit_has_a_negative_ttl(
    start_sidecar: Any, make_settings: Any, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    sidecar = await start_sidecar(make_settings(fresh_ttl_s=0.2, local_ttl_s=0))
    cid = await cached(sidecar, emulator, http)
    await asyncio.sleep(1.3)
    _, body, headers = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}",
                                 {**AUTH_A, "Cache-Control": "max-stale"})  # fmt: skip
    assert headers["Cache-Status"] == "bifrost-sidecar; hit; ttl=-2"
    assert headers["Age"] == "1"
    assert body["extra_fields"]["cache_debug"]["similarity"] < 1


async def test_no_cache_revalidates_and_is_counted_as_a_request_forward(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = await cached(sidecar, emulator, http)
    for headers in ({"Cache-Control": "no-cache"}, {"Pragma": "no-cache"}):
        _, body, answer = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}",
                                    {**AUTH_A, **headers})  # fmt: skip
        assert body["extra_fields"]["cache_debug"]["cache_hit"] is False
        assert answer["Cache-Status"].startswith("bifrost-sidecar; fwd=request; fwd-status=200")
    assert emulator.retrieves(cid) == 3


@pytest.mark.parametrize(
    ("headers", "hit"),
    [
        ({"Cache-Control": "max-age=0"}, False),
        ({"Cache-Control": "max-age=60"}, True),
        ({"Cache-Control": "min-fresh=3600"}, False),
        ({"Cache-Control": "min-fresh=1"}, True),
        ({"x-bf-cache-ttl": "1ms"}, False),
        ({"x-bf-cache-ttl": "5m"}, True),
        ({"x-bf-cache-type": "semantic"}, True),
        ({"x-bf-cache-threshold": "1"}, True),
    ],
)
async def test_freshness_requirements(
    sidecar: Running,
    emulator: Emulator,
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    hit: bool,
) -> None:
    cid = await cached(sidecar, emulator, http)
    await asyncio.sleep(0.01)
    status, body, _ = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}",
                                {**AUTH_A, **headers})  # fmt: skip
    assert status == 200
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is hit
    assert emulator.retrieves(cid) == (1 if hit else 2)


async def test_only_if_cached_on_a_cold_key_is_504_without_an_upstream_call(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    status, body, _ = await get(http, url, {**AUTH_A, "Cache-Control": "only-if-cached"})
    assert status == 504
    assert body["error"]["code"] == "only_if_cached"
    assert body["is_bifrost_error"] is False
    assert emulator.retrieves(cid) == 0
    await get(http, url)
    status, body, _ = await get(http, url, {**AUTH_A, "Cache-Control": "only-if-cached"})
    assert status == 200
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is True


@pytest.mark.parametrize(
    "headers", [{"Cache-Control": "no-store"}, {"x-bf-cache-no-store": "true"}]
)
async def test_no_store_keeps_the_answer_out_of_the_cache(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    _, _, answer = await get(http, url, {**AUTH_A, **headers})
    assert "stored" not in answer["Cache-Status"]
    _, body, _ = await get(http, url)
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is False
    assert emulator.retrieves(cid) == 2


@pytest.mark.parametrize(
    ("headers", "param"),
    [
        ({"Cache-Control": "max-age=soon"}, "cache-control"),
        ({"Cache-Control": "max-age"}, "cache-control"),
        ({"Cache-Control": "max-stale=-1"}, "cache-control"),
        ({"Cache-Control": "private, bogus-directive"}, "cache-control"),
        ({"x-bf-cache-ttl": "0"}, "x-bf-cache-ttl"),
        ({"x-bf-cache-ttl": "forever"}, "x-bf-cache-ttl"),
        ({"x-bf-cache-ttl": "-5s"}, "x-bf-cache-ttl"),
        ({"x-bf-cache-no-store": "yes"}, "x-bf-cache-no-store"),
        ({"x-bf-cache-type": "fuzzy"}, "x-bf-cache-type"),
        ({"x-bf-cache-threshold": "nan"}, "x-bf-cache-threshold"),
    ],
)
async def test_bad_control_values_are_a_400_naming_the_header(
    sidecar: Running,
    emulator: Emulator,
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    param: str,
) -> None:
    status, body, _ = await get(http, f"{sidecar.url}/openai/v1/containers/cntr_1",
                                {**AUTH_A, **headers})  # fmt: skip
    assert status == 400
    assert body["error"]["param"] == param
    assert param in body["error"]["message"]
    assert emulator.retrieves() == 0
