"""What a refresh does: one upstream call with the service credential, and the record rewritten.

A stale read's job refreshes one container (:meth:`RefreshRunner.refresh`); refresh-ahead renews
many with one job (:meth:`RefreshRunner.refresh_batch`): one pipeline reads their records, the
calls run concurrently under the provider cap, and the answers are saved in pipelines as they
come in (``worker.writes``). Used by the arq jobs (``worker.main``) and the embedded worker.

A refresh claims its container's entry in the due set first (refresh-ahead claims a whole plan
at once), so a stale read's job and a refresh-ahead batch never call the upstream for the same
container together; the save of the refreshed record gives the entry back.

A container the service credential cannot see (401, 403, 404: another project's) is never
deleted: its callers may still see it. The record is handed over to them (``inline_refresh``,
same freshness and expiry), and the workers leave it alone from then on.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field

import msgspec

from sidecar.errors import StoreUnavailable, UpstreamFailure
from sidecar.policy import Policy
from sidecar.queue import Renewal
from sidecar.records import Record, decode_record
from sidecar.settings import Settings
from sidecar.store import CacheStore, Failure, now_ms
from sidecar.throttle import Throttle
from sidecar.upstream import Upstream, UpstreamReply
from worker.limits import ProviderLimiter
from worker.writes import WriteBehind

__all__ = [
    "BatchOutcome",
    "RefreshRunner",
    "RetryLater",
    "event_of",
]

log = logging.getLogger(__name__)

#: The ``sidecar_refresh_jobs_total`` events the workers count, and no others.
_EVENTS = {"refreshed": "succeeded", "failed": "failed", "refused": "failed",
           "store-unavailable": "failed", "deduplicated": "deduplicated"}  # fmt: skip
# Whatever else a refresh ends with (lapsed, terminal, inline, handed-over, already-fresh,
# throttled, no-service-key) is "skipped": nothing needed doing, or someone else does it.

# A refused service credential is an operator's problem: said at most this often per provider.
_REFUSED_LOG_EVERY_S = 60.0
# Refresh-ahead renews an entry twice the upstream's recent p95 call time before it goes stale
# (once enough calls were timed), at least this long before, at most SIDECAR_REFRESH_LEAD_S.
_MIN_LEAD_MS = 50
_TIMED_CALLS = 256
# A batch reads its records in waves, each just before its calls: renewals due this close
# together go in one wave.
_WAVE_MS = 20


def event_of(result: str) -> str:
    """The ``sidecar_refresh_jobs_total`` event of a refresh's result word."""
    return _EVENTS.get(result, "skipped")


class RetryLater(Exception):
    """The upstream failed (5xx, timeout): try again after ``delay_s``."""

    def __init__(self, reason: str, delay_s: float) -> None:
        super().__init__(reason)
        self.delay_s = delay_s


@dataclass
class BatchOutcome:
    """What a batch did: a count per result word, and the renewals to retry (with a delay)."""

    results: Counter[str] = field(default_factory=Counter)
    retry: list[tuple[Renewal, float]] = field(default_factory=list)

    def summary(self) -> str:
        """``"118 refreshed, 2 already-fresh"`` (for the job's log line)."""
        words = [f"{n} {word}" for word, n in sorted(self.results.items())]
        if self.retry:
            words.append(f"{len(self.retry)} to retry")
        return ", ".join(words) or "nothing"


class RefreshRunner:
    """Refreshes containers; each refresh ends with a word (for logs and metrics)."""

    def __init__(
        self, store: CacheStore, upstream: Upstream, limiter: ProviderLimiter, settings: Settings
    ) -> None:
        self.store = store
        self.upstream = upstream
        self.limiter = limiter
        self.policy = Policy(settings)
        self.throttle = Throttle(store, settings.retry_after_default_s, settings.retry_after_max_s)
        self.writes = WriteBehind(store, self.policy)
        self._settings = settings
        self._max_lead_ms = int(settings.refresh_lead_s * 1000)
        self._call_s: deque[float] = deque(maxlen=_TIMED_CALLS)
        self.claim_ms = claim_ms(settings)
        self._refused_logged: dict[str, float] = {}
        self._throttled: dict[str, bool] = {}
        self._checking: set[str] = set()

    async def refresh(self, provider: str, container_id: str, due_ms: int, attempt: int) -> str:
        """Refresh a container (a stale read's job) unless it is no longer needed or another
        refresh holds it; raises RetryLater on upstream failures. Attempts after the first own
        the claim the first took (or a batch handed over)."""
        if self._settings.service_key_for(provider) is None:
            return "no-service-key"
        raw, failure = (await self.store.read_many([(provider, container_id)]))[0]
        record = decode_record(raw) if raw is not None else None
        if raw is None or record is None:
            return "lapsed"
        skip = self._skip(record, due_ms, failure)
        if skip is not None:
            return skip
        if await self._backing_off(provider):
            return "throttled"
        natural_due = self.policy.due_ms(record)
        if attempt == 1 and natural_due is not None:
            until = max(now_ms(), natural_due) + self.claim_ms
            if not await self.store.claim_refresh(provider, container_id, natural_due, until):
                return "deduplicated"
        try:
            reply = await self._call(provider, container_id)
        except UpstreamFailure as exc:
            delay_s = await self._failed(provider, container_id, exc.status)
            raise RetryLater(exc.message, delay_s) from exc
        if reply.status >= 500:
            delay_s = await self._failed(provider, container_id, reply.status)
            raise RetryLater(f"upstream answered {reply.status}", delay_s)
        result = await self._absorb(reply, record, raw, failure is not None)
        if result in ("throttled", "store-unavailable"):
            # Renewed by refresh-ahead once the back-off is over, or by the next stale read once
            # Redis is back: the claim must not outlive this refresh (WriteBehind retries it).
            await self.writes.give_back(provider, container_id, due_ms)
        return result

    def lead_ms(self) -> int:
        """How long before an entry goes stale refresh-ahead should renew it: long enough for
        the call to be over by then (twice the p95 of the recent calls' time), no longer (an
        earlier call is a more frequent one), and at most ``SIDECAR_REFRESH_LEAD_S``."""
        if len(self._call_s) < _TIMED_CALLS // 8:
            return self._max_lead_ms
        timed = sorted(self._call_s)
        p95_ms = timed[int(len(timed) * 0.95)] * 1000
        return min(self._max_lead_ms, max(_MIN_LEAD_MS, int(2 * p95_ms)))

    async def refresh_batch(
        self, renewals: Sequence[Renewal], lead_ms: int | None = None
    ) -> BatchOutcome:
        """Renew containers refresh-ahead planned (and claimed), each ``lead_ms`` before it
        goes stale: in waves of those due together, each wave one read of its records just
        before its calls (a caller's refresh meanwhile is seen), the calls concurrent, the saves
        in pipelines. Upstream failures come back to retry."""
        lead_ms = self._max_lead_ms if lead_ms is None else lead_ms
        outcome = BatchOutcome()
        calls: list[asyncio.Future[None]] = []
        try:
            for wave in _waves(renewals):
                wait_ms = wave[0][2] - lead_ms - now_ms()
                if wait_ms > 5:
                    await asyncio.sleep(wait_ms / 1000)
                calls += [asyncio.ensure_future(call) for call in await self._wave(wave, outcome)]
            await asyncio.gather(*calls)
        finally:
            for call in calls:  # cancelled (the job timed out): so are its calls
                call.cancel()
        return outcome

    async def _wave(self, wave: list[Renewal], outcome: BatchOutcome) -> list[Awaitable[None]]:
        """Read a wave's records; the calls (and claims given back) to make."""
        try:
            raws = await self.store.read_many([(p, c) for p, c, _ in wave])
        except StoreUnavailable:
            # Redis is away for this worker (its breaker may still be open after a hang): the
            # wave's claims go to retry jobs that own them, never left to lapse while their
            # containers are served stale.
            outcome.retry.extend((renewal, self._settings.redis_retry_after_s) for renewal in wave)
            return []
        calls: list[Awaitable[None]] = []
        for renewal, (raw, failure) in zip(wave, raws, strict=True):
            provider, _, due_ms = renewal
            record = decode_record(raw) if raw is not None else None
            if raw is None or record is None:
                outcome.results["lapsed"] += 1
                continue
            if self._settings.service_key_for(provider) is None:
                skip: str | None = "no-service-key"
            else:
                skip = self._skip(record, due_ms, failure)
            due = self.policy.due_ms(record)
            if skip == "already-fresh" and due is not None:
                # Refreshed meanwhile (a caller's revalidation): its due entry is its own again.
                calls.append(self._give_back(renewal, due, outcome, skip))
            elif skip == "failing" and failure is not None:  # planned again when it is over
                calls.append(self._give_back(renewal, failure.until_ms, outcome, skip))
            elif skip is not None:
                outcome.results[skip] += 1
            else:
                calls.append(self._renew(renewal, record, raw, failure is not None, outcome))
        return calls

    async def _renew(
        self, renewal: Renewal, record: Record, raw: bytes, failing: bool, outcome: BatchOutcome
    ) -> None:
        provider, container_id, due_ms = renewal
        if await self._backing_off(provider):
            await self._give_back(renewal, due_ms, outcome, "throttled")
            return
        try:
            reply = await self._call(provider, container_id)
        except UpstreamFailure as exc:
            delay_s = await self._failed(provider, container_id, exc.status)
            outcome.retry.append((renewal, delay_s))
            return
        if reply.status >= 500:
            delay_s = await self._failed(provider, container_id, reply.status)
            outcome.retry.append((renewal, delay_s))
            return
        try:
            result = await self._absorb(reply, record, raw, failing)
        except StoreUnavailable:
            result = "store-unavailable"
        if result in ("throttled", "store-unavailable"):  # as in refresh(): the claim goes back
            await self._give_back(renewal, due_ms, outcome, result)
            return
        outcome.results[result] += 1

    async def _give_back(
        self, renewal: Renewal, due_ms: int, outcome: BatchOutcome, result: str
    ) -> None:
        provider, container_id, _ = renewal
        written = await self.writes.give_back(provider, container_id, due_ms)
        outcome.results[result if written else "store-unavailable"] += 1

    async def _backing_off(self, provider: str) -> bool:
        """Whether the provider's 429 back-off runs. ``Throttle`` asks Redis now and then:
        while it does, the calls starting meanwhile take its last answer instead of each
        asking too (thousands of renewals would otherwise ask at once)."""
        if provider in self._checking:
            return self._throttled.get(provider, False)
        self._checking.add(provider)
        try:
            active = await self.throttle.active(provider)
        finally:
            self._checking.discard(provider)
        self._throttled[provider] = active
        return active

    def _skip(self, record: Record, due_ms: int, failure: Failure | None) -> str | None:
        """Why this container needs no refresh from a worker, if it does not."""
        if record.negative or record.terminal:
            return "terminal"
        if record.inline_refresh:
            return "inline"  # its callers revalidate it: the service credential cannot see it
        if self.policy.fresh_until_ms(record) > due_ms:
            return "already-fresh"
        if failure is not None and failure.left_ms > 0:
            return "failing"  # the upstream fails for it: nobody calls until the back-off ends
        return None

    async def _call(self, provider: str, container_id: str) -> UpstreamReply:
        key = self._settings.service_key_for(provider)
        assert key is not None
        started = time.perf_counter()
        async with self.limiter.slot(provider):
            reply = await self.upstream.retrieve(
                provider, container_id, (("authorization", f"Bearer {key.reveal()}"),)
            )
        self._call_s.append(time.perf_counter() - started)
        return reply

    async def _absorb(self, reply: UpstreamReply, record: Record, raw: bytes, failing: bool) -> str:
        """Store what the upstream answered (not a 5xx); the refresh's result word."""
        provider, container_id = record.provider, record.container_id
        if reply.status == 200:
            fresh = reply.record(provider, container_id, now_ms())
            saved = await self.writes.save(fresh, failing)
            return "refreshed" if saved else "store-unavailable"
        if reply.status in (401, 403, 404):
            # Another project's container (or a credential refused for it): its callers keep it.
            inline = msgspec.structs.replace(record, inline_refresh=True)
            await self.store.hand_over(raw, inline)
            if reply.status == 404:
                log.debug("%s/%s is not visible to the service credential: left to its "
                          "callers", provider, container_id)  # fmt: skip
                return "handed-over"
            self._log_refused(provider, reply.status)
            return "refused"
        if reply.status == 429:
            await self.throttle.obey(provider, reply.retry_after)
            return "throttled"
        log.warning("refresh of %s/%s: the upstream answered %d", provider, container_id,
                    reply.status)  # fmt: skip
        return "failed"

    def _log_refused(self, provider: str, status: int) -> None:
        now = time.monotonic()
        if now - self._refused_logged.get(provider, -_REFUSED_LOG_EVERY_S) < _REFUSED_LOG_EVERY_S:
            return
        self._refused_logged[provider] = now
        log.error(
            "the service credential for %s was refused (HTTP %d): the containers it is refused "
            "for are revalidated by their callers; check SIDECAR_SERVICE_API_KEY",
            provider,
            status,
        )

    async def _failed(self, provider: str, container_id: str, status: int) -> float:
        """Note an upstream failure for everyone (sidecars and workers of every replica): nobody
        calls the upstream for this container until its back-off ends, this refresh's retry
        included. The seconds to wait before retrying."""
        settings = self._settings
        try:
            backoff_ms = await self.store.upstream_failed(
                provider, container_id, status,
                base_ms=int(settings.error_backoff_s * 1000),
                cap_ms=int(settings.error_backoff_max_s * 1000),
                keep_ms=int(settings.stale_if_error_s * 1000),
            )  # fmt: skip
        except StoreUnavailable:
            return self._backoff_s(1)
        return backoff_ms / 1000 * random.uniform(1.0, 1.1)

    def _backoff_s(self, attempt: int) -> float:
        """Exponential back-off with full jitter: 0.5 s, 1 s, 2 s ... capped at 30 s."""
        return random.uniform(0.5, 1.0) * min(30.0, 0.5 * 2.0 ** (attempt - 1))

    async def close(self) -> None:
        """Finish the saves under way."""
        await self.writes.close()


def _waves(renewals: Sequence[Renewal]) -> list[list[Renewal]]:
    """Renewals by due time, in waves whose starts are at most ``_WAVE_MS`` apart."""
    waves: list[list[Renewal]] = []
    for renewal in sorted(renewals, key=lambda renewal: renewal[2]):
        if not waves or renewal[2] - waves[-1][0][2] > _WAVE_MS:
            waves.append([])
        waves[-1].append(renewal)
    return waves


def claim_ms(settings: Settings) -> int:
    """How long a claim on a due entry holds: past any batch's wait and run (a refresh that
    dies with its worker is redone by arq's lease long before: the claim only stops others)."""
    return int((settings.refresh_tick_s + 2 * settings.upstream_timeout_s + 10) * 1000)
