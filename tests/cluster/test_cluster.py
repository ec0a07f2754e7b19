"""The serving and refresh paths on a real Redis Cluster and a Sentinel-managed Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.cluster.conftest import Cluster, Sentinel
from tests.conftest import Emulator
from tests.support import AUTH_A, KEY_A, KEY_B, backdate, get, refresh_events, wait_for
from tests.worker.conftest import run_worker_burst


def hit(body: dict[str, Any]) -> bool:
    return bool(body["extra_fields"]["cache_debug"]["cache_hit"])


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster of this test's own, which it may break."""
    cluster = Cluster(tmp_path / "cluster").start()
    yield cluster
    cluster.stop()


async def test_serving_path_on_a_cluster(
    start_sidecar: Any, make_settings: Any, emulator: Emulator, http: aiohttp.ClientSession,
    redis_cluster: Cluster,
) -> None:  # fmt: skip
    settings = make_settings(redis_url=redis_cluster.url, redis_cluster=True, local_ttl_s=0)
    replicas = [await start_sidecar(settings) for _ in range(2)]
    ids = [(await emulator.create(KEY_A))["id"] for _ in range(12)]  # spread over the slots
    emulator.state.set_latency(50)
    answers = await asyncio.gather(
        *(get(http, f"{r.url}/openai/v1/containers/{cid}") for cid in ids for r in replicas
          for _ in range(5))
    )  # fmt: skip
    assert {status for status, _, _ in answers} == {200}
    assert [emulator.retrieves(cid) for cid in ids] == [1] * len(ids)
    for cid in ids:
        _, body, _ = await get(http, f"{replicas[1].url}/openai/v1/containers/{cid}")
        assert hit(body)
        status, _, _ = await get(http, f"{replicas[0].url}/openai/v1/containers/{cid}",
                                 {"Authorization": f"Bearer {KEY_B}"})  # fmt: skip
        assert status == 404


async def test_refresh_path_on_a_cluster_with_the_queue_on_sentinel(
    start_sidecar: Any, make_settings: Any, emulator: Emulator, http: aiohttp.ClientSession,
    redis_cluster: Cluster, redis_sentinel: Sentinel,
) -> None:  # fmt: skip
    settings = make_settings(
        redis_url=redis_cluster.url, redis_cluster=True, queue_redis_url=redis_sentinel.url,
        service_api_key=KEY_A, fresh_ttl_s=0.3, local_ttl_s=30, queue_name="test:queue",
    )  # fmt: skip
    sidecar = await start_sidecar(settings)
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    await get(http, url)
    emulator.state.update_container(cid, status="expired")
    await backdate(settings, cid, 0.35)  # past the 0.3 s of freshness
    stale: dict[str, Any] = {}

    async def read_stale() -> bool:  # once the aged record's announcement reached the copy
        _, body, _ = await get(http, url)
        stale.update(body)
        return bool(body["extra_fields"]["cache_debug"].get("similarity", 1.0) < 1)

    await wait_for(read_stale)
    assert stale["status"] == "running"
    await wait_for(lambda: refresh_events(sidecar.app, "enqueued") == 1)
    await run_worker_burst(settings)
    seen: dict[str, Any] = {}

    async def read_expired() -> bool:  # once the refresh's announcement reached the copy
        _, body, _ = await get(http, url)
        seen.update(body)
        return bool(body["status"] == "expired")

    await wait_for(read_expired)
    assert hit(seen)


async def test_a_cluster_failover_keeps_answers_coming(
    start_sidecar: Any, make_settings: Any, emulator: Emulator, http: aiohttp.ClientSession,
    own_cluster: Cluster,
) -> None:  # fmt: skip
    settings = make_settings(redis_url=own_cluster.url, redis_cluster=True, local_ttl_s=0,
                             redis_retry_after_s=0.3)  # fmt: skip
    sidecar = await start_sidecar(settings)
    ids = [(await emulator.create(KEY_A))["id"] for _ in range(12)]
    for cid in ids:
        await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
    victim = next(m for m in own_cluster.masters() if m.port != own_cluster.nodes[0].port)
    victim.stop()
    statuses = []
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        for cid in ids:
            status, _, _ = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
            statuses.append(status)
        if own_cluster.healthy():
            break
        await asyncio.sleep(0.1)  # kept: answers sampled while the cluster heals
    assert set(statuses) == {200}, "every answer kept coming while the cluster healed"
    assert own_cluster.healthy(), "a replica took over"

    async def cached_again() -> bool:  # once the client sees the new map
        answers = [await get(http, f"{sidecar.url}/openai/v1/containers/{cid}") for cid in ids]
        assert all(status == 200 for status, _, _ in answers)
        return sum(hit(body) for _, body, _ in answers) >= len(ids) // 2

    await wait_for(cached_again, 5)  # served from cache again


async def test_the_cache_on_sentinel_survives_a_failover(
    start_sidecar: Any, make_settings: Any, emulator: Emulator, http: aiohttp.ClientSession,
    redis_sentinel: Sentinel,
) -> None:  # fmt: skip
    settings = make_settings(redis_url=redis_sentinel.url, local_ttl_s=0, redis_retry_after_s=0.3)
    sidecar = await start_sidecar(settings)
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    await get(http, url)
    assert hit((await get(http, url))[1])
    old_master = redis_sentinel.master.port
    redis_sentinel.master.stop()
    statuses = []
    deadline = time.monotonic() + 15
    while redis_sentinel.master_port() == old_master:
        statuses.append((await get(http, url, AUTH_A))[0])
        assert time.monotonic() < deadline, "the sentinels did not fail over"
        await asyncio.sleep(0.1)  # kept: answers sampled until the sentinels fail over
    assert set(statuses) == {200}

    async def cached_again() -> bool:  # a fill, then a hit: the sidecar found the new master
        await get(http, url)
        status, body, _ = await get(http, url)
        assert status == 200
        return hit(body)

    await wait_for(cached_again, timeout_s=15)  # cached on the new master
