"""The refresh queue: its one job (a batch of claimed renewals), how to enqueue it, the backlog.

Every refresh is a renewal in the due set (``store.py``): whoever plans it claims the container's
entry there first (refresh-ahead a tick's worth, a stale read its own container), then queues one
``refresh_batch`` job. The claim is the one guard against a refresh running twice, and a lease:
the running batch renews it, and a claim whose batch died lapses within seconds, when
refresh-ahead plans the container again. The queue holds refresh jobs only: its backlog counts
them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.exceptions import RedisError

from sidecar import tracing
from sidecar.connections import close_redis, parse_sentinel_url
from sidecar.errors import StoreUnavailable
from sidecar.logs import Outage
from sidecar.metrics import Metrics
from sidecar.settings import Settings, SettingsError
from sidecar.store import CacheStore, now_ms

__all__ = [
    "POLL_S",
    "REFRESH_BATCH_JOB",
    "ArqRefresher",
    "Batch",
    "Renewal",
    "claim_ms",
    "enqueue_batch",
    "queue_redis_settings",
    "refresh_backlog",
    "refresh_stale",
]

log = logging.getLogger(__name__)

REFRESH_BATCH_JOB = "refresh_batch"
#: How often a worker polls the queue (arq's ``poll_delay``); a batch is enqueued this much early.
POLL_S = 0.05

#: One renewal: ``(provider, container_id, due_ms)``, due when the record read goes stale; plain
#: data for arq's pickle.
Renewal = tuple[str, str, int]


class Batch(NamedTuple):
    """One ``refresh_batch`` job: renewals each made ``lead_ms`` before it goes stale (the first
    at ``start_ms``, unix ms), their claims held until ``held_until_ms``."""

    start_ms: int
    lead_ms: int
    renewals: list[Renewal]
    held_until_ms: int


def claim_ms(settings: Settings) -> int:
    """How long a claim holds: two seconds past refresh-ahead's planning horizon (a tick and a
    lead), so a batch starts, and renews its claims every second, before they lapse."""
    return int((settings.refresh_tick_s + settings.refresh_lead_s + 2) * 1000)


def queue_redis_settings(settings: Settings) -> RedisSettings:
    """arq's connection settings: ``SIDECAR_QUEUE_REDIS_URL``, else the cache's Redis
    (``redis+sentinel://host1:26379,host2:26379/<master name>/<db>`` selects Sentinel)."""
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


async def enqueue_batch(
    pool: ArqRedis, settings: Settings, batch: Batch, carrier: Mapping[str, str] | None = None
) -> None:
    """Queue one ``refresh_batch`` job, ``carrier`` the asking request's trace context; a job
    not started before its claims lapse is dropped (its renewals are planned again by then)."""
    # Workers poll every POLL_S: the job starts that much early, its renewals on time.
    delay_s = max(0.0, batch.start_ms / 1000 - time.time() - POLL_S)
    traced: dict[str, Any] = {"carrier": dict(carrier)} if carrier else {}
    await pool.enqueue_job(
        REFRESH_BATCH_JOB,
        batch.renewals,
        batch.lead_ms,
        batch.held_until_ms,
        **traced,
        _job_id=f"refresh:{secrets.token_hex(8)}",
        _queue_name=settings.queue_name,
        _defer_by=delay_s or None,
        _expires=max(1.0, batch.held_until_ms / 1000 - time.time()),
    )


async def refresh_stale(
    store: CacheStore,
    settings: Settings,
    metrics: Metrics,
    enqueue: Callable[[Batch, Mapping[str, str] | None], Awaitable[bool]],
    renewal: Renewal,
) -> None:
    """A stale read's refresh: claim its due entry, then queue a batch of one linked to the
    request's trace (a claim held by another refresh, or a fresh entry, is a duplicate)."""
    provider, container_id, due_ms = renewal
    now = now_ms()
    until = now + claim_ms(settings)
    try:
        claimed = await store.claim_refresh(provider, container_id, due_ms, until)
    except StoreUnavailable:
        return
    if not claimed:
        metrics.refresh_jobs.labels("deduplicated").inc()
    elif await enqueue(Batch(now, 0, [renewal], until), tracing.current_carrier()):
        metrics.refresh_jobs.labels("enqueued").inc()


async def refresh_backlog(pool: ArqRedis, settings: Settings) -> int:
    """Refresh jobs due now and not finished (queued or running; deferred ones not counted)."""
    return int(await pool.zcount(settings.queue_name, "-inf", time.time_ns() // 1_000_000))


class ArqRefresher:
    """Queues refresh batches for the workers, connecting on first use; an unreachable queue
    costs only the refresh (stale entries are served, then revalidated), tried every 5 s."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._pool: ArqRedis | None = None
        self._retry_at = 0.0
        self._connecting = asyncio.Lock()
        self._outage = Outage(log, "refresh queue", "stale entries are served, then revalidated")

    async def close(self) -> None:
        """Close the queue connection."""
        if self._pool is not None:
            await close_redis(self._pool)

    async def backlog(self) -> int | None:
        """Refresh jobs due and not finished (None while the queue cannot be reached)."""
        pool = await self._queue()
        try:
            return await refresh_backlog(pool, self._settings) if pool is not None else None
        except (OSError, RedisError):
            return None

    async def _queue(self) -> ArqRedis | None:
        async with self._connecting:
            if self._pool is None and time.monotonic() >= self._retry_at:
                try:
                    self._pool = await create_pool(
                        queue_redis_settings(self._settings),
                        default_queue_name=self._settings.queue_name,
                    )
                except (OSError, RedisError) as exc:
                    self._retry_at = time.monotonic() + 5.0
                    self._outage.failed(exc)
                else:
                    self._outage.recovered()
        return self._pool

    async def enqueue(self, batch: Batch, carrier: Mapping[str, str] | None = None) -> bool:
        """Queue a batch; False when the queue cannot be reached (its claims lapse)."""
        if (pool := await self._queue()) is None:
            return False
        try:
            await enqueue_batch(pool, self._settings, batch, carrier)
        except (OSError, RedisError) as exc:
            self._outage.failed(exc)
            return False
        self._outage.recovered()
        return True

    async def refresh_stale(self, store: CacheStore, renewal: Renewal) -> None:
        """Claim a stale read's renewal and queue it (:func:`refresh_stale`)."""
        await refresh_stale(store, self._settings, self._metrics, self.enqueue, renewal)
