"""The workers' jobs inside the sidecar process, for the embedded default (no Redis server).

The same refresh and refresh-ahead code as the arq worker runs here on asyncio tasks: arq itself
needs a real Redis server, which the embedded store is not.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from sidecar.errors import StoreUnavailable
from sidecar.flight import BackgroundTasks
from sidecar.metrics import Metrics
from sidecar.settings import Settings
from worker.main import WorkerDeps, build_deps
from worker.refresh import RetryLater

__all__ = ["EmbeddedWorker", "start_embedded_worker"]

log = logging.getLogger(__name__)


class EmbeddedWorker:
    """Runs refreshes in-process, one at a time per container, with the arq worker's retries."""

    def __init__(self, deps: WorkerDeps) -> None:
        self._deps = deps
        self._tasks = BackgroundTasks()
        self._queued: set[tuple[str, str]] = set()

    def start(self) -> None:
        """Start the refresh-ahead loop."""
        self._tasks.spawn(self._refresh_ahead())

    async def close(self) -> None:
        """Stop the loop and the refreshes still running."""
        await self._tasks.close()

    async def backlog(self) -> int | None:
        """Refreshes queued or running in this process."""
        return len(self._queued)

    async def enqueue_refresh(
        self, provider: str, container_id: str, due_ms: int, delay_s: float = 0.0
    ) -> None:
        """Refresh a container (unless one is already queued for it)."""
        key = (provider, container_id)
        jobs = self._deps.metrics.refresh_jobs
        if key in self._queued:
            jobs.labels("deduplicated").inc()
            return
        jobs.labels("enqueued").inc()
        self._queued.add(key)
        self._tasks.spawn(self._refresh(key, due_ms, delay_s))

    async def _refresh(self, key: tuple[str, str], due_ms: int, delay_s: float) -> None:
        try:
            await asyncio.sleep(delay_s)
            deps = self._deps
            for attempt in range(1, deps.settings.refresh_max_tries + 1):
                try:
                    deps.count(await deps.runner.refresh(*key, due_ms, attempt))
                    return
                except RetryLater as exc:
                    deps.metrics.refresh_jobs.labels("retried").inc()
                    await asyncio.sleep(exc.delay_s)
                except StoreUnavailable:
                    deps.count("store-unavailable")
                    return
            deps.count("failed")
        finally:
            self._queued.discard(key)

    async def _refresh_ahead(self) -> None:
        while True:
            for provider, container_id, due_ms, delay_s in await self._deps.planner.plan():
                await self.enqueue_refresh(provider, container_id, due_ms, delay_s)
            await self._deps.stats.flush()
            await asyncio.sleep(self._deps.settings.refresh_tick_s)


def start_embedded_worker(
    settings: Settings, redis: Any, session: aiohttp.ClientSession, metrics: Metrics
) -> EmbeddedWorker:
    """An embedded worker on the sidecar's own store, HTTP session and metrics, started."""
    worker = EmbeddedWorker(build_deps(settings, redis, session, metrics))
    worker.start()
    log.info("background refresh runs inside this process (embedded worker)")
    return worker
