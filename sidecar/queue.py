"""The refresh queue: job names (defined once), how to enqueue, and the backlog.

The sidecar only enqueues; the workers (``worker/``) run the jobs. A stale read asks for a job
of its container's own (at most one at a time: arq ``_job_id``, results not kept; each process
sends at most one enqueue per container per second), so a thousand stale reads make one job.
Refresh-ahead (in the workers) renews many containers with one batch job. The queue holds
refresh jobs only, so its backlog is a count of them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.exceptions import RedisError

from sidecar import tracing
from sidecar.connections import close_redis, parse_sentinel_url
from sidecar.metrics import Metrics
from sidecar.settings import Settings, SettingsError

__all__ = [
    "BATCH_JOB_PREFIX",
    "POLL_S",
    "REFRESH_BATCH_JOB",
    "REFRESH_JOB",
    "ArqRefresher",
    "Renewal",
    "create_queue_pool",
    "enqueue_refresh_batch",
    "enqueue_refresh_job",
    "queue_redis_settings",
    "refresh_backlog",
    "refresh_job_id",
]

log = logging.getLogger(__name__)

REFRESH_JOB = "refresh_container"
REFRESH_BATCH_JOB = "refresh_batch"
_ENQUEUE_DEDUP_S = 1.0
#: How often a worker polls the queue (arq's ``poll_delay``); a batch is enqueued this much early.
POLL_S = 0.05
#: The job id prefix of batch jobs (workers recognise them by it).
BATCH_JOB_PREFIX = "refresh-batch:"

#: One renewal of a batch: ``(provider, container_id, due_ms)``, plain data for arq's pickle.
Renewal = tuple[str, str, int]


def refresh_job_id(provider: str, container_id: str) -> str:
    """The one job id a container's refresh has while it is queued or running."""
    return f"refresh:{provider}:{container_id}"


def queue_redis_settings(settings: Settings) -> RedisSettings:
    """arq's connection settings: ``SIDECAR_QUEUE_REDIS_URL``, else the cache's Redis.

    ``redis+sentinel://host1:26379,host2:26379/<master name>/<db>`` selects Sentinel.
    """
    url = settings.queue_redis_url or settings.redis_url
    if not url:
        raise SettingsError("SIDECAR_QUEUE_REDIS_URL: a queue needs a Redis (none configured)")
    if settings.redis_cluster and not settings.queue_redis_url:
        raise SettingsError(
            "SIDECAR_QUEUE_REDIS_URL: required with SIDECAR_REDIS_CLUSTER (arq cannot run on a "
            "cluster): point it at a plain or Sentinel-managed Redis"
        )
    common: dict[str, Any] = {"conn_timeout": 2, "conn_retries": 3, "conn_retry_delay": 1}
    if not url.startswith("redis+sentinel://"):
        return dataclasses.replace(RedisSettings.from_dsn(url), **common)
    target = parse_sentinel_url(url)
    return RedisSettings(
        host=target.sentinels,  # arq takes a list of sentinels here
        sentinel=True,
        sentinel_master=target.master,
        database=target.db,
        password=target.password,
        **common,
    )


async def enqueue_refresh_job(
    pool: ArqRedis,
    settings: Settings,
    provider: str,
    container_id: str,
    due_ms: int,
    delay_s: float = 0.0,
    job_try: int | None = None,
    carrier: Mapping[str, str] | None = None,
) -> bool:
    """Queue a container's refresh unless one is queued or running; True when queued.

    ``job_try`` above 1 hands the job a renewal a batch started (and claimed) but could not
    finish: it retries without claiming again. ``carrier`` is the trace context of the request
    that asked (the job's trace links to it).
    """
    traced: dict[str, Any] = {"carrier": dict(carrier)} if carrier else {}
    job = await pool.enqueue_job(
        REFRESH_JOB,
        provider,
        container_id,
        due_ms,
        **traced,
        _job_id=refresh_job_id(provider, container_id),
        _queue_name=settings.queue_name,
        _defer_by=delay_s or None,
        # A refresh nobody ran in time is no longer worth running: stale reads enqueue anew.
        _expires=delay_s + max(settings.max_stale_s, 30.0),
        _job_try=job_try,
    )
    return job is not None


async def enqueue_refresh_batch(
    pool: ArqRedis,
    settings: Settings,
    renewals: Sequence[Renewal],
    start_ms: int,
    lead_ms: int,
    *,
    expires_s: float,
) -> None:
    """Queue one job renewing ``renewals`` (each ``lead_ms`` before it goes stale, the first at
    ``start_ms``, unix ms), dropped if not started within ``expires_s`` (refresh-ahead plans
    the renewals again by then)."""
    # Workers poll the queue every 50 ms: the job starts that much early, its renewals on time.
    delay_s = max(0.0, start_ms / 1000 - time.time() - POLL_S)
    await pool.enqueue_job(
        REFRESH_BATCH_JOB,
        list(renewals),
        lead_ms,
        _job_id=f"{BATCH_JOB_PREFIX}{secrets.token_hex(8)}",
        _queue_name=settings.queue_name,
        _defer_by=delay_s or None,
        _expires=delay_s + expires_s,
    )


async def refresh_backlog(pool: ArqRedis, settings: Settings) -> int:
    """Refresh jobs due now and not finished (queued or running; deferred ones not counted)."""
    return int(await pool.zcount(settings.queue_name, "-inf", time.time_ns() // 1_000_000))


async def create_queue_pool(settings: Settings) -> ArqRedis:
    """A connection pool to the queue's Redis."""
    return await create_pool(queue_redis_settings(settings), default_queue_name=settings.queue_name)


class ArqRefresher:
    """Enqueues refresh jobs for the workers; connects to the queue on first use.

    A queue that cannot be reached costs nothing but the refresh: stale entries keep being
    served (and revalidated once they leave the stale window), and the outage is logged once.
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._jobs = metrics.refresh_jobs
        self._pool: ArqRedis | None = None
        self._retry_at = 0.0
        self._connecting = asyncio.Lock()
        self._recent: dict[tuple[str, str], float] = {}

    async def close(self) -> None:
        """Close the queue connection."""
        if self._pool is not None:
            await close_redis(self._pool)

    async def backlog(self) -> int | None:
        """Refresh jobs due and not finished (None while the queue cannot be reached)."""
        pool = await self._queue()
        if pool is None:
            return None
        try:
            return await refresh_backlog(pool, self._settings)
        except (OSError, RedisError):
            return None

    async def _queue(self) -> ArqRedis | None:
        if self._pool is not None or time.monotonic() < self._retry_at:
            return self._pool
        async with self._connecting:
            if self._pool is None and time.monotonic() >= self._retry_at:
                try:
                    self._pool = await create_queue_pool(self._settings)
                except (OSError, RedisError) as exc:
                    self._retry_at = time.monotonic() + 5.0
                    log.warning("refresh queue unreachable (%s); retrying in 5s", exc)
        return self._pool

    async def enqueue_refresh(self, provider: str, container_id: str, due_ms: int) -> None:
        """Ask a worker to refresh a container whose freshness ends at ``due_ms``."""
        now = time.monotonic()
        key = (provider, container_id)
        if self._recent.get(key, 0.0) > now:
            self._jobs.labels("deduplicated").inc()
            return
        if len(self._recent) > 10_000:
            self._recent = {k: v for k, v in self._recent.items() if v > now}
        self._recent[key] = now + _ENQUEUE_DEDUP_S
        pool = await self._queue()
        if pool is None:
            return
        try:
            queued = await enqueue_refresh_job(
                pool, self._settings, provider, container_id, due_ms,
                carrier=tracing.current_carrier(),
            )  # fmt: skip
        except (OSError, RedisError) as exc:
            log.debug("enqueue of %s/%s failed: %s", provider, container_id, exc)
            return
        self._jobs.labels("enqueued" if queued else "deduplicated").inc()
