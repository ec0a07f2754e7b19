"""The arq worker: refresh jobs, the refresh-ahead tick, and the resources they share."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
from arq import Retry, cron
from arq.worker import func

from sidecar.connections import close_redis, create_redis
from sidecar.errors import StoreUnavailable
from sidecar.keys import KeySpace
from sidecar.metrics import Metrics
from sidecar.queue import (
    REFRESH_AHEAD_JOB,
    REFRESH_JOB,
    enqueue_refresh_job,
    queue_redis_settings,
)
from sidecar.reads import flush_every
from sidecar.settings import Settings
from sidecar.stats import FleetStats
from sidecar.store import Breaker, CacheStore
from sidecar.upstream import Upstream, create_session
from worker.http import start_worker_http
from worker.limits import ProviderLimiter
from worker.refresh import RefreshPlanner, RefreshRunner, RetryLater, event_of

__all__ = ["WorkerDeps", "refresh_ahead", "refresh_container", "worker_options"]

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

    def count(self, result: str) -> str:
        """Count a refresh's result; returns it."""
        self.metrics.refresh_jobs.labels(event_of(result)).inc()
        return result


def build_deps(
    settings: Settings, redis: Any, session: aiohttp.ClientSession, metrics: Metrics
) -> WorkerDeps:
    """Wire the refresh machinery onto a cache Redis and an HTTP session."""
    keys = KeySpace(settings.key_prefix)
    breaker = Breaker(settings.redis_retry_after_s, on_failure=metrics.redis_errors.inc)
    store = CacheStore(redis, keys, breaker)
    stats = FleetStats(store)
    limiter = ProviderLimiter(
        redis, keys, settings.provider_concurrency, call_s=settings.upstream_timeout_s
    )
    upstream = Upstream(session, settings, metrics, caller="worker", stats=stats)
    runner = RefreshRunner(store, upstream, limiter, settings)
    return WorkerDeps(
        settings=settings,
        redis=redis,
        session=session,
        store=store,
        runner=runner,
        planner=RefreshPlanner(store, settings, runner.throttle),
        metrics=metrics,
        stats=stats,
    )


async def refresh_container(
    ctx: dict[str, Any], provider: str, container_id: str, due_ms: int
) -> str:
    """Job: refresh one container with the service credential."""
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


async def refresh_ahead(ctx: dict[str, Any]) -> int:
    """Cron job: enqueue the renewals of read entries that go stale before the next tick."""
    deps: WorkerDeps = ctx["deps"]
    queue = ctx["redis"]
    enqueued = 0
    for provider, container_id, due_ms, delay_s in await deps.planner.plan():
        queued = await enqueue_refresh_job(
            queue, deps.settings, provider, container_id, due_ms, delay_s
        )
        enqueued += queued
        deps.metrics.refresh_jobs.labels("enqueued" if queued else "deduplicated").inc()
    return enqueued


async def _startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    redis = create_redis(settings)
    session = create_session(settings)
    deps = build_deps(settings, redis, session, Metrics("worker"))
    ctx["deps"] = deps
    ctx["flush"] = asyncio.create_task(flush_every(1.0, deps.stats.flush))
    ctx["http"] = await start_worker_http(deps, ctx["redis"])
    log.info(
        "worker ready: queue %r, %d concurrent jobs, refresh-ahead every %ds for entries read "
        "in the last %.0fs",
        settings.queue_name,
        settings.worker_max_jobs,
        settings.refresh_tick_s,
        settings.hot_window_s,
    )


async def _shutdown(ctx: dict[str, Any]) -> None:
    deps: WorkerDeps | None = ctx.get("deps")
    if deps is None:
        return
    if ctx.get("http") is not None:
        await ctx["http"].cleanup()
    ctx["flush"].cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ctx["flush"]
    await deps.session.close()
    await close_redis(deps.redis)


def worker_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments of ``arq.Worker`` for these settings."""
    # A refresh waits at most one upstream timeout for a provider slot, then makes one call.
    # arq re-runs a job whose worker died once this plus 10 s has passed.
    job_timeout_s = settings.upstream_timeout_s * 2 + 2
    tick = settings.refresh_tick_s
    return {
        "functions": [
            func(
                refresh_container,
                name=REFRESH_JOB,
                keep_result=0,
                max_tries=settings.refresh_max_tries + 1,
                timeout=job_timeout_s,
            )
        ],
        "cron_jobs": [
            cron(
                refresh_ahead,
                name=REFRESH_AHEAD_JOB,
                second=set(range(0, 60, tick)),
                microsecond=0,
                unique=True,
                run_at_startup=True,
                keep_result=0,
                timeout=max(tick * 3, 5),
            )
        ],
        "redis_settings": queue_redis_settings(settings),
        "queue_name": settings.queue_name,
        "max_jobs": settings.worker_max_jobs,
        "job_timeout": job_timeout_s,
        "keep_result": 0,
        "poll_delay": 0.05,
        "job_completion_wait": int(settings.shutdown_timeout_s),
        "health_check_interval": 10,
        "on_startup": _startup,
        "on_shutdown": _shutdown,
        "ctx": {"settings": settings},
    }
