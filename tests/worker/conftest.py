"""Fixtures for the refresh path: sidecars with a service credential and real arq workers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from arq.worker import Worker

from sidecar.settings import Settings
from tests.conftest import Emulator
from worker.main import worker_options

SERVICE_KEY = "sk-bf-team-a"  # the service credential lives in the same project as the callers


@pytest.fixture
def refresh_settings(make_settings: Callable[..., Settings]) -> Callable[..., Settings]:
    """Settings with background refresh on and short windows."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "service_api_key": SERVICE_KEY,
            "fresh_ttl_s": 0.3,
            "max_stale_s": 30,
            "local_ttl_s": 0,
            "queue_name": "test:queue",
        }
        values.update(overrides)
        return make_settings(**values)

    return make


async def run_worker_burst(settings: Settings) -> Worker:
    """A real arq worker: run the refresh jobs queued now, then stop (no refresh-ahead cron,
    which would keep a burst worker busy forever)."""
    options = {**worker_options(settings), "cron_jobs": []}
    worker = Worker(**options, burst=True, handle_signals=False)
    try:
        await worker.main()
    finally:
        manager = getattr(worker.pool.connection_pool, "sentinel_manager", None)
        await worker.close()
        for sentinel in manager.sentinels if manager is not None else ():
            await sentinel.aclose()  # arq leaves its Sentinel clients open
    return worker


@contextlib.asynccontextmanager
async def running_worker(settings: Settings) -> AsyncIterator[Worker]:
    """A real arq worker running in the background of the test."""
    worker = Worker(**worker_options(settings), handle_signals=False)
    task = asyncio.create_task(worker.main())
    try:
        yield worker
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await worker.close()


def queued_jobs(redis_server: Any, queue: str = "test:queue") -> int:
    """Refresh jobs waiting in the arq queue (the refresh-ahead cron's own job left out)."""
    return sum(
        1 for job in redis_server.client().zrange(queue, 0, -1) if job.startswith(b"refresh:")
    )


async def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


__all__ = ["SERVICE_KEY", "Emulator", "queued_jobs", "run_worker_burst", "running_worker"]
