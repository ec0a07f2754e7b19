"""What a refresh does: one upstream call with the service credential, and the record rewritten.

Every refresh is a renewal of a batch (``refresh_batch``, the workers' one job): refresh-ahead
plans batches of the entries callers read, a stale read a batch of its own container. One pipeline
reads a wave's records just before its calls, the calls run concurrently under the provider cap,
and the answers are saved in pipelines as they come in (``worker.writes``). Used by the arq jobs
(``worker.main``) and the embedded worker.

A batch holds the due-set claims its planner took (:class:`Claims`): it renews them while it
runs, and the save of a refreshed record gives each back. A batch lost with its worker stops
renewing: its claims lapse within seconds and refresh-ahead plans those containers again. An
upstream failure is noted for everyone (``CacheStore.upstream_failed``) and the claim is given
back for when the back-off ends: refresh-ahead retries the container then, if callers still
read it.

A container the service credential cannot see (401, 403, 404: another project's) is never
deleted: its callers may still see it. The record is handed over to them (``inline_refresh``,
same freshness and expiry), and the workers leave it alone from then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Sequence

import msgspec

from sidecar.errors import StoreUnavailable, UpstreamFailure
from sidecar.keys import member
from sidecar.policy import Policy
from sidecar.queue import Renewal, claim_ms
from sidecar.records import Record, decode_record
from sidecar.settings import Settings
from sidecar.store import CacheStore, Failure, now_ms
from sidecar.throttle import Throttle
from sidecar.upstream import Upstream, UpstreamReply
from worker.limits import ProviderLimiter
from worker.writes import WriteBehind

__all__ = ["Claims", "RefreshRunner", "event_of", "summary"]

log = logging.getLogger(__name__)

#: The ``sidecar_refresh_jobs_total`` events the workers count, and no others.
_EVENTS = {"refreshed": "succeeded", "failed": "failed", "refused": "failed",
           "store-unavailable": "failed", "deduplicated": "deduplicated",
           "retried": "retried"}  # fmt: skip
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


def summary(results: Counter[str]) -> str:
    """``"118 refreshed, 2 already-fresh"`` (for a batch's log line)."""
    return ", ".join(f"{n} {word}" for word, n in sorted(results.items())) or "nothing"


class Claims:
    """The due-set claims a batch holds (``member -> expiry``): renewed every second while the
    batch runs (a lease outlasts refresh-ahead's planning horizon by two seconds). A renewal
    whose claim lapsed meanwhile (another refresh may hold it now) is not made."""

    def __init__(
        self, store: CacheStore, renewals: Sequence[Renewal], until_ms: int, lease_ms: int
    ) -> None:
        self._store = store
        self._lease_ms = lease_ms
        self._until = {member(p, c): until_ms for p, c, _ in renewals}

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
        self, renewals: Sequence[Renewal], lead_ms: int, held_until_ms: int
    ) -> Counter[str]:
        """Renew claimed containers, each ``lead_ms`` before it goes stale: in waves of those
        due together, each wave's claims renewed and its records read just before its calls (a
        caller's refresh meanwhile is seen), the calls concurrent, the saves in pipelines. A
        count per result word."""
        results: Counter[str] = Counter()
        claims = Claims(self.store, renewals, held_until_ms, self.claim_ms)
        holding = asyncio.ensure_future(claims.hold())
        calls: list[asyncio.Future[None]] = []
        try:
            for wave in _waves(renewals):
                wait_ms = wave[0][2] - lead_ms - now_ms()
                if wait_ms > 5:
                    await asyncio.sleep(wait_ms / 1000)
                calls += [
                    asyncio.ensure_future(call) for call in await self._wave(wave, claims, results)
                ]
            await asyncio.gather(*calls)
        finally:
            holding.cancel()
            for call in calls:  # cancelled (the job timed out): so are its calls
                call.cancel()
        return results

    async def _wave(
        self, wave: list[Renewal], claims: Claims, results: Counter[str]
    ) -> list[Awaitable[None]]:
        """Renew a wave's claims and read its records; the calls (and reschedules) to make."""
        try:
            held = await claims.keep(wave)
            raws = await self.store.read_many([(p, c) for p, c, _ in held])
        except StoreUnavailable:
            # Redis is away for this worker (its breaker may still be open after a hang): the
            # claims lapse within a lease, and refresh-ahead plans the renewals again.
            for renewal in wave:
                claims.release(renewal)
            results["store-unavailable"] += len(wave)
            return []
        results["deduplicated"] += len(wave) - len(held)
        calls: list[Awaitable[None]] = []
        for renewal, (raw, failure) in zip(held, raws, strict=True):
            provider, _, due_ms = renewal
            record = decode_record(raw) if raw is not None else None
            if raw is None or record is None:
                claims.release(renewal)
                results["lapsed"] += 1
                continue
            if self._settings.service_key_for(provider) is None:
                skip: str | None = "no-service-key"
            else:
                skip = self._skip(record, due_ms, failure)
            due = self.policy.due_ms(record)
            if skip == "already-fresh" and due is not None:
                # Refreshed meanwhile (a caller's revalidation): its due entry is its own again.
                calls.append(self._reschedule(renewal, due, claims, results, skip))
            elif skip == "failing" and failure is not None:  # planned again when it is over
                calls.append(self._reschedule(renewal, failure.until_ms, claims, results, skip))
            elif skip in ("terminal", "no-service-key"):  # never renewed: out of the set
                calls.append(self._reschedule(renewal, None, claims, results, skip))
            elif skip is not None:  # renewed by its callers: the claim lapses unrenewed
                claims.release(renewal)
                results[skip] += 1
            else:
                calls.append(
                    self._renew(renewal, record, raw, failure is not None, claims, results)
                )
        return calls

    async def _renew(
        self,
        renewal: Renewal,
        record: Record,
        raw: bytes,
        failing: bool,
        claims: Claims,
        results: Counter[str],
    ) -> None:
        provider, container_id, due_ms = renewal
        if await self._backing_off(provider):
            await self._reschedule(renewal, self._after_backoff(renewal), claims, results,
                                   "throttled")  # fmt: skip
            return
        reply: UpstreamReply | None = None
        try:
            reply = await self._call(provider, container_id)
            status = reply.status
        except UpstreamFailure as exc:
            status = exc.status
        if reply is None or status >= 500:
            # Retried by refresh-ahead once the fleet-wide back-off ends (if still read).
            until_ms = await self._failed(provider, container_id, status)
            await self._reschedule(renewal, until_ms, claims, results, "retried")
            return
        try:
            result = await self._store_reply(reply, record, raw, failing)
        except StoreUnavailable:
            result = "store-unavailable"
        if result in ("throttled", "store-unavailable"):
            # Renewed by refresh-ahead once the back-off is over, or once Redis is back: the
            # claim must not outlive this refresh (WriteBehind retries the reschedule).
            due = self._after_backoff(renewal) if result == "throttled" else due_ms
            await self._reschedule(renewal, due, claims, results, result)
            return
        claims.release(renewal)
        results[result] += 1

    async def _reschedule(
        self,
        renewal: Renewal,
        due_ms: int | None,
        claims: Claims,
        results: Counter[str],
        result: str,
    ) -> None:
        provider, container_id, _ = renewal
        claims.release(renewal)
        written = await self.writes.reschedule(provider, container_id, due_ms)
        results[result if written else "store-unavailable"] += 1

    def _after_backoff(self, renewal: Renewal) -> int:
        """When a renewal held back by its provider's 429 back-off is due again: at the back-off's
        end, so that stale reads meanwhile claim nothing and queue no job."""
        provider, _, due_ms = renewal
        return max(due_ms, now_ms() + self.throttle.left_ms(provider))

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

    async def _store_reply(
        self, reply: UpstreamReply, record: Record, raw: bytes, failing: bool
    ) -> str:
        """Store what the upstream answered (not a 5xx); the refresh's result word."""
        provider, container_id = record.provider, record.container_id
        if reply.status == 200:
            fresh = reply.record(provider, container_id, now_ms())
            saved = await self.writes.save(fresh, failing)
            return "refreshed" if saved else "store-unavailable"
        if reply.status in (401, 403, 404):
            # Another project's container (or a credential refused for it): its callers keep it.
            inline = msgspec.structs.replace(record, inline_refresh=True)
            await self.store.leave_to_callers(raw, inline)
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

    async def _failed(self, provider: str, container_id: str, status: int) -> int:
        """Note an upstream failure for everyone (sidecars and workers of every replica): nobody
        calls the upstream for this container until its back-off ends. When it ends (unix ms,
        with a little jitter so that a fleet's retries spread out)."""
        settings = self._settings
        try:
            backoff_ms = await self.store.upstream_failed(
                provider, container_id, status,
                base_ms=int(settings.error_backoff_s * 1000),
                cap_ms=int(settings.error_backoff_max_s * 1000),
                keep_ms=int(settings.stale_if_error_s * 1000),
            )  # fmt: skip
        except StoreUnavailable:
            backoff_ms = int(settings.error_backoff_s * 1000)
        return now_ms() + int(backoff_ms * random.uniform(1.0, 1.1))

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
