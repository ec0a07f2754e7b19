"""Refresh-ahead: renew the entries callers read before they go stale, in batches.

Every ``SIDECAR_REFRESH_TICK_S`` (on the wall clock's tick boundaries) one worker of the fleet
takes the tick (``SET NX`` on the queue's Redis) and plans: the entries read within the hot
window whose freshness ends before the next tick, each claimed in the due set (so no other plan
or stale read's refresh takes it), grouped by when each should be renewed into batch jobs. Any
worker runs the batches. A renewal whose batch was lost is planned again once its claim lapses.
It is quiet: nothing is logged unless something goes wrong.

A renewal starts as late as the upstream's recent call times allow (``RefreshRunner.lead_ms``,
at most ``SIDECAR_REFRESH_LEAD_S`` before the entry goes stale): each early call shortens the
container's refresh interval, and so adds calls.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from sidecar.errors import StoreUnavailable
from sidecar.keys import member
from sidecar.metrics import Metrics
from sidecar.queue import Batch, Renewal, claim_ms
from sidecar.settings import Settings
from sidecar.store import REDIS_ERRORS, CacheStore, now_ms
from sidecar.throttle import Throttle

__all__ = ["BATCH_SIZE", "RefreshPlanner", "run_refresh_ahead"]

log = logging.getLogger(__name__)

#: Renewals per batch job, and how far apart their start times may be.
BATCH_SIZE = 100
BATCH_SPAN_MS = 250


class RefreshPlanner:
    """Which read entries go stale before the next tick, and when to renew each."""

    def __init__(
        self,
        store: CacheStore,
        settings: Settings,
        throttle: Throttle,
        lead_ms: Callable[[], int] | None = None,
    ) -> None:
        self.store = store
        self._throttle = throttle
        self._lead = lead_ms
        self._tick_ms = settings.refresh_tick_s * 1000
        self._lead_ms = int(settings.refresh_lead_s * 1000)
        self._hot_ms = int(settings.hot_window_s * 1000)
        self.claim_ms = claim_ms(settings)

    async def plan(self) -> tuple[list[Batch], int]:
        """This tick's renewals, claimed and grouped in batches; and how many entries another
        refresh already held.

        Each renewal starts from its own entry's freshness (less the lead), so calls spread out
        as the entries' freshness does, instead of bunching at tick boundaries.
        """
        now = now_ms()
        lead_ms = self._lead() if self._lead is not None else self._lead_ms
        try:
            due = await self.store.due_for_refresh(
                now + self._tick_ms + self._lead_ms, now - self._hot_ms
            )
            throttled = {p for p in {p for p, _, _ in due} if await self._throttle.active(p)}
            # Rate limited providers are renewed once the back-off is over (stale meanwhile).
            wanted = [(p, c, d) for p, c, d in due if p not in throttled]
            names = [(member(p, c), d) for p, c, d in wanted]
            until = now + self.claim_ms
            claimed = set(await self.store.claim_due(names, until) if names else ())
        except StoreUnavailable:
            return [], 0
        starts = [
            (max(now, due_ms - lead_ms), (provider, container_id, due_ms))
            for provider, container_id, due_ms in wanted
            if member(provider, container_id) in claimed
        ]
        starts.sort()
        return batches(starts, lead_ms, until), len(wanted) - len(claimed)


def batches(starts: Sequence[tuple[int, Renewal]], lead_ms: int, until_ms: int) -> list[Batch]:
    """Renewals sorted by start time (claimed until ``until_ms``), cut into batches of at most
    ``BATCH_SIZE`` renewals starting within ``BATCH_SPAN_MS`` of each other."""
    out: list[Batch] = []
    for start, renewal in starts:
        if (
            not out
            or len(out[-1].renewals) >= BATCH_SIZE
            or start - out[-1].start_ms > BATCH_SPAN_MS
        ):
            out.append(Batch(start, lead_ms, [], until_ms))
        out[-1].renewals.append(renewal)
    return out


async def run_refresh_ahead(
    settings: Settings,
    planner: RefreshPlanner,
    metrics: Metrics,
    queue: Any,
    enqueue: Callable[[Batch], Awaitable[object]],
) -> None:
    """Plan at every tick this worker takes, and hand each batch to ``enqueue``; ``queue`` is
    the queue's Redis, where workers take ticks (cancel to stop)."""
    tick_s = settings.refresh_tick_s
    jobs = metrics.refresh_jobs
    tick = int(time.time() // tick_s)  # the current one first: a worker starting up plans
    while True:
        try:
            key = f"{settings.queue_name}:refresh-ahead:{tick}"
            if await queue.set(key, os.getpid(), nx=True, px=tick_s * 2000):  # else: another's
                plan, held = await planner.plan()
                jobs.labels("deduplicated").inc(held)
                await asyncio.gather(*(enqueue(batch) for batch in plan))
                jobs.labels("enqueued").inc(sum(len(batch.renewals) for batch in plan))
        except REDIS_ERRORS as exc:
            # The queue is unreachable: the worker's poll loop says so; the claims lapse.
            log.debug("refresh-ahead skipped a tick: %s: %s", type(exc).__name__, exc)
        tick = max(tick + 1, int(time.time() // tick_s) + 1)
        await asyncio.sleep(max(0.0, tick * tick_s - time.time()) + random.uniform(0, 0.02))
