"""The arq worker: the refresh job, refresh-ahead, and the resources they share."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from arq.connections import RedisSettings, create_pool
from arq.worker import Worker, func

from sidecar import tracing
from sidecar.connections import close_redis, create_redis
from sidecar.errors import StoreUnavailable
from sidecar.keys import KeySpace
from sidecar.metrics import Metrics
from sidecar.queue import (
    POLL_S,
    REFRESH_BATCH_JOB,
    Batch,
    Renewal,
    enqueue_batch,
    queue_redis_settings,
)
from sidecar.reads import flush_every
from sidecar.settings import Settings
from sidecar.stats import FleetStats
from sidecar.store import REDIS_ERRORS, Breaker, CacheStore
from sidecar.upstream import Upstream, create_session
from worker.ahead import RefreshPlanner, run_refresh_ahead
from worker.http import start_worker_http
from worker.limits import ProviderLimiter
from worker.refresh import RefreshRunner, event_of, summary

__all__ = [
    "Outage",
    "WorkerDeps",
    "build_deps",
    "refresh_batch",
    "run_worker",
    "worker_options",
]

log = logging.getLogger(__name__)


class Outage:
    """An outage of something the worker needs: logged once when it starts and once when it
    ends; the delay before each retry doubles from ``base_s`` to ``cap_s``."""

    def __init__(self, what: str, base_s: float = 0.1, cap_s: float = 2.0) -> None:
        self._what = what
        self._base_s = base_s
        self._cap_s = cap_s
        self._since: float | None = None
        self._delay_s = base_s

    def failed(self, exc: BaseException) -> float:
        """Note a failure; how long to wait before trying again."""
        if self._since is None:
            self._since = time.monotonic()
            self._delay_s = self._base_s
            log.warning("%s unreachable (%s: %s): waiting for it, jobs resume when it is back",
                        self._what, type(exc).__name__, exc)  # fmt: skip
            return self._delay_s
        self._delay_s = min(self._cap_s, self._delay_s * 2)
        return self._delay_s

    def recovered(self) -> None:
        """Note a success; the end of an outage is logged."""
        if self._since is not None:
            log.info("%s reachable again after %.1fs", self._what, time.monotonic() - self._since)
            self._since = None


@dataclass(frozen=True, slots=True)
class WorkerDeps:
    """What the jobs use, built once per worker process at start-up."""

    settings: Settings
    redis: Any
    session: aiohttp.ClientSession
    store: CacheStore
    runner: RefreshRunner
    planner: RefreshPlanner
    metrics: Metrics
    stats: FleetStats

    def count(self, result: str, times: int = 1) -> str:
        """Count a refresh's result; returns it."""
        self.metrics.refresh_jobs.labels(event_of(result)).inc(times)
        return result

    async def close(self) -> None:
        """Finish the saves under way, then close the connections."""
        await self.runner.close()
        await self.store.close()
        await self.session.close()
        await close_redis(self.redis)


def build_deps(
    settings: Settings, redis: Any, session: aiohttp.ClientSession, metrics: Metrics
) -> WorkerDeps:
    """Wire the refresh machinery onto a cache Redis and an HTTP session."""
    keys = KeySpace(settings.key_prefix)
    breaker = Breaker(settings.redis_retry_after_s, on_failure=metrics.redis_errors.inc)
    store = CacheStore(redis, keys, breaker)
    stats = FleetStats(store)
    limiter = ProviderLimiter(
        redis,
        keys,
        settings.provider_concurrency,
        call_s=settings.upstream_timeout_s,
        local_limit=settings.upstream_max_connections,
    )
    upstream = Upstream(session, settings, metrics, caller="worker", stats=stats)
    runner = RefreshRunner(store, upstream, limiter, settings)
    return WorkerDeps(
        settings=settings,
        redis=redis,
        session=session,
        store=store,
        runner=runner,
        planner=RefreshPlanner(store, settings, runner.throttle, runner.lead_ms),
        metrics=metrics,
        stats=stats,
    )


async def refresh_batch(
    ctx: dict[str, Any],
    renewals: list[Renewal],
    lead_ms: int,
    held_until_ms: int,
    carrier: dict[str, str] | None = None,
) -> str:
    """Job: renew claimed containers, each ``lead_ms`` before it goes stale; a stale read's
    batch carries its request's trace context (``carrier``: the job's trace links to it)."""
    deps: WorkerDeps = ctx["deps"]
    attributes: dict[str, Any] = {"bifrost.renewals": len(renewals)}
    if len(renewals) == 1:
        attributes |= {"bifrost.provider": renewals[0][0], "bifrost.container_id": renewals[0][1]}
    with tracing.job_span(REFRESH_BATCH_JOB, carrier, attributes):
        results = await deps.runner.refresh_batch(
            [(p, c, int(d)) for p, c, d in renewals], lead_ms, held_until_ms
        )
    for result, times in results.items():
        deps.count(result, times)
    return summary(results)


async def _remove_retired(store: CacheStore) -> None:
    """Earlier versions' keys go (in the background: Redis may be away at start-up)."""
    with contextlib.suppress(StoreUnavailable):
        await store.remove_retired()


def _metrics(settings: Settings) -> Metrics:
    return Metrics("worker", providers=settings.container_providers)


def worker_options(settings: Settings, ctx: dict[str, Any], outage: Outage) -> dict[str, Any]:
    """Keyword arguments of ``arq.Worker`` for these settings: one function, the batch job."""
    # A renewal waits at most one upstream timeout for a provider slot, then makes one call; a
    # batch also waits its turn for one of this process's connections. This bounds a job that
    # hangs. A job lost with its worker is not run again (``max_tries=1``): its claims lapse and
    # refresh-ahead plans its renewals again, within seconds instead of arq's lease.
    timeout_s = settings.upstream_timeout_s * 4 + 10

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

    return {
        "functions": [
            func(
                refresh_batch, name=REFRESH_BATCH_JOB, keep_result=0, max_tries=1, timeout=timeout_s
            ),
        ],
        "redis_settings": _queue_settings(settings),
        "queue_name": settings.queue_name,
        "max_jobs": settings.worker_max_jobs,
        "job_timeout": timeout_s,
        "keep_result": 0,
        "poll_delay": POLL_S,
        "job_completion_wait": int(settings.shutdown_timeout_s),
        "health_check_interval": 10,
        "handle_signals": False,
        "on_startup": connected,
        "ctx": ctx,
    }


async def run_worker(
    settings: Settings,
    *,
    burst: bool = False,
    stopping: asyncio.Event | None = None,
    metrics: Metrics | None = None,
) -> int:
    """Run a worker until ``stopping`` is set (then the jobs under way finish, within
    ``SIDECAR_SHUTDOWN_TIMEOUT_S``); ``burst``: run the jobs queued now, then return (no
    refresh-ahead). The number of jobs it ran.

    arq's worker exits at the first Redis error. Here that is an outage: logged once when it
    starts and once when it ends, and a new ``arq.Worker`` polls again after a back-off (0.1 s
    doubling to 2 s).
    """
    stopping = stopping or asyncio.Event()
    outage = Outage("refresh queue (redis)")
    queue = await _connect(settings, outage, stopping)
    if queue is None:
        return 0
    redis = create_redis(settings)
    session = create_session(settings, tracing.client_trace_configs())
    deps = build_deps(settings, redis, session, metrics or _metrics(settings))
    jobs = 0
    tasks = [
        asyncio.ensure_future(flush_every(1.0, deps.stats.flush)),
        asyncio.ensure_future(_remove_retired(deps.store)),
    ]
    if not burst:

        async def enqueue(batch: Batch) -> None:
            await enqueue_batch(queue, settings, batch)

        planner = run_refresh_ahead(settings, deps.planner, deps.metrics, queue, enqueue)
        tasks.append(asyncio.ensure_future(planner))
    http = await start_worker_http(deps, queue)
    ctx: dict[str, Any] = {"deps": deps}
    try:
        while not stopping.is_set():
            worker = Worker(**worker_options(settings, ctx, outage), burst=burst)
            try:
                await _poll_until_stopped(worker, stopping)
                break  # stopped, or a burst is done
            except REDIS_ERRORS as exc:
                delay_s = outage.failed(exc)
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
        await deps.close()
        await close_redis(queue)
    return jobs


def _queue_settings(settings: Settings) -> RedisSettings:
    """The queue's connection settings, with no retries of arq's own: the waiting (and its one
    log line an outage) is the worker's."""
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
                await asyncio.wait_for(stopping.wait(), outage.failed(exc))
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
        with contextlib.suppress(asyncio.CancelledError):
            await running
        return
    running.result()


async def _close(worker: Worker) -> None:
    """arq's close, bounded (a Redis that is down or hung does not hold up the exit), and the
    Sentinel clients arq leaves open closed."""
    pool = worker.pool
    with contextlib.suppress(asyncio.CancelledError, asyncio.TimeoutError, *REDIS_ERRORS):
        await asyncio.wait_for(worker.close(), 5.0)
        if pool is not None:
            await close_redis(pool)
