"""Real processes: the worker and the sidecar stop gracefully; a crashed worker's job is redone."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from arq.connections import create_pool

from sidecar.queue import enqueue_refresh_job, queue_redis_settings
from sidecar.settings import load_settings
from tests.conftest import Emulator, free_port
from tests.support import AUTH_A, KEY_A, get, wait_for

BIN = Path(sys.executable).parent
FAR_FUTURE_MS = 2**62


def env_for(redis_url: str, emulator: Emulator, **extra: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")},
        "SIDECAR_REDIS_URL": redis_url,
        "SIDECAR_UPSTREAM_URL": emulator.url,
        "SIDECAR_KEY_SECRET": "test-secret",
        "SIDECAR_SERVICE_API_KEY": KEY_A,
        "SIDECAR_QUEUE_NAME": "test:queue",
        "SIDECAR_WORKER_METRICS_PORT": str(free_port()),
        "SIDECAR_UPSTREAM_TIMEOUT_S": "1",
        "SIDECAR_SHUTDOWN_TIMEOUT_S": "5",
        **extra,
    }


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A real process of ours; its log goes to ``log`` (read it when a test fails)."""
    with log.open("ab") as sink:
        return subprocess.Popen(args, env=env, stdout=sink, stderr=subprocess.STDOUT)


def start_worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return spawn([str(BIN / "sidecar-worker")], env, log)


async def enqueue_refresh(redis_url: str, cid: str) -> None:
    settings = load_settings({}, redis_url=redis_url, queue_name="test:queue",
                             upstream_kind="openai")  # fmt: skip
    pool = await create_pool(queue_redis_settings(settings))
    assert await enqueue_refresh_job(pool, settings, "openai", cid, FAR_FUTURE_MS)
    await pool.aclose()


async def cached_container(sidecar: Any, emulator: Emulator, http: aiohttp.ClientSession) -> str:
    cid = (await emulator.create(KEY_A))["id"]
    await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
    emulator.state.update_container(cid, status="expired")  # what the refresh must pick up
    return cid


async def test_sigterm_lets_the_running_refresh_finish_and_exits_0(
    sidecar: Any, emulator: Emulator, http: aiohttp.ClientSession, redis_url: str, tmp_path: Path
) -> None:
    cid = await cached_container(sidecar, emulator, http)
    emulator.state.set_latency(800)
    worker = start_worker(env_for(redis_url, emulator), tmp_path / "worker.log")
    try:
        await enqueue_refresh(redis_url, cid)
        await wait_for(lambda: emulator.retrieves(cid) == 2, 15)  # the refresh is in flight
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.wait, 10)
    finally:
        worker.kill()
    assert code == 0, (tmp_path / "worker.log").read_text()[-3000:]
    emulator.state.set_latency(0)
    _, body, _ = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}",
                           {**AUTH_A, "Cache-Control": "only-if-cached"})  # fmt: skip
    assert body["status"] == "expired"  # written by the refresh that SIGTERM let finish


async def test_a_job_whose_worker_was_killed_is_redone_by_another(
    sidecar: Any, emulator: Emulator, http: aiohttp.ClientSession, redis_url: str, tmp_path: Path
) -> None:
    cid = await cached_container(sidecar, emulator, http)
    emulator.state.set_latency(700)
    env = env_for(redis_url, emulator, SIDECAR_UPSTREAM_TIMEOUT_S="0.8")
    first = start_worker(env, tmp_path / "first.log")
    second = None
    try:
        await enqueue_refresh(redis_url, cid)
        await wait_for(lambda: emulator.retrieves(cid) == 2, 15)
        first.kill()  # mid-call: its answer is never written
        await asyncio.to_thread(first.wait, 5)
        emulator.state.set_latency(0)
        second = start_worker({**env, "SIDECAR_WORKER_METRICS_PORT": str(free_port())},
                              tmp_path / "second.log")  # fmt: skip
        await wait_for(lambda: emulator.retrieves(cid) == 3, 40)
        url = f"{sidecar.url}/openai/v1/containers/{cid}"
        headers = {**AUTH_A, "Cache-Control": "only-if-cached"}

        async def refreshed() -> bool:
            return (await get(http, url, headers))[1].get("status") == "expired"

        deadline = time.monotonic() + 5
        while not await refreshed():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        for process in (first, second):
            if process is not None:
                process.kill()
                process.wait(5)


async def test_sidecar_sigterm_finishes_in_flight_requests_and_exits_0(
    emulator: Emulator, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    env = env_for(redis_url, emulator, SIDECAR_PORT=str(port), SIDECAR_HOST="127.0.0.1",
                  SIDECAR_UPSTREAM_TIMEOUT_S="5")  # fmt: skip
    log = tmp_path / "sidecar.log"
    process = spawn([str(BIN / "sidecar"), "serve"], env, log)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 15
            while True:
                try:
                    async with http.get(f"{base}/readyz") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline, "the sidecar did not start"
                    await asyncio.sleep(0.05)
            cids = [(await emulator.create(KEY_A))["id"] for _ in range(5)]
            emulator.state.set_latency(1500)
            in_flight = [
                asyncio.create_task(get(http, f"{base}/openai/v1/containers/{cid}")) for cid in cids
            ]
            await wait_for(lambda: emulator.retrieves() == 5, 10)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            answers = await asyncio.gather(*in_flight)
            code = await asyncio.to_thread(process.wait, 10)
            stopped_after = time.monotonic() - started
    finally:
        process.kill()
    assert [status for status, _, _ in answers] == [200] * 5
    assert code == 0, log.read_text()[-3000:]
    assert stopped_after < 5
    assert "Traceback" not in log.read_text()
