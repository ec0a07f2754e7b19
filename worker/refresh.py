"""What a refresh does: one upstream call with the service credential, and the record rewritten.

Used by the arq jobs (``worker.main``) and by the embedded worker (``worker.embedded``).
"""

from __future__ import annotations

import logging
import random
import time

from sidecar.errors import StoreUnavailable, UpstreamFailure
from sidecar.policy import Policy
from sidecar.settings import Settings
from sidecar.store import CacheStore
from sidecar.throttle import Throttle
from sidecar.upstream import Upstream
from worker.limits import ProviderLimiter

__all__ = ["RefreshPlanner", "RefreshRunner", "RetryLater", "event_of"]

_EVENTS = {"refreshed": "succeeded", "deleted": "succeeded", "failed": "failed",
           "refused": "failed", "store-unavailable": "failed"}  # fmt: skip


def event_of(result: str) -> str:
    """The ``sidecar_refresh_jobs_total`` event of a refresh's result word."""
    return _EVENTS.get(result, "skipped")


log = logging.getLogger(__name__)


class RetryLater(Exception):
    """The upstream failed (5xx, timeout): try again after ``delay_s``."""

    def __init__(self, reason: str, delay_s: float) -> None:
        super().__init__(reason)
        self.delay_s = delay_s


def now_ms() -> int:
    """Wall-clock unix milliseconds."""
    return time.time_ns() // 1_000_000


class RefreshRunner:
    """Refreshes one container; returns what happened (a word for logs and metrics)."""

    def __init__(
        self, store: CacheStore, upstream: Upstream, limiter: ProviderLimiter, settings: Settings
    ) -> None:
        self.store = store
        self.upstream = upstream
        self.limiter = limiter
        self.policy = Policy(settings)
        self.throttle = Throttle(store, settings.retry_after_default_s)
        self._settings = settings

    async def refresh(self, provider: str, container_id: str, due_ms: int, attempt: int) -> str:
        """Refresh unless it is no longer needed; raises RetryLater on upstream failures."""
        key = self._settings.service_key_for(provider)
        if key is None:
            return "no-service-key"
        record = await self.store.read(provider, container_id)
        if record is None:
            return "lapsed"
        if record.negative or record.terminal:
            return "terminal"
        if self.policy.fresh_until_ms(record) > due_ms:
            return "already-fresh"
        if await self.throttle.active(provider):
            return "throttled"
        try:
            async with self.limiter.slot(provider):
                reply = await self.upstream.retrieve(
                    provider, container_id, (("authorization", f"Bearer {key.reveal()}"),)
                )
        except UpstreamFailure as exc:
            raise RetryLater(exc.message, self._backoff_s(attempt)) from exc
        if reply.status == 200:
            record = reply.record(provider, container_id, now_ms())
            await self.store.save(record, self.policy, index=False)
            return "refreshed"
        if reply.status == 404:
            await self.store.delete(provider, container_id)
            return "deleted"
        if reply.status == 429:
            await self.throttle.obey(provider, reply.retry_after)
            return "throttled"
        if reply.status >= 500:
            raise RetryLater(f"upstream answered {reply.status}", self._backoff_s(attempt))
        log.error(
            "the service credential for %s was refused (HTTP %d): background refresh cannot "
            "work until SIDECAR_SERVICE_API_KEY is fixed",
            provider,
            reply.status,
        )
        return "refused"

    def _backoff_s(self, attempt: int) -> float:
        """Exponential back-off with full jitter: 0.5 s, 1 s, 2 s ... capped at 30 s."""
        return random.uniform(0.5, 1.0) * min(30.0, 0.5 * 2.0 ** (attempt - 1))


class RefreshPlanner:
    """Refresh-ahead: which read entries go stale before the next tick, and when to renew each."""

    def __init__(self, store: CacheStore, settings: Settings, throttle: Throttle) -> None:
        self.store = store
        self._throttle = throttle
        self._tick_ms = settings.refresh_tick_s * 1000
        self._lead_ms = int(settings.refresh_lead_s * 1000)
        self._hot_ms = int(settings.hot_window_s * 1000)

    async def plan(self) -> list[tuple[str, str, int, float]]:
        """``(provider, container_id, due_ms, delay_s)`` for each entry to renew this tick.

        Each renewal is timed from its own entry's freshness (less the lead and a jitter of up
        to half the lead), so calls spread out instead of bunching at tick boundaries.
        """
        now = now_ms()
        try:
            due = await self.store.due_for_refresh(
                now + self._tick_ms + self._lead_ms, now - self._hot_ms
            )
        except StoreUnavailable:
            return []
        plan = []
        for provider, container_id, due_ms in due:
            if await self._throttle.active(provider):
                continue  # rate limited: renewed once the back-off is over (stale meanwhile)
            start_ms = due_ms - self._lead_ms - random.uniform(0, self._lead_ms / 2)
            plan.append((provider, container_id, due_ms, max(0.0, (start_ms - now) / 1000)))
        return plan
