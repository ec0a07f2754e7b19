"""What operators see: metrics, health, admin endpoints."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.keys import KeySpace
from sidecar.state import SERVICES
from tests.conftest import Emulator, RedisServer, Running
from tests.support import AUTH_A, KEY_A, KEY_B, get, wait_for

ROUTE = "/openai/v1/containers/{container_id}"
ADMIN = {"Authorization": "Bearer admin-secret"}


async def scrape(http: aiohttp.ClientSession, base: str) -> dict[tuple[str, frozenset[Any]], float]:
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await response.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def test_metrics_move_as_requests_say(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    emulator.state.set_latency(50)
    await asyncio.gather(*(get(http, url) for _ in range(3)))  # 1 miss + 2 collapsed
    emulator.state.set_latency(0)
    await get(http, url)  # hit
    await get(http, url, {**AUTH_A, "Cache-Control": "no-cache"})  # bypass
    await get(http, url, {"Authorization": f"Bearer {KEY_B}"})  # miss (upstream 404)
    await get(http, url, {"Authorization": f"Bearer {KEY_B}"})  # negative hit
    await get(http, f"{sidecar.url}/openai/v1/containers/bad%20id")  # error
    async with http.get(f"{sidecar.url}/openai/v1/containers", headers=AUTH_A) as response:
        assert response.status == 200  # a relayed list
        await response.read()  # headers come first: the answer is counted once it is whole

    samples = await scrape(http, sidecar.url)
    requests = "sidecar_requests_total"
    assert value(samples, requests, route=ROUTE, outcome="miss") == 4
    assert value(samples, requests, route=ROUTE, outcome="hit") == 1
    assert value(samples, requests, route=ROUTE, outcome="bypass") == 1
    assert value(samples, requests, route=ROUTE, outcome="negative") == 1
    assert value(samples, requests, route=ROUTE, outcome="error") == 1
    assert value(samples, requests, route="passthrough", outcome="bypass") == 1
    upstream = "sidecar_upstream_requests_total"
    # The relayed list is counted as relayed, not as a call of the retrieval upstream.
    assert value(samples, "sidecar_relayed_requests_total", family="containers",
                 status_class="2xx") == 1  # fmt: skip
    assert value(samples, upstream, provider="openai", status_class="2xx", caller="sidecar") == 2
    assert value(samples, upstream, provider="openai", status_class="4xx", caller="sidecar") == 1
    assert value(samples, "sidecar_collapsed_requests_total", scope="process") == 2
    assert value(samples, "sidecar_served_data_age_seconds_count") == 2
    assert value(samples, "sidecar_request_duration_seconds_count", route=ROUTE,
                 outcome="hit") == 1  # fmt: skip
    assert value(samples, "sidecar_redis_up") == 1
    assert value(samples, "sidecar_redis_fail_open_seconds_total") == 0
    assert value(samples, "sidecar_build_info", version="0.1.0", component="sidecar") == 1


async def test_a_callers_429_is_counted_and_holds_back_nobody_else(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    emulator.state.add_fault(kind="status", status=429, retry_after_s=30, count=1)
    status, _, headers = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
    assert status == 429
    assert headers["Retry-After"] == "30"
    samples = await scrape(http, sidecar.url)
    assert value(samples, "sidecar_upstream_throttled_total", provider="openai") == 1
    # That credential's limit is its own: no provider-wide back-off, the next call goes out.
    assert ("sidecar_upstream_backoff_seconds", frozenset({("provider", "openai")})) not in samples
    status, _, _ = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
    assert status == 200


async def test_health_and_readiness_report_redis_without_failing(
    start_sidecar: Any,
    make_settings: Any,
    own_redis: RedisServer,
    http: aiohttp.ClientSession,
    emulator: Emulator,
) -> None:
    sidecar = await start_sidecar(make_settings(redis_url=own_redis.url))
    async with http.get(f"{sidecar.url}/readyz") as response:
        assert response.status == 200
        assert (await response.json())["redis"] == "up"
    own_redis.stop()
    cid = (await emulator.create(KEY_A))["id"]
    await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")  # notices Redis is gone
    async with http.get(f"{sidecar.url}/healthz") as response:
        assert response.status == 200
    async with http.get(f"{sidecar.url}/readyz") as response:
        assert response.status == 200
        body = await response.json()
    assert body["status"] == "ready"
    assert body["redis"] == "down (serving fail-open)"
    samples = await scrape(http, sidecar.url)
    assert value(samples, "sidecar_redis_up") == 0
    assert value(samples, "sidecar_redis_errors_total") >= 1


@pytest.fixture
async def admin_sidecar(start_sidecar: Any, make_settings: Any) -> Running:
    running: Running = await start_sidecar(make_settings(admin_token="admin-secret"))
    return running


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/api/cache/clear/6118f694-252f-5f24-bf70-6238a9c2075b"),
        ("DELETE", "/api/cache/clear-by-key/cntr_1"),
        ("GET", "/api/cache/stats"),
    ],
)
async def test_admin_endpoints_refuse_without_the_token(
    sidecar: Running,
    admin_sidecar: Running,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
) -> None:
    async with http.request(method, sidecar.url + path, headers=ADMIN) as response:
        assert response.status == 404  # no admin token configured: the endpoints are off
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 403),
                            (AUTH_A, 403)):  # fmt: skip
        async with http.request(method, admin_sidecar.url + path, headers=headers) as response:
            assert response.status == status
            assert (await response.json())["error"]["message"]


async def test_an_admin_token_that_is_not_utf8_is_refused_not_a_crash(
    admin_sidecar: Running,
) -> None:
    host, port = admin_sidecar.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /api/cache/stats HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\r\n\r\n")
    status_line = await reader.readline()
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 403 ")


async def test_purge_by_cache_id_and_by_container(
    admin_sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    first = (await emulator.create(KEY_A))["id"]
    second = (await emulator.create(KEY_A))["id"]
    url = f"{admin_sidecar.url}/openai/v1/containers/"
    _, body, _ = await get(http, url + first)
    await get(http, url + second)
    cache_id = body["extra_fields"]["cache_debug"]["cache_id"]

    async with http.delete(f"{admin_sidecar.url}/api/cache/clear/{cache_id}",
                           headers=ADMIN) as response:  # fmt: skip
        assert response.status == 200
        assert (await response.json())["container_id"] == first
    async with http.delete(f"{admin_sidecar.url}/api/cache/clear/{cache_id}",
                           headers=ADMIN) as response:  # fmt: skip
        assert response.status == 404
    async with http.delete(f"{admin_sidecar.url}/api/cache/clear-by-key/{second}",
                           headers=ADMIN) as response:  # fmt: skip
        assert response.status == 200
    for cid in (first, second):
        _, body, _ = await get(http, url + cid)
        assert body["extra_fields"]["cache_debug"]["cache_hit"] is False
        assert emulator.retrieves(cid) == 2


async def test_stats_summarise_the_fleet(
    admin_sidecar: Running,
    emulator: Emulator,
    http: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    for _ in range(4):
        await get(http, f"{admin_sidecar.url}/openai/v1/containers/{cid}")
    # Counts are flushed to Redis twice a second, all in one go: wait for the hash there (a
    # stats request in a polling loop would count itself).
    client = redis_server.client()
    stats_key = KeySpace(admin_sidecar.app[SERVICES].settings.key_prefix).stats
    await wait_for(lambda: client.hget(stats_key, "answers.hit") == b"3")
    client.close()
    async with http.get(f"{admin_sidecar.url}/api/cache/stats", headers=ADMIN) as response:
        stats = await response.json()
    assert stats["entries"] == 1
    assert stats["answers"] == {"miss": 1, "hit": 3}
    assert stats["hit_ratio"] == 0.75
    assert stats["upstream_calls_saved"] == 3
    assert stats["upstream_calls"] == {"sidecar": 1, "worker": 0}
    assert stats["redis"] == "up"
