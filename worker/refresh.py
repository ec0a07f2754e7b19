"""What a refresh does: one upstream call with the service credential, and the record rewritten.

Every refresh is a renewal in a batch (``refresh_batch``), which renews its due-set claims while
it runs: a batch lost with its worker stops, and its claims lapse within seconds. A failure or a
back-off gives the claim back for when it ends. A container the service credential cannot see
(401, 403, 404: another project's) is never deleted: it is handed over to its callers
(``inline_refresh``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any

import aiohttp
import msgspec

from sidecar import tracing
from sidecar.errors import StoreUnavailable, UpstreamFailure
from sidecar.keys import KeySpace, member
from sidecar.logs import Every
from sidecar.metrics import Metrics
from sidecar.policy import Policy
from sidecar.queue import REFRESH_BATCH_JOB, Renewal, claim_ms
from sidecar.records import Record, decode_record
from sidecar.settings import Settings
from sidecar.stats import FleetStats
from sidecar.store import Breaker, CacheStore, Failure, now_ms
from sidecar.throttle import Throttle
from sidecar.upstream import Upstream, UpstreamReply
from worker.limits import ProviderLimiter
from worker.writes import WriteBehind

__all__ = ["RefreshRunner"]

log = logging.getLogger(__name__)

#: The ``sidecar_refresh_jobs_total`` event of each result word; any other word (lapsed,
#: terminal, inline, handed-over, already-fresh, throttled...) is "skipped": nothing needed
#: doing, or someone else does it.
_EVENTS = {"refreshed": "succeeded", "failed": "failed", "refused": "failed",
           "store-unavailable": "failed", "deduplicated": "deduplicated",
           "retried": "retried"}  # fmt: skip
# Results whose claim is given back for later rather than left to lapse.
_RESCHEDULED = ("retried", "throttled", "store-unavailable")
# A renewal starts twice the recent p95 call time before its entry goes stale (once enough calls
# were timed), at least this long before, at most SIDECAR_REFRESH_LEAD_S.
_MIN_LEAD_MS = 50
_TIMED_CALLS = 256
# Renewals due this close together form one wave (records read together just before the calls).
_WAVE_MS = 20


class BatchRun:
    """A running batch: its results so far, and the due-set claims it holds (``member ->
    expiry``), renewed every second; a renewal whose claim lapsed meanwhile (another refresh may
    hold it now) is not made."""

    def __init__(
        self, store: CacheStore, renewals: Sequence[Renewal], until_ms: int, lease_ms: int
    ) -> None:
        self._store = store
        self._lease_ms = lease_ms
        self._until = {member(p, c): until_ms for p, c, _ in renewals}
        self.results: Counter[str] = Counter()

    async def keep(self, renewals: Sequence[Renewal]) -> list[Renewal]:
        """Renew these renewals' claims; the renewals still held. Raises StoreUnavailable."""
        held = await self._renew([member(p, c) for p, c, _ in renewals])
        return [renewal for renewal in renewals if member(*renewal[:2]) in held]

    def release(self, renewal: Renewal) -> None:
        """Stop renewing a claim (its renewal is over: the save or the reschedule rescored it)."""
        self._until.pop(member(*renewal[:2]), None)

    async def hold(self) -> None:
        """Renew every claim still held, every second (cancel to stop)."""
        while True:
            await asyncio.sleep(1.0)
            # Renewed next time, or lapsed: then refresh-ahead plans them again.
            with contextlib.suppress(StoreUnavailable):
                await self._renew(list(self._until))

    async def _renew(self, names: list[str]) -> set[str]:
        entries = [(name, self._until[name]) for name in names if name in self._until]
        if not entries:
            return set()
        until = now_ms() + self._lease_ms
        held = set(await self._store.claim_due(entries, until))
        for name, _ in entries:
            if name in held:
                self._until[name] = until
            else:
                self._until.pop(name, None)
        return held


class RefreshRunner:
    """Refreshes containers on the cache's Redis; each refresh ends with a result word, counted
    in ``sidecar_refresh_jobs_total`` and summed up in the job's log line."""

    def __init__(
        self,
        settings: Settings,
        redis: Any,
        session: aiohttp.ClientSession,
        metrics: Metrics,
        stats: FleetStats | None = None,
    ) -> None:
        keys = KeySpace(settings.key_prefix)
        self.settings = settings
        self.metrics = metrics
        self.store = CacheStore(
            redis, keys, Breaker(settings.redis_retry_after_s, on_failure=metrics.redis_errors.inc)
        )
        self.stats = stats or FleetStats(self.store)  # a sidecar's own, in the embedded default
        self.throttle = Throttle(
            self.store, settings.retry_after_default_s, settings.retry_after_max_s
        )
        self._policy = Policy(settings)
        self._writes = WriteBehind(self.store, self._policy)
        self._upstream = Upstream(session, settings, metrics, caller="worker", stats=self.stats)
        self._limiter = ProviderLimiter(
            redis,
            keys,
            settings.provider_concurrency,
            call_s=settings.upstream_timeout_s,
            local_limit=settings.upstream_max_connections,
        )
        self._call_s: deque[float] = deque(maxlen=_TIMED_CALLS)
        self._refused = Every(60.0)  # an operator's problem: said once a minute per provider

    def lead_ms(self) -> int:
        """How long before an entry goes stale to renew it: twice the p95 of the recent calls'
        time (an earlier call is a more frequent one), at most ``SIDECAR_REFRESH_LEAD_S``."""
        max_lead_ms = int(self.settings.refresh_lead_s * 1000)
        if len(self._call_s) < _TIMED_CALLS // 8:
            return max_lead_ms
        timed = sorted(self._call_s)
        p95_ms = timed[int(len(timed) * 0.95)] * 1000
        return min(max_lead_ms, max(_MIN_LEAD_MS, int(2 * p95_ms)))

    async def refresh_batch(
        self,
        renewals: Sequence[Renewal],
        lead_ms: int,
        held_until_ms: int,
        carrier: Mapping[str, str] | None = None,
    ) -> Counter[str]:
        """Renew claimed containers, each ``lead_ms`` before it goes stale, in a span linked to
        the request that asked (``carrier``); a count per result word."""
        attributes: dict[str, Any] = {"bifrost.renewals": len(renewals)}
        if len(renewals) == 1:
            provider, container_id, _ = renewals[0]
            attributes |= {"bifrost.provider": provider, "bifrost.container_id": container_id}
        with tracing.job_span(REFRESH_BATCH_JOB, carrier, attributes):
            results = await self._run(renewals, lead_ms, held_until_ms)
        for result, times in results.items():
            self.metrics.refresh_jobs.labels(_EVENTS.get(result, "skipped")).inc(times)
        return results

    async def _run(
        self, renewals: Sequence[Renewal], lead_ms: int, held_until_ms: int
    ) -> Counter[str]:
        """Wave by wave (the renewals due together): claims renewed and records read just
        before the calls (a caller's refresh meanwhile is seen), the calls concurrent."""
        batch = BatchRun(self.store, renewals, held_until_ms, claim_ms(self.settings))
        holding = asyncio.ensure_future(batch.hold())
        calls: list[asyncio.Future[None]] = []
        try:
            for wave in _waves(renewals):
                wait_ms = wave[0][2] - lead_ms - now_ms()
                if wait_ms > 5:
                    await asyncio.sleep(wait_ms / 1000)
                calls += map(asyncio.ensure_future, await self._wave(wave, batch))
            await asyncio.gather(*calls)
        finally:
            holding.cancel()
            for call in calls:  # cancelled (the job timed out): so are its calls
                call.cancel()
        return batch.results

    async def _wave(self, wave: list[Renewal], batch: BatchRun) -> list[Awaitable[None]]:
        """Renew a wave's claims and read its records; the calls (and reschedules) to make."""
        try:
            held = await batch.keep(wave)
            raws = await self.store.read_many([(p, c) for p, c, _ in held])
        except StoreUnavailable:
            # Redis is away for this worker (its breaker may stay open after a hang): the claims
            # lapse within a lease, and refresh-ahead plans the renewals again.
            for renewal in wave:
                batch.release(renewal)
            batch.results["store-unavailable"] += len(wave)
            return []
        batch.results["deduplicated"] += len(wave) - len(held)
        for provider in {p for p, _, _ in held}:  # once a wave, not once a renewal
            await self.throttle.active(provider)  # what ``throttle.left_ms`` knows, refreshed
        calls: list[Awaitable[None]] = []
        for renewal, (raw, failure) in zip(held, raws, strict=True):
            record = decode_record(raw) if raw is not None else None
            if raw is None or record is None:  # gone meanwhile: the claim lapses
                batch.release(renewal)
                batch.results["lapsed"] += 1
                continue
            skip, due = self._skip(renewal, record, failure)
            if skip is None:
                calls.append(self._renew(renewal, record, raw, failure is not None, batch))
            elif skip == "inline":  # its callers revalidate it: the claim lapses unrenewed
                batch.release(renewal)
                batch.results[skip] += 1
            else:
                calls.append(self._reschedule(renewal, due, batch, skip))
        return calls

    def _skip(
        self, renewal: Renewal, record: Record, failure: Failure | None
    ) -> tuple[str | None, int | None]:
        """Why no worker needs to renew this container (None: one does), and when its due
        entry is due again (None: never, it leaves the due set)."""
        provider, _, due_ms = renewal
        if self.settings.service_key_for(provider) is None:
            return "no-service-key", None
        if record.negative or record.terminal:
            return "terminal", None
        if record.inline_refresh:
            return "inline", None  # the service credential cannot see it
        if (fresh_until_ms := self._policy.fresh_until_ms(record)) > due_ms:
            return "already-fresh", fresh_until_ms  # a caller revalidated it meanwhile
        if failure is not None and failure.left_ms > 0:
            return "failing", failure.until_ms  # nobody calls it until its back-off ends
        if self.throttle.left_ms(provider) > 0:  # a 429 back-off: due again when it ends
            return "throttled", self._after_backoff(renewal)
        return None, None

    async def _renew(
        self, renewal: Renewal, record: Record, raw: bytes, failing: bool, batch: BatchRun
    ) -> None:
        provider, container_id, due_ms = renewal
        reply: UpstreamReply | None = None
        try:
            reply = await self._call(provider, container_id)
            status = reply.status
        except UpstreamFailure as exc:
            status = exc.status
        if reply is None or status >= 500:
            result, due = "retried", await self._failed(provider, container_id, status)
        else:
            try:
                result = await self._store_reply(reply, record, raw, failing)
            except StoreUnavailable:
                result = "store-unavailable"
            due = self._after_backoff(renewal) if result == "throttled" else due_ms
        if result in _RESCHEDULED:
            # Renewed once the back-off is over or Redis is back: the claim must not outlive this
            # refresh (WriteBehind retries the reschedule).
            await self._reschedule(renewal, due, batch, result)
        else:
            batch.release(renewal)
            batch.results[result] += 1

    async def _reschedule(
        self, renewal: Renewal, due_ms: int | None, batch: BatchRun, result: str
    ) -> None:
        provider, container_id, _ = renewal
        batch.release(renewal)
        written = await self._writes.reschedule(provider, container_id, due_ms)
        batch.results[result if written else "store-unavailable"] += 1

    def _after_backoff(self, renewal: Renewal) -> int:
        """When a renewal held back by its provider's 429 back-off is due again: at the end of
        it, so that stale reads meanwhile claim nothing and queue no job."""
        provider, _, due_ms = renewal
        return max(due_ms, now_ms() + self.throttle.left_ms(provider))

    async def _call(self, provider: str, container_id: str) -> UpstreamReply:
        key = self.settings.service_key_for(provider)
        assert key is not None
        started = time.perf_counter()
        async with self._limiter.slot(provider):
            reply = await self._upstream.retrieve(
                provider, container_id, (("authorization", f"Bearer {key.reveal()}"),)
            )
        self._call_s.append(time.perf_counter() - started)
        return reply

    async def _store_reply(
        self, reply: UpstreamReply, record: Record, raw: bytes, failing: bool
    ) -> str:
        """Store what the upstream answered (not a 5xx); the refresh's result word."""
        provider, container_id = record.provider, record.container_id
        if reply.status == 200:
            fresh = reply.record(provider, container_id, now_ms())
            return "refreshed" if await self._writes.save(fresh, failing) else "store-unavailable"
        if reply.status in (401, 403, 404):
            # Another project's container (or a credential refused for it): its callers keep it.
            inline = msgspec.structs.replace(record, inline_refresh=True)
            await self.store.leave_to_callers(raw, inline)
            if reply.status == 404:
                log.debug("%s/%s is not visible to the service credential: left to its "
                          "callers", provider, container_id)  # fmt: skip
                return "handed-over"
            if self._refused.due(provider) is not None:
                log.error("the service credential for %s was refused (HTTP %d): the containers "
                          "it is refused for are revalidated by their callers; check "
                          "SIDECAR_SERVICE_API_KEY", provider, reply.status)  # fmt: skip
            return "refused"
        if reply.status == 429:
            await self.throttle.obey(provider, reply.retry_after)
            return "throttled"
        log.warning("refresh of %s/%s: the upstream answered %d", provider, container_id,
                    reply.status)  # fmt: skip
        return "failed"

    async def _failed(self, provider: str, container_id: str, status: int) -> int:
        """Note an upstream failure for every process: nobody calls the upstream for this
        container until its back-off ends. When it ends (unix ms, jittered to spread retries)."""
        try:
            backoff_ms = await self.store.upstream_failed(
                provider, container_id, status, self._policy
            )
        except StoreUnavailable:
            backoff_ms = self._policy.backoff_ms(1)
        return now_ms() + int(backoff_ms * random.uniform(1.0, 1.1))

    async def close(self) -> None:
        """Finish the saves under way, then close the store."""
        await self._writes.close()
        await self.store.close()


def _waves(renewals: Sequence[Renewal]) -> list[list[Renewal]]:
    """Renewals by due time, in waves whose starts are at most ``_WAVE_MS`` apart."""
    waves: list[list[Renewal]] = []
    for renewal in sorted(renewals, key=lambda renewal: renewal[2]):
        if not waves or renewal[2] - waves[-1][0][2] > _WAVE_MS:
            waves.append([])
        waves[-1].append(renewal)
    return waves
