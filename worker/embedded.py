"""The workers' jobs inside the sidecar process, for the embedded default (no Redis server).

The same refresh and refresh-ahead code as the arq worker runs here on asyncio tasks: arq itself
needs a real Redis server, which the embedded store is not.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from sidecar import tracing
from sidecar.errors import StoreUnavailable
from sidecar.flight import BackgroundTasks
from sidecar.metrics import Metrics
from sidecar.queue import REFRESH_JOB
from sidecar.settings import Settings
from sidecar.store import now_ms
from worker.ahead import Batch, run_refresh_ahead
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
        """Start refresh-ahead."""
        deps = self._deps
        self._tasks.spawn(
            run_refresh_ahead(deps.settings, deps.planner, deps.metrics, deps.redis, self._batch)
        )

    async def close(self) -> None:
        """Stop refresh-ahead and the refreshes still running; finish the saves under way."""
        await self._tasks.close()
        await self._deps.runner.close()
        await self._deps.store.close()

    async def backlog(self) -> int | None:
        """Refreshes queued or running in this process."""
        return len(self._queued)

    async def enqueue_refresh(
        self, provider: str, container_id: str, due_ms: int, delay_s: float = 0.0
    ) -> None:
        """Refresh a container (unless one is already queued for it)."""
        await self._enqueue(provider, container_id, due_ms, delay_s, 1)

    async def _enqueue(
        self, provider: str, container_id: str, due_ms: int, delay_s: float, attempt: int
    ) -> bool:
        key = (provider, container_id)
        jobs = self._deps.metrics.refresh_jobs
        if key in self._queued:
            jobs.labels("deduplicated").inc()
            return False
        jobs.labels("enqueued").inc()
        self._queued.add(key)
        self._tasks.spawn(self._refresh(key, due_ms, delay_s, attempt))
        return True

    async def _refresh(
        self, key: tuple[str, str], due_ms: int, delay_s: float, first_attempt: int
    ) -> None:
        # The task was made by the request that asked: its trace context is the one to link.
        attributes = {"bifrost.provider": key[0], "bifrost.container_id": key[1]}
        with tracing.job_span(REFRESH_JOB, tracing.current_carrier(), attributes):
            await self._run_refresh(key, due_ms, delay_s, first_attempt)

    async def _run_refresh(
        self, key: tuple[str, str], due_ms: int, delay_s: float, first_attempt: int
    ) -> None:
        try:
            await asyncio.sleep(delay_s)
            deps = self._deps
            for attempt in range(first_attempt, deps.settings.refresh_max_tries + 1):
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

    async def _batch(self, batch: Batch) -> None:
        self._tasks.spawn(self._run_batch(batch))

    async def _run_batch(self, batch: Batch) -> None:
        start_ms, lead_ms, renewals = batch
        await asyncio.sleep(max(0.0, (start_ms - now_ms()) / 1000))
        deps = self._deps
        outcome = await deps.runner.refresh_batch(renewals, lead_ms)
        for result, times in outcome.results.items():
            deps.count(result, times)
        for (provider, container_id, due_ms), delay_s in outcome.retry:
            if not await self._enqueue(provider, container_id, due_ms, delay_s, 2):
                await deps.runner.writes.give_back(provider, container_id, due_ms)


def start_embedded_worker(
    settings: Settings, redis: Any, session: aiohttp.ClientSession, metrics: Metrics
) -> EmbeddedWorker:
    """An embedded worker on the sidecar's own store, HTTP session and metrics, started."""
    worker = EmbeddedWorker(build_deps(settings, redis, session, metrics))
    worker.start()
    log.info("background refresh runs inside this process (embedded worker)")
    return worker
