"""Stale-while-revalidate with real arq workers, a real Redis and the emulator."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from sidecar.keys import KeySpace, member
from sidecar.store import now_ms
from tests.conftest import Emulator
from tests.support import AUTH_A, KEY_A, backdate, background_idle, get, refresh_events, wait_for
from tests.worker.conftest import (
    SERVICE_KEY,
    cache_container,
    cache_store,
    enqueue_refresh,
    indexed,
    queued_jobs,
    run_worker_burst,
    running_worker,
)


def debug(body: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = body["extra_fields"]["cache_debug"]
    return result


async def test_an_upstream_change_is_visible_after_fresh_ttl_plus_one_refresh(
    start_sidecar: Any, refresh_settings: Any, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    settings = refresh_settings()
    sidecar = await start_sidecar(settings)
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    _, first, _ = await get(http, url)
    emulator.state.update_container(cid, last_active_at=first["last_active_at"] + 42)
    await backdate(settings, cid, 0.35)  # past the 0.3 s of freshness

    _, stale, _ = await get(http, url)
    assert stale["last_active_at"] == first["last_active_at"]  # answered at once, from cache
    assert debug(stale)["cache_hit"] is True
    assert 0 < debug(stale)["similarity"] < 1
    # The enqueue runs in the background of the request.
    await wait_for(lambda: refresh_events(sidecar.app, "enqueued") == 1)
    await run_worker_burst(settings)

    _, fresh, _ = await get(http, url)
    assert fresh["last_active_at"] == first["last_active_at"] + 42
    assert debug(fresh) | {"similarity": 1.0} == debug(fresh)
    assert emulator.retrieves(cid) == 2


async def test_a_thousand_concurrent_stale_reads_make_one_job_and_one_call(
    start_sidecar: Any,
    refresh_settings: Any,
    emulator: Emulator,
    http: aiohttp.ClientSession,
    redis_server: Any,
) -> None:
    # A loaded machine must not make Redis look hung (a timeout sends reads upstream by design).
    settings = refresh_settings(redis_socket_timeout_s=5, redis_connect_timeout_s=5)
    replicas = [await start_sidecar(settings) for _ in range(2)]
    cid = (await emulator.create(KEY_A))["id"]
    await get(http, f"{replicas[0].url}/openai/v1/containers/{cid}")
    await get(http, f"{replicas[1].url}/openai/v1/containers/{cid}", {"x-api-key": KEY_A})
    assert emulator.retrieves(cid) == 2  # one proof of access per credential
    await backdate(settings, cid, 0.35)
    connector = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=connector) as many:
        results = await asyncio.gather(
            *(get(many, f"{replicas[i % 2].url}/openai/v1/containers/{cid}") for i in range(1000))
        )
    assert all(debug(body)["cache_hit"] for _, body, _ in results)
    # Every read's enqueue has run (one queued, the others found the claim taken).
    await wait_for(lambda: sum(refresh_events(r.app, "enqueued") for r in replicas) >= 1)
    await wait_for(lambda: all(background_idle(r.app) for r in replicas))
    assert sum(refresh_events(r.app, "enqueued") for r in replicas) == 1
    assert queued_jobs(redis_server) == 1
    await run_worker_burst(settings)
    assert emulator.retrieves(cid) == 3
    assert queued_jobs(redis_server) == 0


async def test_a_429_stops_refreshes_until_retry_after_while_stale_is_served(
    start_sidecar: Any, refresh_settings: Any, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    settings = refresh_settings()
    sidecar = await start_sidecar(settings)
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    await get(http, url)
    await backdate(settings, cid, 0.35)
    emulator.state.add_fault(kind="status", status=429, retry_after_s=1, count=1)
    await get(http, url)
    await wait_for(lambda: refresh_events(sidecar.app, "enqueued") == 1)
    await run_worker_burst(settings)
    assert emulator.retrieves(cid) == 2  # the refresh met the 429

    for _ in range(5):
        status, body, _ = await get(http, url)
        assert status == 200
        assert debug(body)["cache_hit"] is True
        await wait_for(lambda: background_idle(sidecar.app))  # anything the read set going
        await run_worker_burst(settings)
    assert emulator.retrieves(cid) == 2  # nobody called the provider meanwhile
    # The held-back renewal is due again at the back-off's end: the reads meanwhile queued no job.
    assert refresh_events(sidecar.app, "enqueued") == 1

    await asyncio.sleep(1.0)  # Retry-After: the throttle lapses in Redis, in real time
    await get(http, url)
    await wait_for(lambda: background_idle(sidecar.app))  # the read's enqueue
    await run_worker_burst(settings)
    assert emulator.retrieves(cid) == 3
    _, body, _ = await get(http, url)
    assert debug(body)["similarity"] == 1.0


async def test_stale_if_error_then_the_upstreams_error(
    start_sidecar: Any, refresh_settings: Any, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    # Wide windows: the record is aged into the middle of each, however slow the machine.
    settings = refresh_settings(fresh_ttl_s=0.2, max_stale_s=5, stale_if_error_s=5)
    sidecar = await start_sidecar(settings)
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    await get(http, url)
    emulator.state.add_fault(kind="status", status=503)

    await backdate(settings, cid, 0.2 + 2.5)  # stale: served at once, the refresh fails
    status, body, headers = await get(http, url)
    assert status == 200
    assert debug(body)["hit_type"] == "direct"
    await wait_for(lambda: refresh_events(sidecar.app, "enqueued") == 1)
    await run_worker_burst(settings)

    await backdate(settings, cid, 5)  # past the stale window: revalidation fails, stale-if-error
    status, body, headers = await get(http, url)
    assert status == 200
    assert body["id"] == cid
    assert debug(body)["hit_type"] == "stale_if_error"
    assert "stale-if-error" in headers["Cache-Status"]

    await backdate(settings, cid, 5)  # past stale-if-error: the upstream's error
    status, body, _ = await get(http, url)
    assert status == 503
    assert body["status_code"] == 503


async def test_terminal_and_negative_entries_are_never_polled(
    start_sidecar: Any,
    refresh_settings: Any,
    emulator: Emulator,
    http: aiohttp.ClientSession,
    redis_server: Any,
) -> None:
    settings = refresh_settings(negative_ttl_s=5, refresh_tick_s=1)
    sidecar = await start_sidecar(settings)
    cid = (await emulator.create(KEY_A))["id"]
    emulator.state.update_container(cid, status="expired")
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    missing = f"{sidecar.url}/openai/v1/containers/cntr_gone"
    assert (await get(http, url))[1]["status"] == "expired"
    assert (await get(http, missing))[0] == 404
    client = redis_server.client()
    due = KeySpace(settings.key_prefix).due
    async with running_worker(settings):
        for _ in range(12):
            assert (await get(http, url))[0] == 200
            status, body, _ = await get(http, missing)
            assert status == 404
            assert debug(body)["cache_hit"] is True
            await asyncio.sleep(0.1)  # kept: 1.2 s of reads, past the worker's 1 s tick
        # A refresh-ahead tick ran after the reads (its election key), and neither entry is in
        # the due set it plans from: no tick, then or later, renews them.
        last = int(time.time() // settings.refresh_tick_s)
        await wait_for(lambda: client.exists(f"{settings.queue_name}:refresh-ahead:{last}") == 1)
    assert client.zscore(due, member("openai", cid)) is None
    assert client.zscore(due, member("openai", "cntr_gone")) is None
    assert emulator.retrieves(cid) == 1
    assert emulator.retrieves("cntr_gone") == 1
    assert queued_jobs(redis_server) == 0


async def test_refresh_ahead_keeps_read_entries_fresh_and_lets_unread_ones_lapse(
    start_sidecar: Any, refresh_settings: Any, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    settings = refresh_settings(
        fresh_ttl_s=1.5, refresh_tick_s=1, refresh_lead_s=0.6, hot_window_s=1.0
    )
    sidecar = await start_sidecar(settings)
    hot = (await emulator.create(KEY_A))["id"]
    cold = (await emulator.create(KEY_A))["id"]
    await get(http, f"{sidecar.url}/openai/v1/containers/{cold}")
    similarities = []
    cold_calls_after_2s = 0
    async with running_worker(settings):
        for i in range(40):
            _, body, _ = await get(http, f"{sidecar.url}/openai/v1/containers/{hot}")
            similarities.append(debug(body).get("similarity", 1.0))
            await asyncio.sleep(0.1)  # kept: 4 s of reads over refresh-ahead's real ticks
            if i == 20:
                cold_calls_after_2s = emulator.retrieves(cold)
    assert min(similarities) == 1.0  # never served stale
    assert 3 <= emulator.retrieves(hot) <= 6  # about one call per fresh window of reading
    # Read once, then no more: past the hot window it lapses without upstream calls.
    assert cold_calls_after_2s <= 3
    assert emulator.retrieves(cold) == cold_calls_after_2s


async def test_a_workers_refresh_reaches_every_replicas_local_copy(
    start_sidecar: Any, refresh_settings: Any, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    settings = refresh_settings(local_ttl_s=60, fresh_ttl_s=0.3)
    sidecar = await start_sidecar(settings)
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    await get(http, url)
    emulator.state.update_container(cid, status="deleted")
    await backdate(settings, cid, 0.35)

    async def read_stale() -> bool:  # once the aged record's announcement reached the copy
        _, body, _ = await get(http, url)
        return bool(debug(body).get("similarity", 1.0) < 1)

    await wait_for(read_stale)
    await wait_for(lambda: refresh_events(sidecar.app, "enqueued") == 1)
    await run_worker_burst(settings)

    async def read_deleted() -> bool:  # once the refresh's announcement reached the copy
        _, body, _ = await get(http, url, AUTH_A)
        return bool(body["status"] == "deleted")

    await wait_for(read_deleted)


async def test_a_renewal_during_another_processes_429_back_off_waits_for_its_end(
    refresh_settings: Any, emulator: Emulator
) -> None:
    settings = refresh_settings()
    cid = (await emulator.create(SERVICE_KEY))["id"]
    record = await cache_container(settings, cid, age_s=1)
    async with cache_store(settings) as store:
        await store.set_backoff("openai", 2000)  # a 429 another worker met
    backoff_ends_ms = now_ms() + 2000
    await enqueue_refresh(settings, cid, record.fetched_at_ms + 300)
    await run_worker_burst(settings)
    assert emulator.retrieves(cid) == 0  # nobody called the provider during the back-off
    due_ms, _ = await indexed(settings, cid)
    assert due_ms is not None
    assert backoff_ends_ms - 200 <= due_ms <= backoff_ends_ms + 200
