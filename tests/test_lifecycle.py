"""Real processes: the worker and the sidecar stop gracefully; a crashed worker's refresh is redone."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from sidecar.settings import Settings, load_settings
from tests.conftest import Emulator, free_port
from tests.support import KEY_A, get, request_refresh, wait_for
from tests.worker.conftest import cache_container, cached

BIN = Path(sys.executable).parent


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


async def stale_container(emulator: Emulator, redis_url: str) -> tuple[Settings, str]:
    """A container cached stale whose refresh is asked for (claimed and queued, as a stale read
    does); the upstream has it expired since, which the refresh must pick up."""
    settings = load_settings({}, redis_url=redis_url, queue_name="test:queue",
                             upstream_kind="openai")  # fmt: skip
    cid = (await emulator.create(KEY_A))["id"]
    record = await cache_container(settings, cid, age_s=settings.fresh_ttl_s + 1)
    emulator.state.update_container(cid, status="expired")
    due_ms = record.fetched_at_ms + int(settings.fresh_ttl_s * 1000)
    assert await request_refresh(settings, cid, due_ms)
    return settings, cid


async def expired_in_cache(settings: Settings, cid: str) -> bool:
    record = await cached(settings, cid)
    return record is not None and record.status == "expired"


async def test_sigterm_lets_the_running_refresh_finish_and_exits_0(
    emulator: Emulator, redis_url: str, tmp_path: Path
) -> None:
    settings, cid = await stale_container(emulator, redis_url)
    emulator.state.set_latency(800)
    worker = start_worker(env_for(redis_url, emulator), tmp_path / "worker.log")
    try:
        await wait_for(lambda: emulator.retrieves(cid) == 1, 15)  # the refresh is in flight
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.wait, 10)
    finally:
        worker.kill()
    assert code == 0, (tmp_path / "worker.log").read_text()[-3000:]
    assert await expired_in_cache(settings, cid)  # written by the refresh SIGTERM let finish


async def test_a_refresh_whose_worker_was_killed_is_redone_by_another(
    emulator: Emulator, redis_url: str, tmp_path: Path
) -> None:
    settings, cid = await stale_container(emulator, redis_url)
    emulator.state.set_latency(700)
    env = env_for(redis_url, emulator, SIDECAR_UPSTREAM_TIMEOUT_S="0.8")
    first = start_worker(env, tmp_path / "first.log")
    second = None
    try:
        await wait_for(lambda: emulator.retrieves(cid) == 1, 15)
        first.kill()  # mid-call: its answer is never written
        await asyncio.to_thread(first.wait, 5)
        emulator.state.set_latency(0)
        second = start_worker({**env, "SIDECAR_WORKER_METRICS_PORT": str(free_port())},
                              tmp_path / "second.log")  # fmt: skip
        # Its claim lapses unrenewed, and the second worker's refresh-ahead plans it again.
        await wait_for(lambda: emulator.retrieves(cid) == 2, 20)
        await wait_for(lambda: expired_in_cache(settings, cid), 5)
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

            async def ready() -> bool:
                try:
                    async with http.get(f"{base}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_for(ready, 15)  # the sidecar started
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
