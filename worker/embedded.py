"""The workers' jobs inside the sidecar process, for the embedded default (no Redis server).

The arq worker's refresh path on asyncio tasks (arq needs a real Redis server, which the embedded
store is not): refresh-ahead plans claimed batches, a stale read claims a batch of its own, and
each batch runs as a task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import aiohttp

from sidecar.flight import BackgroundTasks
from sidecar.metrics import Metrics
from sidecar.queue import Batch, Renewal, refresh_stale
from sidecar.settings import Settings
from sidecar.stats import FleetStats
from sidecar.store import CacheStore, now_ms
from worker.ahead import run_refresh_ahead
from worker.refresh import RefreshRunner

__all__ = ["EmbeddedWorker", "start_embedded_worker"]

log = logging.getLogger(__name__)


class EmbeddedWorker:
    """Runs refresh-ahead and the refresh batches in-process."""

    def __init__(self, runner: RefreshRunner) -> None:
        self._runner = runner
        self._tasks = BackgroundTasks()
        self._batches = BackgroundTasks()
        self._tasks.spawn(run_refresh_ahead(runner, runner.store.redis, self.enqueue))

    async def close(self) -> None:
        """Stop refresh-ahead and the batches still running; finish the saves under way."""
        await self._tasks.close()
        await self._batches.close()
        await self._runner.close()

    async def backlog(self) -> int | None:
        """Batches waiting or running in this process."""
        return len(self._batches)

    async def refresh_stale(self, store: CacheStore, renewal: Renewal) -> None:
        """Claim a stale read's renewal and run it (``sidecar.queue.refresh_stale``)."""
        runner = self._runner
        await refresh_stale(store, runner.settings, runner.metrics, self.enqueue, renewal)

    async def enqueue(self, batch: Batch, carrier: Mapping[str, str] | None = None) -> bool:
        """Run a batch in a task of its own, from its start time."""
        self._batches.spawn(self._run(batch, carrier))
        return True

    async def _run(self, batch: Batch, carrier: Mapping[str, str] | None) -> None:
        await asyncio.sleep(max(0.0, (batch.start_ms - now_ms()) / 1000))
        await self._runner.refresh_batch(
            batch.renewals, batch.lead_ms, batch.held_until_ms, carrier
        )


def start_embedded_worker(
    settings: Settings,
    redis: Any,
    session: aiohttp.ClientSession,
    metrics: Metrics,
    stats: FleetStats,
) -> EmbeddedWorker:
    """An embedded worker on the sidecar's own store, HTTP session, metrics and stats (which the
    sidecar flushes), started."""
    log.info("background refresh runs inside this process (embedded worker)")
    return EmbeddedWorker(RefreshRunner(settings, redis, session, metrics, stats))
