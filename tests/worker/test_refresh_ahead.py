"""Refresh-ahead in batches: many containers renewed by a few jobs, once per refresh interval,
on a plain Redis, a Redis Cluster and the embedded store; a quiet idle worker, an honest backlog
and only the documented job events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.app import create_app
from sidecar.metrics import REFRESH_EVENTS, Metrics
from sidecar.queue import ArqRefresher
from sidecar.store import now_ms
from tests.cluster.conftest import Cluster
from tests.conftest import Emulator, start_app
from tests.support import KEY_B, get, request_refresh, wait_for
from tests.worker.conftest import (
    SERVICE_KEY,
    cache_container,
    cached,
    enqueue_refresh,
    indexed,
    run_worker_burst,
    running_worker,
    scrape,
)
from worker.embedded import start_embedded_worker


async def test_refresh_ahead_renews_many_containers_with_a_few_jobs_once_per_interval(
    start_sidecar: Any, refresh_settings: Any, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    settings = refresh_settings(fresh_ttl_s=1.5, refresh_tick_s=1, refresh_lead_s=0.3)
    sidecar = await start_sidecar(settings)
    ids = [(await emulator.create(SERVICE_KEY))["id"] for _ in range(60)]
    for cid in ids:
        await cache_container(settings, cid, age_s=0, read=True)
    similarities: list[float] = []
    async with running_worker(settings) as worker:
        started = time.monotonic()
        while time.monotonic() - started < 4.5:
            for cid in ids[::6]:
                _, body, _ = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
                similarities.append(body["extra_fields"]["cache_debug"].get("similarity", 1.0))
            await asyncio.sleep(0.1)  # kept: reads spread over refresh-ahead's real ticks
    jobs = worker.jobs
    calls = [emulator.retrieves(cid) for cid in ids]
    assert min(similarities) == 1.0  # never served stale
    # A renewal every fresh TTL less the lead (and its jitter): about 4 in 4.5 s, and the
    # sidecar's own call for the ten read containers (a grant for the reader).
    assert all(3 <= n <= 6 for n in calls), calls
    assert jobs <= sum(calls) / 5  # batches: many renewals a job


async def test_an_idle_worker_logs_nothing_and_reports_no_backlog(
    refresh_settings: Any, emulator: Emulator, worker_process: Any
) -> None:
    settings = refresh_settings(fresh_ttl_s=2.0)
    worker = worker_process(settings)
    await worker.ready()
    # Kept: three refresh-ahead ticks of a worker process in real time; what is checked is
    # that they do nothing (no event marks a quiet tick).
    await asyncio.sleep(3)
    assert await scrape(worker.url, "sidecar_refresh_backlog") == {(): 0.0}
    refresher = ArqRefresher(settings, Metrics("sidecar"))
    try:
        assert await refresher.backlog() == 0  # what the sidecar's stats say
    finally:
        await refresher.close()
    ready = next(i for i, line in enumerate(worker.lines()) if "worker ready" in line)
    assert worker.lines()[ready + 1 :] == []

    cid = (await emulator.create(SERVICE_KEY))["id"]
    await cache_container(settings, cid, age_s=1.5, read=True)
    await wait_for(lambda: emulator.retrieves(cid) >= 1, 5)
    # The batch job's line, written once the job is done.
    await wait_for(lambda: any("refreshed" in line for line in worker.lines()[ready + 1 :]), 10)
    lines = worker.lines()[ready + 1 :]
    assert len(lines) == 1, lines  # one line for the batch job, with what it did
    assert "1 refreshed" in lines[0]
    assert " INFO " in lines[0]


async def test_the_workers_refresh_job_events_are_the_documented_ones(
    refresh_settings: Any, emulator: Emulator
) -> None:
    settings = refresh_settings()
    ok, gone, failing = [(await emulator.create(SERVICE_KEY))["id"] for _ in range(3)]
    theirs = (await emulator.create(KEY_B))["id"]
    for cid in (ok, theirs, failing):
        record = await cache_container(settings, cid, age_s=1)
        await enqueue_refresh(settings, cid, record.fetched_at_ms + 300)
    await enqueue_refresh(settings, gone, 0)  # nothing cached: lapsed
    emulator.state.add_fault(kind="status", status=503, container_id=failing, count=1)
    metrics = Metrics("worker")
    await run_worker_burst(settings, metrics)
    events = {k: c.value for k, c in metrics.refresh_jobs.children.items()}
    assert {key[0] for key in events} == set(REFRESH_EVENTS)  # each there from the start, no others
    assert events[("succeeded",)] == 1  # ok
    assert events[("retried",)] == 1  # failing: due again when its back-off ends
    assert events[("skipped",)] == 2  # lapsed, and theirs handed over
    due_ms, _ = await indexed(settings, failing)
    assert due_ms is not None
    assert 0 < due_ms - now_ms() <= settings.error_backoff_s * 1100


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path / "cluster").start()
    yield cluster
    cluster.stop()


async def test_batches_on_a_redis_cluster(
    start_sidecar: Any,
    refresh_settings: Any,
    emulator: Emulator,
    http: aiohttp.ClientSession,
    cluster: Cluster,
    redis_url: str,
) -> None:
    settings = refresh_settings(
        redis_url=cluster.url, redis_cluster=True, queue_redis_url=redis_url,
        fresh_ttl_s=1.2, refresh_tick_s=1, refresh_lead_s=0.3,
    )  # fmt: skip
    sidecar = await start_sidecar(settings)
    ids = [(await emulator.create(SERVICE_KEY))["id"] for _ in range(24)]  # over many slots
    async with running_worker(settings):
        started = time.monotonic()
        while time.monotonic() - started < 5.0:
            for cid in ids:
                status, _, _ = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
                assert status == 200
            await asyncio.sleep(0.2)  # kept: reads spread over refresh-ahead's real ticks
    assert all(emulator.retrieves(cid) >= 3 for cid in ids)  # a miss, then renewals


async def test_the_embedded_worker_refreshes_in_batches_on_the_embedded_store(
    make_settings: Any, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(
        # A lead of 0.6 s: a loaded machine's event loop lag must not make a renewal late.
        redis_url="", service_api_key=SERVICE_KEY, fresh_ttl_s=2.0, local_ttl_s=0,
        refresh_tick_s=1, refresh_lead_s=0.6,
    )  # fmt: skip
    sidecar = await start_app(create_app(settings, embedded_worker=start_embedded_worker))
    try:
        ids = [(await emulator.create(SERVICE_KEY))["id"] for _ in range(5)]
        similarities = []
        started = time.monotonic()
        while time.monotonic() - started < 5.0:
            for cid in ids:
                _, body, _ = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
                similarities.append(body["extra_fields"]["cache_debug"].get("similarity", 1.0))
            await asyncio.sleep(0.1)  # kept: reads spread over refresh-ahead's real ticks
        # Read on expiry instead, each container would be answered stale at least every two
        # seconds (10 or more here); refresh-ahead renews them first, give or take a loaded
        # machine's milliseconds: the miss, then a renewal about every 1.4 s.
        assert sum(similarity < 1.0 for similarity in similarities) <= 2
        assert all(3 <= emulator.retrieves(cid) <= 5 for cid in ids)
    finally:
        await sidecar.runner.cleanup()


async def test_a_stale_reads_job_and_a_batch_never_refresh_a_container_together(
    refresh_settings: Any, emulator: Emulator
) -> None:
    settings = refresh_settings(fresh_ttl_s=2.0)
    cid = (await emulator.create(SERVICE_KEY))["id"]
    record = await cache_container(settings, cid, age_s=1.95, read=True)
    emulator.state.set_latency(300)
    async with running_worker(settings):
        await wait_for(lambda: emulator.retrieves(cid) == 1, 3)  # refresh-ahead's call
        # Meanwhile a stale read asks: the batch holds the container's claim, nothing is queued.
        assert not await request_refresh(settings, cid, record.fetched_at_ms + 2000)

        async def renewed() -> bool:  # the batch's refresh, stored
            now = await cached(settings, cid)
            return now is not None and now.fetched_at_ms > record.fetched_at_ms

        await wait_for(renewed, 10)
    assert emulator.retrieves(cid) == 1
