"""A worker process under Redis trouble: it rides out a restart and answers its probes while
Redis hangs."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import aiohttp

from tests.conftest import Emulator, RedisServer
from tests.support import wait_for
from tests.worker.conftest import (
    SERVICE_KEY,
    cache_container,
    cached,
    enqueue_refresh,
    scrape,
)


async def test_a_worker_rides_out_a_redis_restart_and_logs_the_outage_once(
    own_redis: RedisServer, refresh_settings: Any, emulator: Emulator, worker_process: Any
) -> None:
    settings = refresh_settings(redis_url=own_redis.url)
    worker = worker_process(settings)
    await worker.ready()
    for down_s in (0.0, 2.5):  # killed and restarted at once; killed and left down a while
        assert own_redis.process is not None
        own_redis.process.kill()
        own_redis.process.wait(5)
        own_redis.process = None
        await asyncio.sleep(down_s)  # kept: the outage itself is real time
        own_redis.start()  # on the same port, empty
        # Kept: how long the worker is watched living through the restart (it need not notice
        # a short outage at all, so no log line marks the end of this).
        await asyncio.sleep(1.5)
        assert worker.process.poll() is None, "\n".join(worker.lines())

    cid = (await emulator.create(SERVICE_KEY))["id"]
    record = await cache_container(settings, cid, age_s=1)
    await enqueue_refresh(settings, cid, record.fetched_at_ms + 300)
    await wait_for(lambda: emulator.retrieves(cid) == 1, 10)

    async def refreshed() -> bool:
        now = await cached(settings, cid)
        return now is not None and now.fetched_at_ms > record.fetched_at_ms

    await wait_for(refreshed, 5)
    assert worker.process.poll() is None  # the same process did it
    lines = worker.lines()
    outages = [line for line in lines if "refresh queue (redis) unavailable" in line]
    recoveries = [line for line in lines if "refresh queue (redis) reachable again" in line]
    # Each outage the worker noticed is logged once, and its end once.
    assert 1 <= len(outages) == len(recoveries) <= 2, "\n".join(lines)
    assert all(" WARNING " in line for line in outages)
    assert "Traceback" not in "\n".join(lines)
    assert len(lines) < 30, "\n".join(lines)  # no log flood


async def test_probes_and_metrics_answer_at_once_while_redis_hangs(
    own_redis: RedisServer, refresh_settings: Any, worker_process: Any
) -> None:
    settings = refresh_settings(redis_url=own_redis.url)
    worker = worker_process(settings)
    await worker.ready()
    assert own_redis.process is not None
    pid = own_redis.process.pid

    async def timed(http: aiohttp.ClientSession, path: str) -> tuple[int, float]:
        started = time.monotonic()
        async with http.get(f"{worker.url}{path}") as response:
            await response.read()
            return response.status, time.monotonic() - started

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        assert (await timed(http, "/readyz"))[0] == 200
        assert await scrape(worker.url, "sidecar_redis_up") == {(): 1.0}
        os.kill(pid, signal.SIGSTOP)
        try:
            for _ in range(12):  # 3 s of a hung Redis
                for path in ("/metrics", "/readyz", "/healthz"):
                    _, seconds = await timed(http, path)
                    assert seconds < 0.5, path
                await asyncio.sleep(0.25)  # kept: the probes are timed over 3 s of a hang
            assert await scrape(worker.url, "sidecar_redis_up") == {(): 0.0}
            assert (await timed(http, "/readyz"))[0] == 503
            assert (await timed(http, "/healthz"))[0] == 200
        finally:
            os.kill(pid, signal.SIGCONT)

        async def redis_up() -> bool:
            return await scrape(worker.url, "sidecar_redis_up") == {(): 1.0}

        await wait_for(redis_up, 10)  # redis_up comes back
        assert (await timed(http, "/readyz"))[0] == 200
    assert worker.process.poll() is None
