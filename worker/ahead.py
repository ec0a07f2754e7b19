"""Refresh-ahead: renew the entries callers read before they go stale, in batches.

Every ``SIDECAR_REFRESH_TICK_S`` (on the wall clock's tick boundaries) one process takes the tick
(``SET NX`` on the queue's Redis) and plans the entries read within the hot window whose
freshness ends before the next tick: each claimed in the due set (no other plan or stale read
takes it), grouped into batch jobs by when it should be renewed. A renewal whose batch was lost
is planned again once its claim lapses. A renewal starts as late as the recent call times allow
(``RefreshRunner.lead_ms``): each early call shortens the container's refresh interval. Quiet:
nothing is logged unless something goes wrong.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sidecar.errors import StoreUnavailable
from sidecar.keys import member
from sidecar.queue import Batch, claim_ms
from sidecar.store import REDIS_ERRORS, now_ms
from worker.refresh import RefreshRunner

__all__ = ["plan", "run_refresh_ahead"]

log = logging.getLogger(__name__)

BATCH_SIZE = 100  # renewals per batch job, at most
BATCH_SPAN_MS = 250  # how far apart the start times in one batch may be


async def plan(runner: RefreshRunner) -> tuple[list[Batch], int]:
    """This tick's renewals, claimed and in batches, and how many entries another refresh held.

    Each renewal starts from its own entry's freshness less the lead, so calls spread out as the
    entries' freshness does instead of bunching at tick boundaries.
    """
    settings, store = runner.settings, runner.store
    now = now_ms()
    lead_ms = runner.lead_ms()
    horizon_ms = now + settings.refresh_tick_s * 1000 + int(settings.refresh_lead_s * 1000)
    try:
        due = await store.due_for_refresh(horizon_ms, now - int(settings.hot_window_s * 1000))
        # Rate limited providers are renewed once the back-off is over (stale meanwhile).
        throttled = {p for p in {p for p, _, _ in due} if await runner.throttle.active(p)}
        wanted = [(p, c, d) for p, c, d in due if p not in throttled]
        names = [(member(p, c), d) for p, c, d in wanted]
        until = now + claim_ms(settings)
        claimed = set(await store.claim_due(names, until) if names else ())
    except StoreUnavailable:
        return [], 0
    starts = sorted(
        (max(now, due_ms - lead_ms), (provider, container_id, due_ms))
        for provider, container_id, due_ms in wanted
        if member(provider, container_id) in claimed
    )
    batches: list[Batch] = []
    for start, renewal in starts:
        last = batches[-1] if batches else None
        if (
            last is None
            or len(last.renewals) >= BATCH_SIZE
            or start - last.start_ms > BATCH_SPAN_MS
        ):
            batches.append(Batch(start, lead_ms, [], until))
        batches[-1].renewals.append(renewal)
    return batches, len(wanted) - len(claimed)


async def run_refresh_ahead(
    runner: RefreshRunner, queue: Any, enqueue: Callable[[Batch], Awaitable[object]]
) -> None:
    """Plan at every tick this process takes on ``queue`` (the queue's Redis) and hand each
    batch to ``enqueue`` (cancel to stop)."""
    tick_s = runner.settings.refresh_tick_s
    jobs = runner.metrics.refresh_jobs
    tick = int(time.time() // tick_s)  # the current one first: a worker starting up plans
    while True:
        try:
            key = f"{runner.settings.queue_name}:refresh-ahead:{tick}"
            if await queue.set(key, os.getpid(), nx=True, px=tick_s * 2000):  # else: another's
                batches, held = await plan(runner)
                jobs.labels("deduplicated").inc(held)
                await asyncio.gather(*(enqueue(batch) for batch in batches))
                jobs.labels("enqueued").inc(sum(len(batch.renewals) for batch in batches))
        except REDIS_ERRORS as exc:
            # The queue is unreachable: the worker's poll loop says so; the claims lapse.
            log.debug("refresh-ahead skipped a tick: %s: %s", type(exc).__name__, exc)
        tick = max(tick + 1, int(time.time() // tick_s) + 1)
        await asyncio.sleep(max(0.0, tick * tick_s - time.time()) + random.uniform(0, 0.02))
