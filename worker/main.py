"""The arq worker: the refresh job, refresh-ahead, and the resources they share."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import signal
import time
from typing import Any

from arq.connections import RedisSettings, create_pool
from arq.worker import Worker, func

from sidecar import tracing
from sidecar.connections import close_redis, create_redis
from sidecar.flight import flush_every
from sidecar.logs import Outage
from sidecar.metrics import Metrics
from sidecar.queue import POLL_S, REFRESH_BATCH_JOB, Renewal, enqueue_batch, queue_redis_settings
from sidecar.settings import Settings
from sidecar.store import REDIS_ERRORS
from sidecar.upstream import create_session
from worker.ahead import run_refresh_ahead
from worker.http import start_worker_http
from worker.refresh import RefreshRunner

__all__ = ["refresh_batch", "run_worker"]

log = logging.getLogger(__name__)


def _retry_in(outage: Outage, exc: BaseException) -> float:
    """Note a failure; the wait before trying again, growing with the outage from 0.1 s to 2 s."""
    outage.failed(exc)
    assert outage.since is not None
    return min(2.0, 0.1 + (time.monotonic() - outage.since) / 2)


async def refresh_batch(
    ctx: dict[str, Any],
    renewals: list[Renewal],
    lead_ms: int,
    held_until_ms: int,
    carrier: dict[str, str] | None = None,
) -> str:
    """Job: renew claimed containers, each ``lead_ms`` before it goes stale (``carrier``: the
    trace context of the stale read that asked); the results, for arq's job line."""
    runner: RefreshRunner = ctx["runner"]
    results = await runner.refresh_batch(renewals, lead_ms, held_until_ms, carrier)
    return ", ".join(f"{n} {word}" for word, n in sorted(results.items())) or "nothing"


async def run_worker(
    settings: Settings,
    *,
    burst: bool = False,
    stopping: asyncio.Event | None = None,
    metrics: Metrics | None = None,
) -> int:
    """Run a worker until ``stopping`` is set (the jobs under way then finish, within
    ``SIDECAR_SHUTDOWN_TIMEOUT_S``), or with ``burst`` until the jobs queued now ran (no
    refresh-ahead); the number of jobs it ran. arq's worker exits at the first Redis error: here
    that is an outage, and a new ``arq.Worker`` polls again after a back-off."""
    stopping = stopping or asyncio.Event()
    outage = Outage(log, "refresh queue (redis)", "waiting for it, jobs resume when it is back")
    queue = await _connect(settings, outage, stopping)
    if queue is None:
        return 0
    redis = create_redis(settings)
    session = create_session(settings, tracing.client_trace_configs())
    metrics = metrics or Metrics("worker", providers=settings.container_providers)
    runner = RefreshRunner(settings, redis, session, metrics)
    tasks = [
        asyncio.ensure_future(flush_every(1.0, runner.stats.flush)),
        # Earlier versions' keys go (in the background: Redis may be away at start-up).
        asyncio.ensure_future(runner.store.remove_retired()),
    ]
    if not burst:
        enqueue = functools.partial(enqueue_batch, queue, settings)
        tasks.append(asyncio.ensure_future(run_refresh_ahead(runner, queue, enqueue)))
    http = await start_worker_http(runner, queue)
    ctx: dict[str, Any] = {"runner": runner}
    jobs = 0
    try:
        while not stopping.is_set():
            worker = _worker(settings, ctx, outage, burst)
            try:
                await _poll_until_stopped(worker, stopping)
                break  # stopped, or a burst is done
            except REDIS_ERRORS as exc:
                delay_s = _retry_in(outage, exc)
            finally:
                await _close(worker)
                jobs += worker.jobs_complete + worker.jobs_failed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay_s)
    finally:
        if http is not None:
            await http.cleanup()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.close()
        await session.close()
        await close_redis(redis)
        await close_redis(queue)
    return jobs


def _worker(settings: Settings, ctx: dict[str, Any], outage: Outage, burst: bool) -> Worker:
    """An ``arq.Worker`` of the one job. A job lost with its worker is not run again
    (``max_tries=1``): its claims lapse and refresh-ahead plans it again within seconds."""

    async def connected(ctx: dict[str, Any]) -> None:
        outage.recovered()
        if not ctx.setdefault("ready", False):
            ctx["ready"] = True
            log.info(
                "worker ready: queue %r, %d concurrent jobs, refresh-ahead every %ds for entries "
                "read in the last %.0fs",
                settings.queue_name,
                settings.worker_max_jobs,
                settings.refresh_tick_s,
                settings.hot_window_s,
            )

    return Worker(
        [func(refresh_batch, name=REFRESH_BATCH_JOB)],
        redis_settings=_queue_settings(settings),
        queue_name=settings.queue_name,
        burst=burst,
        max_jobs=settings.worker_max_jobs,
        # A renewal waits at most one upstream timeout for a provider slot, then makes one call;
        # a batch also waits its turn for one of this process's connections.
        job_timeout=settings.upstream_timeout_s * 4 + 10,
        keep_result=0,
        max_tries=1,
        poll_delay=POLL_S,
        job_completion_wait=int(settings.shutdown_timeout_s),
        health_check_interval=10,
        handle_signals=False,
        on_startup=connected,
        ctx=ctx,
    )


def _queue_settings(settings: Settings) -> RedisSettings:
    """The queue's connection settings without arq's own retries: the worker waits (and logs
    an outage once) itself."""
    return dataclasses.replace(queue_redis_settings(settings), conn_retries=0)


async def _connect(settings: Settings, outage: Outage, stopping: asyncio.Event) -> Any:
    """The queue's Redis, once it answers (None: stopped before it did)."""
    while not stopping.is_set():
        try:
            queue = await create_pool(
                _queue_settings(settings), default_queue_name=settings.queue_name
            )
        except REDIS_ERRORS as exc:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), _retry_in(outage, exc))
        else:
            outage.recovered()
            return queue
    return None


async def _poll_until_stopped(worker: Worker, stopping: asyncio.Event) -> None:
    """Run ``worker`` until it returns (a burst is done), fails, or ``stopping`` is set: then
    it takes no more jobs and lets those under way finish (arq's graceful stop)."""
    running = asyncio.ensure_future(worker.async_run())
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({running, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if not running.done():
        worker.handle_sig_wait_for_completion(signal.SIGTERM)
    with contextlib.suppress(asyncio.CancelledError):  # the graceful stop's end
        await running


async def _close(worker: Worker) -> None:
    """arq's close, bounded (a Redis that is down or hung does not hold up the exit), and the
    Sentinel clients arq leaves open closed."""
    pool = worker.pool
    with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError, *REDIS_ERRORS):
        await asyncio.wait_for(worker.close(), 5.0)
        if pool is not None:
            await close_redis(pool)
