"""Containers the service credential cannot see (another project's) are handed to their
callers, never deleted: the workers stop refreshing them, the callers keep their cached copy."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from tests.conftest import Emulator
from tests.support import KEY_B, backdate, get
from tests.worker.conftest import (
    SERVICE_KEY,
    cached,
    enqueue_refresh,
    indexed,
    run_worker_burst,
    running_worker,
)

AUTH_B = {"Authorization": f"Bearer {KEY_B}"}


@pytest.mark.parametrize("refusal", [404, 403, 401])
async def test_a_refresh_the_service_credential_is_refused_hands_the_record_over(
    refusal: int,
    start_sidecar: Any,
    refresh_settings: Any,
    emulator: Emulator,
    http: aiohttp.ClientSession,
    redis_server: Any,
) -> None:
    settings = refresh_settings()
    sidecar = await start_sidecar(settings)
    owner = KEY_B if refusal == 404 else SERVICE_KEY  # 404: another project's container
    auth = {"Authorization": f"Bearer {owner}"}
    cid = (await emulator.create(owner))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    assert (await get(http, url, auth))[0] == 200
    before = await backdate(settings, cid, 0.35)  # stale: past the 0.3 s of freshness
    assert not before.inline_refresh
    ttl_before = redis_server.client().pttl(sidecar_key(settings, cid))
    if refusal != 404:
        emulator.state.add_fault(kind="status", status=refusal, count=1)
    await enqueue_refresh(settings, cid, before.fetched_at_ms + 300)  # a stale read's job
    await run_worker_burst(settings)
    assert emulator.retrieves(cid) == 2  # the worker's call, refused

    after = await cached(settings, cid)
    assert after is not None  # kept for its callers, same data and freshness, flagged
    assert after.inline_refresh
    assert (after.fetched_at_ms, after.body) == (before.fetched_at_ms, before.body)
    assert 0 < redis_server.client().pttl(sidecar_key(settings, cid)) <= ttl_before
    assert (await indexed(settings, cid))[0] is None  # out of refresh-ahead's due set
    status, body, _ = await get(http, url, {**auth, "Cache-Control": "only-if-cached, max-stale"})
    assert status == 200
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is True

    await enqueue_refresh(settings, cid, before.fetched_at_ms + 300)
    await run_worker_burst(settings)
    assert emulator.retrieves(cid) == 2  # the workers leave it alone from now on


async def test_refresh_ahead_hands_another_projects_containers_over_after_one_call(
    start_sidecar: Any, refresh_settings: Any, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    settings = refresh_settings(fresh_ttl_s=0.6, refresh_tick_s=1, refresh_lead_s=0.3)
    sidecar = await start_sidecar(settings)
    mine = (await emulator.create(SERVICE_KEY))["id"]
    theirs = (await emulator.create(KEY_B))["id"]
    async with running_worker(settings) as worker:
        for _ in range(15):  # 3 s of reading both
            await get(http, f"{sidecar.url}/openai/v1/containers/{mine}")
            await get(http, f"{sidecar.url}/openai/v1/containers/{theirs}", AUTH_B)
            await asyncio.sleep(0.2)  # kept: reads spread over refresh-ahead's ticks
        calls = {k: c.value for k, c in worker.metrics.upstream.children.items()}
    by_worker = {key[1]: n for key, n in calls.items() if key[2] == "worker" and n}
    assert by_worker.get("4xx") == 1  # one 404 for their container, then never again
    assert by_worker.get("2xx", 0) >= 3  # mine kept fresh meanwhile
    record = await cached(settings, theirs)
    assert record is not None
    assert record.inline_refresh


def sidecar_key(settings: Any, container_id: str) -> str:
    from sidecar.keys import KeySpace

    return KeySpace(settings.key_prefix).record("openai", container_id)
