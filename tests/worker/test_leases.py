"""A refresh lost with its worker (SIGKILL mid-call) is redone by another within seconds."""

from __future__ import annotations

import time
from typing import Any

from sidecar.settings import Settings
from tests.conftest import Emulator
from tests.support import wait_for
from tests.worker.conftest import (
    SERVICE_KEY,
    cache_container,
    cached,
    enqueue_refresh,
)


async def refreshed_within(
    settings: Settings, ids: list[str], since_ms: int, limit_s: float
) -> float:
    """Seconds until every container's record was fetched after ``since_ms`` (at most
    ``limit_s``)."""
    started = time.monotonic()

    async def refreshed() -> bool:
        records = [await cached(settings, cid) for cid in ids]
        return all(r is not None and r.fetched_at_ms > since_ms for r in records)

    await wait_for(refreshed, limit_s)
    return time.monotonic() - started


async def test_a_stale_reads_refresh_lost_with_its_worker_is_redone_within_seconds(
    refresh_settings: Any, emulator: Emulator, worker_process: Any
) -> None:
    # Fresh for 3 s once refreshed: refresh-ahead does not renew it again before the count.
    settings = refresh_settings(fresh_ttl_s=3.0)
    cid = (await emulator.create(SERVICE_KEY))["id"]
    record = await cache_container(settings, cid, age_s=4)
    emulator.state.set_latency(1500)
    await enqueue_refresh(settings, cid, record.fetched_at_ms + 3000)  # claimed and queued
    first = worker_process(settings)
    await wait_for(lambda: emulator.retrieves(cid) == 1, 10)  # the call is in flight
    first.process.kill()
    first.process.wait(5)
    emulator.state.set_latency(0)
    worker_process(settings)  # another worker, started now

    # The batch stopped renewing its claim: it lapses, and refresh-ahead plans the container
    # again (arq's own lease would hold the job for its timeout plus 10 s, 16 s here).
    assert await refreshed_within(settings, [cid], record.fetched_at_ms, 15) < 6
    assert emulator.retrieves(cid) == 2


async def test_a_refresh_ahead_batch_lost_with_its_worker_is_redone_within_seconds(
    refresh_settings: Any, emulator: Emulator, worker_process: Any
) -> None:
    settings = refresh_settings(fresh_ttl_s=4.0)  # renewed again no sooner than 2.7 s later
    ids = [(await emulator.create(SERVICE_KEY))["id"] for _ in range(5)]
    records = [await cache_container(settings, cid, age_s=3.9, read=True) for cid in ids]
    emulator.state.set_latency(1500)
    first = worker_process(settings)  # plans the renewals at its first tick, then calls
    await wait_for(lambda: all(emulator.retrieves(cid) == 1 for cid in ids), 10)
    first.process.kill()
    first.process.wait(5)
    emulator.state.set_latency(0)
    worker_process(settings)

    # The renewals stay claimed (no other plan takes them): only their batch can redo them.
    since = max(r.fetched_at_ms for r in records)
    assert await refreshed_within(settings, ids, since, 15) < 6
    assert all(emulator.retrieves(cid) == 2 for cid in ids)
