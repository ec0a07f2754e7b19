"""The arq worker: refresh jobs, refresh-ahead, and the resources they share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
from arq import Retry
from arq.worker import func

from sidecar import tracing
from sidecar.connections import close_redis, create_redis
from sidecar.errors import StoreUnavailable
from sidecar.keys import KeySpace
from sidecar.metrics import Metrics
from sidecar.queue import (
    POLL_S,
    REFRESH_BATCH_JOB,
    REFRESH_JOB,
    Renewal,
    enqueue_refresh_batch,
    enqueue_refresh_job,
    queue_redis_settings,
)
from sidecar.reads import flush_every
from sidecar.settings import Settings
from sidecar.stats import FleetStats
from sidecar.store import REDIS_ERRORS, Breaker, CacheStore
from sidecar.upstream import Upstream, create_session
from worker.ahead import Batch, RefreshPlanner, run_refresh_ahead
from worker.http import start_worker_http
from worker.limits import ProviderLimiter
from worker.queue_worker import QueueWorker
from worker.refresh import RefreshRunner, RetryLater, event_of

__all__ = [
    "WorkerDeps",
    "build_deps",
    "create_worker",
    "refresh_batch",
    "refresh_container",
    "worker_options",
]

log = logging.getLogger(__name__)


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


async def refresh_container(
    ctx: dict[str, Any],
    provider: str,
    container_id: str,
    due_ms: int,
    carrier: dict[str, str] | None = None,
) -> str:
    """Job: refresh one container with the service credential (a stale read asked); its trace
    links to the request's (``carrier``)."""
    attributes = {"bifrost.provider": provider, "bifrost.container_id": container_id}
    with tracing.job_span(REFRESH_JOB, carrier, attributes):
        return await _refresh_container(ctx, provider, container_id, due_ms)


async def _refresh_container(
    ctx: dict[str, Any], provider: str, container_id: str, due_ms: int
) -> str:
    deps: WorkerDeps = ctx["deps"]
    attempt = int(ctx.get("job_try", 1))
    try:
        return deps.count(await deps.runner.refresh(provider, container_id, due_ms, attempt))
    except StoreUnavailable:
        return deps.count("store-unavailable")
    except RetryLater as exc:
        if attempt >= deps.settings.refresh_max_tries:
            log.warning("refresh of %s/%s failed %d times: %s", provider, container_id,
                        attempt, exc)  # fmt: skip
            return deps.count("failed")
        deps.metrics.refresh_jobs.labels("retried").inc()
        raise Retry(defer=exc.delay_s) from exc


async def refresh_batch(
    ctx: dict[str, Any], renewals: list[Renewal], lead_ms: int | None = None
) -> str:
    """Job: renew the containers refresh-ahead planned, each ``lead_ms`` before it goes stale;
    upstream failures are retried by jobs of their own (which take over the renewal's claim)."""
    deps: WorkerDeps = ctx["deps"]
    with tracing.job_span("refresh_batch", None, {"bifrost.renewals": len(renewals)}):
        outcome = await deps.runner.refresh_batch([(p, c, int(d)) for p, c, d in renewals], lead_ms)
    for result, times in outcome.results.items():
        deps.count(result, times)
    for (provider, container_id, due_ms), delay_s in outcome.retry:
        try:
            queued = await enqueue_refresh_job(
                ctx["redis"], deps.settings, provider, container_id, due_ms, delay_s, job_try=2
            )
        except REDIS_ERRORS:
            deps.count("failed")  # the claim goes back once Redis is back (WriteBehind retries)
            await deps.runner.writes.give_back(provider, container_id, due_ms)
            continue
        if queued:
            deps.metrics.refresh_jobs.labels("retried").inc()
        else:  # a stale read's job is queued: let it claim the renewal
            await deps.runner.writes.give_back(provider, container_id, due_ms)
            deps.metrics.refresh_jobs.labels("deduplicated").inc()
    return outcome.summary()


async def _startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    redis = create_redis(settings)
    session = create_session(settings, tracing.client_trace_configs())
    deps = build_deps(settings, redis, session, _metrics(settings))
    ctx["deps"] = deps
    queue = ctx["redis"]
    tasks = [
        asyncio.ensure_future(flush_every(1.0, deps.stats.flush)),
        asyncio.ensure_future(_remove_retired(deps.store)),
    ]
    if ctx.get("refresh_ahead", True):

        async def enqueue(batch: Batch) -> None:
            start_ms, lead_ms, renewals = batch
            expires_s = deps.planner.claim_ms / 1000
            await enqueue_refresh_batch(
                queue, settings, renewals, start_ms, lead_ms, expires_s=expires_s
            )

        tasks.append(
            asyncio.ensure_future(
                run_refresh_ahead(settings, deps.planner, deps.metrics, queue, enqueue)
            )
        )
    ctx["tasks"] = tasks
    ctx["http"] = await start_worker_http(deps, queue)
    log.info(
        "worker ready: queue %r, %d concurrent jobs, refresh-ahead every %ds for entries read "
        "in the last %.0fs",
        settings.queue_name,
        settings.worker_max_jobs,
        settings.refresh_tick_s,
        settings.hot_window_s,
    )


async def _remove_retired(store: CacheStore) -> None:
    """Earlier versions' keys go (in the background: Redis may be away at start-up)."""
    with contextlib.suppress(StoreUnavailable):
        await store.remove_retired()


def _metrics(settings: Settings) -> Metrics:
    return Metrics("worker", providers=settings.container_providers)


async def _shutdown(ctx: dict[str, Any]) -> None:
    deps: WorkerDeps | None = ctx.get("deps")
    if deps is None:
        return
    if ctx.get("http") is not None:
        await ctx["http"].cleanup()
    for task in ctx["tasks"]:
        task.cancel()
    for task in ctx["tasks"]:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await deps.close()


def worker_options(settings: Settings, *, refresh_ahead: bool = True) -> dict[str, Any]:
    """Keyword arguments of :class:`QueueWorker` (an ``arq.Worker``) for these settings;
    without ``refresh_ahead`` it runs queued jobs only (a burst worker)."""
    # A refresh waits at most one upstream timeout for a provider slot, then makes one call; a
    # batch also waits its turn for one of this process's connections. These bound a job that
    # hangs: a job whose worker died is run again once its lease (3 s, renewed) lapses.
    job_timeout_s = settings.upstream_timeout_s * 2 + 2
    batch_timeout_s = settings.upstream_timeout_s * 4 + 10
    return {
        "functions": [
            func(
                refresh_container,
                name=REFRESH_JOB,
                keep_result=0,
                max_tries=settings.refresh_max_tries + 1,
                timeout=job_timeout_s,
            ),
            func(
                refresh_batch,
                name=REFRESH_BATCH_JOB,
                keep_result=0,
                max_tries=3,  # runs again only when its worker died
                timeout=batch_timeout_s,
            ),
        ],
        "redis_settings": queue_redis_settings(settings),
        "queue_name": settings.queue_name,
        "max_jobs": settings.worker_max_jobs,
        "job_timeout": job_timeout_s,
        "keep_result": 0,
        "poll_delay": POLL_S,
        "job_completion_wait": int(settings.shutdown_timeout_s),
        "health_check_interval": 10,
        "on_startup": _startup,
        "on_shutdown": _shutdown,
        "ctx": {"settings": settings, "refresh_ahead": refresh_ahead},
    }


def create_worker(settings: Settings, **options: Any) -> QueueWorker:
    """The worker for these settings; ``options`` override :func:`worker_options`'."""
    refresh_ahead = not options.get("burst", False)
    return QueueWorker(**{**worker_options(settings, refresh_ahead=refresh_ahead), **options})
