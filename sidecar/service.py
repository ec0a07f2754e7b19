"""The retrieve use case: answer from the cache when the caller may see it, else fetch once.

A record is shared by every credential but served to one only while it holds a grant: proof,
kept ``grant_ttl_s``, that the upstream answered that credential for that container. A caller
without one goes upstream (coalesced in-process, and across replicas by a Redis lock whose lease
its holder renews), which proves access and refreshes the record.

A failure is scoped by its cause. One credential's (401, 403, 404, 429) stays with it: its
grant is revoked and only it gets the upstream's answer. The upstream's own (5xx, timeouts)
backs the container off for everyone (a marker in Redis, and a memo here for when Redis is
away): callers get their stale-if-error copy or a 503, never another caller's answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable

import msgspec

from sidecar.credentials import Credential
from sidecar.errors import (
    NotCached,
    SidecarError,
    StoreUnavailable,
    UpstreamBackingOff,
    UpstreamFailure,
    UpstreamMalformed,
    UpstreamReplyError,
)
from sidecar.flight import BackgroundTasks, SingleFlight, remember
from sidecar.keys import cache_id_for
from sidecar.local import LocalCache
from sidecar.outcomes import Outcome, Query, Refresher
from sidecar.policy import Policy, State
from sidecar.records import Record
from sidecar.settings import Settings, cache_provider
from sidecar.stats import FleetStats
from sidecar.store import CacheStore, Failure, Lookup, now_ms
from sidecar.throttle import Throttle, retry_after_ms
from sidecar.upstream import Upstream, UpstreamReply
from sidecar.wire import default_extra, normalize_container

__all__ = ["ContainerService", "now_ms"]

_REFUSALS = (401, 403, 404)
FlightKey = tuple[str, str, str, bool]
#: Bounds: background tasks in flight (a hung queue must not pile them up), an enqueue's time.
_MAX_BACKGROUND = 1_000
_ENQUEUE_TIMEOUT_S = 1.0
_MAX_FAILURES = 10_000
#: The fetch lock's lease, renewed every third of it: the longest a dead holder's waiters wait.
_LEASE_MS = 900
#: A grant is renewed by a read late in any of the record's last freshness periods before it
#: lapses: several chances, so a rarely read container rarely misses them all.
_RENEW_PERIODS = 3


class ContainerService:
    """Answers container retrievals from the cache and the upstream."""

    def __init__(
        self,
        store: CacheStore,
        upstream: Upstream,
        settings: Settings,
        *,
        refresher: Refresher | None = None,
        local: LocalCache | None = None,
        reads: FleetStats | None = None,
    ) -> None:
        self.store = store
        self.upstream = upstream
        self.policy = Policy(settings)
        self.refresher = refresher
        self.local = local or LocalCache(
            self.policy, settings.local_ttl_s, settings.local_max_entries
        )
        self.reads = reads
        self.throttle = Throttle(store, settings.retry_after_default_s, settings.retry_after_max_s)
        self._settings = settings
        self._grant_ms = int(settings.grant_ttl_s * 1000)
        self._negative_ms = int(settings.negative_ttl_s * 1000)
        self._fresh_ms = int(settings.fresh_ttl_s * 1000)
        # Renewing a grant early wastes what is left of the record's freshness: at most this.
        window_s = max(settings.fresh_ttl_s / 5, settings.refresh_lead_s * 2)
        self._renew_ms = int(min(settings.fresh_ttl_s / 2, window_s) * 1000)
        self._failures: dict[tuple[str, str], Failure] = {}  # for when Redis cannot say
        self._flights: SingleFlight[FlightKey, Outcome] = SingleFlight()
        self._background = BackgroundTasks()

    async def close(self) -> None:
        """Cancel the fetches and enqueues still running."""
        await self._flights.close()
        await self._background.close()

    async def retrieve(self, query: Query) -> Outcome:
        """The answer to one retrieve; upstream refusals raise ``UpstreamReplyError``."""
        if served := self.local_hit(query):
            return served
        provider, cid, rules = query.provider, query.container_id, query.rules
        fingerprint = query.credential.fingerprint
        try:
            found = await self.store.lookup(provider, cid, fingerprint)
        except StoreUnavailable:
            found = Lookup(None, 0, None)
        if found.record is not None and found.granted:
            self.local.put(found.record, fingerprint, now_ms() + found.grant_left_ms)
        if not rules.no_cache and (served := await self._from_cache(query, found)):
            return served
        if rules.only_if_cached:
            raise NotCached("only-if-cached: nothing usable is cached for this request")
        stale = found.record if found.granted else None
        if served := self._answer_while_backing_off(query, stale, found.failure):
            return served
        # Whether another credential has it cached is none of this caller's business: a record
        # it may not see is a miss like any other.
        forward = "request" if rules.no_cache else "stale" if stale is not None else "uri-miss"
        key = (provider, cid, fingerprint, rules.no_store)
        outcome, joined = await self._flights.run(
            key, lambda: self._fetch(query, stale, forward, found.record)
        )
        return msgspec.structs.replace(outcome, collapsed="process") if joined else outcome

    def local_hit(self, query: Query) -> Outcome | None:
        """The answer from this process's own copy, if this caller may see it and the rules
        admit it (no await: the hit lane answers with it before any routing)."""
        provider, cid, rules = query.provider, query.container_id, query.rules
        if self.reads is not None:
            self.reads.note_read(provider, cid)
        if rules.no_cache:
            return None
        now = now_ms()
        got = self.local.get(provider, cid, query.credential.fingerprint, now)
        if got is None:
            return None
        copy, grant_expiry_ms = got
        freshness = self.policy.assess(copy.record, now, copy.fresh_until_ms)
        if not rules.admits(freshness):
            return None
        self._renew_early(query, copy.record, grant_expiry_ms, now, copy.fresh_until_ms)
        return Outcome("hit", copy.record, copy.cache_id, freshness, copy=copy)

    def _answer_while_backing_off(
        self, query: Query, stale: Record | None, failure: Failure | None
    ) -> Outcome | None:
        """While the upstream's back-off for this container runs, answer without calling it:
        the stale-if-error copy, or (raised) the error it last gave. None: go ahead."""
        key = (query.provider, query.container_id)
        local = self._failures.get(key)
        if local is not None and (failure is None or local.until_ms > failure.until_ms):
            failure = local
        if failure is None or failure.left_ms <= 0:
            return None
        if served := self._stale_if_error(query, stale, failure.status):
            return served
        raise UpstreamBackingOff(
            f"the upstream failed lately for this container (HTTP {failure.status}); it is "
            "not asked again until its back-off ends",
            retry_after_s=max(1, -(-failure.left_ms // 1000)),
        )

    async def _from_cache(self, query: Query, found: Lookup) -> Outcome | None:
        """What the cache can answer without the upstream, if anything."""
        cache_id = cache_id_for(query.provider, query.container_id)
        rules, now = query.rules, now_ms()
        if found.negative is not None:
            freshness = self.policy.assess(found.negative, now)
            if freshness.state is State.FRESH and rules.admits(freshness):
                return Outcome("negative", found.negative, cache_id, freshness)
        record = found.record
        if record is None or not found.granted:
            return None
        freshness = self.policy.assess(record, now)
        if freshness.state is State.DEAD or not rules.admits(freshness):
            return None
        if freshness.state is State.FRESH:
            self._renew_early(query, record, now + found.grant_left_ms, now)
            return Outcome("hit", record, cache_id, freshness)
        stale = Outcome("stale", record, cache_id, freshness)
        can_refresh = self._can_refresh(query.provider) and not record.inline_refresh
        if can_refresh and await self.throttle.active(query.provider):
            return stale  # the workers' key is rate limited: they refresh after Retry-After
        in_window = freshness.state is State.STALE
        if can_refresh and (in_window or rules.max_stale_s is not None):
            due_ms = self.policy.fresh_until_ms(record)
            self._enqueue(query.provider, query.container_id, due_ms)
            return stale
        if rules.max_stale_s is not None or (rules.only_if_cached and in_window):
            return stale  # the caller accepts it; it revalidates inline when it must
        return None

    def _renew_early(
        self,
        query: Query,
        record: Record,
        grant_expiry_ms: int,
        now: int,
        fresh_until: int | None = None,
    ) -> None:
        """Renew a grant that would lapse within ``_RENEW_PERIODS`` refreshes, by a read late in
        the record's freshness: one background call with this read's credential (coalesced like
        a miss) proves access and refreshes the record, so the worker's refresh makes none. The
        call is part of this read: no credential is kept for later."""
        if fresh_until is None:
            fresh_until = self.policy.fresh_until_ms(record)
        if grant_expiry_ms >= fresh_until + _RENEW_PERIODS * self._fresh_ms:
            return
        if fresh_until - self._renew_ms > now:
            return  # early in the freshness: a later read (of this period or the next) renews
        key = (query.provider, query.container_id, query.credential.fingerprint, False)
        if key not in self._flights and len(self._background) < _MAX_BACKGROUND:
            self._background.spawn(self._renew(query, record, key))

    async def _renew(self, query: Query, record: Record, key: FlightKey) -> None:
        with contextlib.suppress(SidecarError):
            if self._answer_while_backing_off(query, record, None) is None:
                await self._flights.run(key, lambda: self._fetch(query, record, "stale", record))

    def _can_refresh(self, provider: str) -> bool:
        return self.refresher is not None and self._settings.service_key_for(provider) is not None

    def _enqueue(self, provider: str, container_id: str, due_ms: int) -> None:
        """Ask for a background refresh, without waiting; a slow queue only loses refreshes."""
        if len(self._background) >= _MAX_BACKGROUND or self.refresher is None:
            return
        enqueue = self.refresher.refresh_stale(self.store, (provider, container_id, due_ms))
        self._background.spawn(asyncio.wait_for(enqueue, _ENQUEUE_TIMEOUT_S))

    async def _fetch(
        self, query: Query, stale: Record | None, forward: str, previous: Record | None
    ) -> Outcome:
        """Fetch upstream once for this credential, unless another replica just did."""
        token = secrets.token_hex(8)
        locked = await self._lock(query, token, now_ms(), stale)
        if isinstance(locked, Outcome):
            return locked
        lease = asyncio.create_task(self._hold(query, token)) if locked else None
        try:
            try:
                reply = await self.upstream.retrieve(
                    query.provider, query.container_id, query.headers
                )
            except UpstreamFailure as exc:
                await self._failed(query, exc.status)
                if served := self._stale_if_error(query, stale, None):
                    return served
                raise
            return await self._store_reply(query, reply, stale, forward, previous)
        finally:
            # Released once the answer is stored (or its failure noted): a replica waiting on
            # the lock finds it, instead of taking the lock in between and fetching again.
            if lease is not None:
                lease.cancel()  # not awaited: this fetch's own cancellation must go on
                await self._quietly(
                    self.store.unlock(
                        query.provider, query.container_id, query.credential.fingerprint, token
                    )
                )

    async def _hold(self, query: Query, token: str) -> None:
        """Renew the fetch lock's lease while this fetch runs (cancelled when it ends)."""
        args = (query.provider, query.container_id, query.credential.fingerprint, token)
        while True:
            await asyncio.sleep(_LEASE_MS / 3000)
            with contextlib.suppress(StoreUnavailable):
                if not await self.store.renew_lock(*args, _LEASE_MS):
                    return  # lost (Redis was away): the waiters go ahead, as after lock_age_s

    async def _failed(self, query: Query, status: int, retry_after: str | None = None) -> None:
        """Start (or lengthen) the container's back-off after the upstream's own failure."""
        provider, cid = query.provider, query.container_id
        floor_ms = retry_after_ms(retry_after, 0, self._settings.retry_after_max_s)
        try:
            backoff_ms = await self.store.upstream_failed(
                provider, cid, status, self.policy, floor_ms
            )
        except StoreUnavailable:
            previous = self._failures.get((provider, cid))
            count = previous.failures + 1 if previous is not None else 1
            backoff_ms = self.policy.backoff_ms(count, floor_ms)
        else:
            count = 1
        failure = Failure(status, now_ms() + backoff_ms, count)
        remember(self._failures, (provider, cid), failure, _MAX_FAILURES, _over)

    async def _lock(
        self, query: Query, token: str, started: int, stale: Record | None
    ) -> bool | Outcome:
        """Take the fetch lock, or wait for the holder's answer (or the failure it met)."""
        provider, cid = query.provider, query.container_id
        fingerprint = query.credential.fingerprint
        lock_ms = _LEASE_MS
        deadline = time.monotonic() + self._settings.lock_age_s
        delay = 0.005
        while True:
            try:
                if await self.store.try_lock(provider, cid, fingerprint, token, lock_ms):
                    return True
                if time.monotonic() >= deadline:
                    return False  # the holder is too old: go anyway (nginx proxy_cache_lock_age)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
                found = await self.store.lookup(provider, cid, fingerprint)
            except StoreUnavailable:
                return False
            if found.failure is not None and (
                served := self._answer_while_backing_off(query, stale, found.failure)
            ):
                return served  # the holder met a failure: its back-off holds for us too
            fresh = [r for r in (found.record, found.negative) if r and r.fetched_at_ms >= started]
            if fresh and (served := await self._from_cache(query, found)):
                return msgspec.structs.replace(served, collapsed="replica")

    async def _store_reply(
        self,
        query: Query,
        reply: UpstreamReply,
        stale: Record | None,
        forward: str,
        previous: Record | None,
    ) -> Outcome:
        """Store what the upstream answered and turn it into an outcome (or raise its error)."""
        provider, cid = query.provider, query.container_id
        fingerprint, no_store = query.credential.fingerprint, query.rules.no_store
        cache_id = cache_id_for(provider, cid)
        if reply.status == 200:
            self._failures.pop((provider, cid), None)
            record = reply.record(provider, cid, now_ms())
            if previous is not None and previous.inline_refresh:
                record = msgspec.structs.replace(record, inline_refresh=True)
            stored = kept = False
            if not no_store:
                try:
                    stored = kept = await self.store.save(
                        record, self.policy, fingerprint=fingerprint, grant_ms=self._grant_ms,
                        read=self.reads is not None,
                    )  # fmt: skip
                except StoreUnavailable:
                    kept = True  # Redis is away: this process's copy serves meanwhile
            if kept:  # not when the container was deleted while this fill ran
                self.local.put(record, fingerprint, now_ms() + self._grant_ms)
            return Outcome("miss", record, cache_id, forward=forward, upstream_status=200,
                           stored=stored)  # fmt: skip
        if reply.status in _REFUSALS:
            self.local.revoke(provider, cid, fingerprint)
            await self._quietly(self.store.revoke(provider, cid, fingerprint))
        if reply.status == 404 and self._negative_ms > 0:
            negative = reply.record(provider, cid, now_ms())
            stored = not no_store and await self._quietly(
                self.store.save_negative(negative, fingerprint, self._negative_ms)
            )
            return Outcome("miss", negative, cache_id, forward=forward, upstream_status=404,
                           stored=stored)  # fmt: skip
        if reply.status >= 500:
            await self._failed(query, reply.status, reply.retry_after)
        # A 429 is this credential's own limit: its stale copy, or its own answer, and nobody
        # else's calls held back (the workers' key has limits of its own).
        if (reply.status >= 500 or reply.status == 429) and (
            served := self._stale_if_error(query, stale, reply.status)
        ):
            return served
        raise UpstreamReplyError(reply.status, reply.body, retry_after=reply.retry_after)

    def _stale_if_error(
        self, query: Query, stale: Record | None, status: int | None
    ) -> Outcome | None:
        """RFC 5861 stale-if-error: a stale record the caller may see, while the upstream fails."""
        if stale is None or stale.negative:
            return None
        freshness = self.policy.assess(stale, now_ms())
        if freshness.state is State.DEAD:
            return None
        cache_id = cache_id_for(query.provider, query.container_id)
        return Outcome("stale_if_error", stale, cache_id, freshness, forward="stale",
                       upstream_status=status)  # fmt: skip

    async def seed(
        self, provider: str, credential: Credential, payload: object, raw: object = None
    ) -> None:
        """Cache a container the upstream just returned to this credential (list, create);
        ``raw`` is the provider's own JSON of it, when a gateway relayed it."""
        provider = cache_provider(self._settings, provider)
        openai = self._settings.upstream_kind == "openai"
        try:
            body, container = normalize_container(payload, keep_unknown=not openai)
        except UpstreamMalformed:
            return
        extra = default_extra(provider)
        if openai or raw is not None:
            raw_json = msgspec.json.encode(payload if openai else raw)
            extra += b',"raw_response":' + raw_json
        reply = UpstreamReply(200, body, container, extra=extra)
        record = reply.record(provider, container.id, now_ms())
        fingerprint = credential.fingerprint
        try:
            saved = await self.store.save(
                record, self.policy, fingerprint=fingerprint, grant_ms=self._grant_ms
            )
        except StoreUnavailable:
            saved = True
        if saved:
            self.local.put(record, fingerprint, now_ms() + self._grant_ms)

    async def forget(self, provider: str, container_id: str) -> None:
        """Drop a container deleted upstream through this sidecar; no fill under way returns it."""
        for name in self._names(provider):
            self.local.drop(name, container_id)
            await self._quietly(self.store.delete(name, container_id, gone=True))

    async def revalidate(self, provider: str, container_id: str) -> None:
        """Drop a container's record (not its grants): a change upstream (a file added, a
        command run) moved ``last_active_at``, so the next read asks."""
        for name in self._names(provider):
            self.local.drop(name, container_id)
            await self._quietly(self.store.delete(name, container_id))

    def _names(self, provider: str) -> set[str]:
        """Every provider name a container may be cached under (a container id names one
        container, whichever name of its upstream a change came through)."""
        settings = self._settings
        names = {provider, *settings.container_providers}
        return {cache_provider(settings, name) for name in names}

    async def _quietly(self, write: Awaitable[object]) -> bool:
        """Await a store write; Redis trouble is not the caller's problem."""
        try:
            await write
        except StoreUnavailable:
            return False
        return True


def _over(failure: Failure) -> bool:
    return failure.left_ms <= 0
