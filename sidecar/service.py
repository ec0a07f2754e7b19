"""The retrieve use case: answer from the cache when the caller may see it, else fetch once.

A record is shared by every credential, but served to a credential only while it holds a grant:
proof, kept for ``grant_ttl_s``, that the upstream answered that credential for that container.
A caller without one goes upstream (coalesced per credential in-process, and across replicas by
a Redis lock that lapses after ``lock_age_s``), which proves access and refreshes the record.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable
from typing import Protocol

import msgspec

from sidecar.credentials import Credential
from sidecar.errors import StoreUnavailable, UpstreamFailure, UpstreamReplyError
from sidecar.flight import BackgroundTasks, SingleFlight
from sidecar.keys import cache_id_for
from sidecar.local import LocalCache
from sidecar.policy import Freshness, Policy, State
from sidecar.reads import ReadTracker
from sidecar.records import Record
from sidecar.settings import Settings
from sidecar.store import CacheStore, Lookup
from sidecar.throttle import Throttle
from sidecar.upstream import Upstream, UpstreamReply

__all__ = ["ContainerService", "Outcome", "Query", "Refresher"]

log = logging.getLogger(__name__)

_REFUSALS = (401, 403, 404)


class Query(msgspec.Struct, frozen=True, gc=False):
    """One parsed retrieve request."""

    provider: str
    container_id: str
    credential: Credential
    threshold: float
    """Lowest freshness the caller accepts from the cache."""


class Outcome(msgspec.Struct, frozen=True, gc=False):
    """How a retrieve was answered; ``record`` is the container (or the cached 404) served."""

    kind: str
    """``hit``, ``stale``, ``negative``, ``miss``, ``stale-if-error`` or ``fail-open``."""
    record: Record
    cache_id: str
    freshness: Freshness | None = None
    collapsed: bool = False
    """This request waited for a fetch another request started."""
    stored: bool = False
    """The upstream's answer was written to the cache."""


class Refresher(Protocol):
    """Schedules background refreshes (the arq queue); absent when there is no service key."""

    async def enqueue_refresh(self, provider: str, container_id: str, due_ms: int) -> None:
        """Ask a worker to refresh a container whose freshness ended at ``due_ms``."""


def now_ms() -> int:
    """Wall-clock unix milliseconds (records are shared across machines)."""
    return time.time_ns() // 1_000_000


class ContainerService:
    """Answers container retrievals from the cache and the upstream."""

    def __init__(
        self,
        store: CacheStore,
        upstream: Upstream,
        settings: Settings,
        refresher: Refresher | None = None,
        local: LocalCache | None = None,
        reads: ReadTracker | None = None,
    ) -> None:
        self.store = store
        self.local = local or LocalCache(settings.local_ttl_s)
        self.upstream = upstream
        self.policy = Policy(settings)
        self.refresher = refresher
        self.reads = reads
        self.throttle = Throttle(store, settings.retry_after_default_s)
        self._settings = settings
        self._grant_ms = int(settings.grant_ttl_s * 1000)
        self._negative_ms = int(settings.negative_ttl_s * 1000)
        self._lock_ms = int(settings.lock_age_s * 1000)
        self._flights: SingleFlight[tuple[str, str, str], Outcome] = SingleFlight()
        self._background = BackgroundTasks()

    async def close(self) -> None:
        """Cancel the fetches still running."""
        await self._flights.close()
        await self._background.close()

    async def retrieve(self, query: Query) -> Outcome:
        """The answer to one retrieve; upstream refusals raise ``UpstreamReplyError``."""
        fingerprint = query.credential.fingerprint
        if self.reads is not None:
            self.reads.note(query.provider, query.container_id)
        copy = self.local.get(query.provider, query.container_id, fingerprint)
        if copy is not None:
            freshness = self.policy.assess(copy, now_ms())
            if freshness.state is State.FRESH and freshness.similarity >= query.threshold:
                return Outcome("hit", copy, cache_id_for(query.provider, query.container_id),
                               freshness)  # fmt: skip
        try:
            found = await self.store.lookup(query.provider, query.container_id, fingerprint)
        except StoreUnavailable:
            found = Lookup(None, 0, None)
        if found.record is not None and found.granted:
            self.local.put(found.record, fingerprint, found.grant_left_ms / 1000)
        served = await self._from_cache(query, found, now_ms())
        if served is not None:
            return served
        key = (query.provider, query.container_id, query.credential.fingerprint)
        stale = found.record if found.granted else None
        outcome, joined = await self._flights.run(key, lambda: self._fetch(query, stale))
        return msgspec.structs.replace(outcome, collapsed=True) if joined else outcome

    async def _from_cache(self, query: Query, found: Lookup, now: int) -> Outcome | None:
        """What the cache can answer without the upstream, if anything."""
        cache_id = cache_id_for(query.provider, query.container_id)
        if found.negative is not None:
            freshness = self.policy.assess(found.negative, now)
            if freshness.state is State.FRESH:
                return Outcome("negative", found.negative, cache_id, freshness)
        record = found.record
        if record is None or not found.granted:
            return None
        freshness = self.policy.assess(record, now)
        if freshness.similarity < query.threshold:
            return None
        if freshness.state is State.FRESH:
            return Outcome("hit", record, cache_id, freshness)
        if freshness.state is State.DEAD:
            return None
        if await self.throttle.active(query.provider):
            # Rate limited: nobody refreshes from this provider until Retry-After passes.
            return Outcome("stale", record, cache_id, freshness)
        refreshable = self._settings.service_key_for(query.provider) is not None
        if freshness.state is State.STALE and self.refresher is not None and refreshable:
            due_ms = self.policy.fresh_until_ms(record)
            refresh = self.refresher.enqueue_refresh(query.provider, query.container_id, due_ms)
            self._background.spawn(refresh)
            return Outcome("stale", record, cache_id, freshness)
        return None

    async def _fetch(self, query: Query, stale: Record | None) -> Outcome:
        """Fetch upstream once for this credential, unless another replica just did."""
        started = now_ms()
        token = secrets.token_hex(8)
        locked = await self._lock(query, token, started)
        if isinstance(locked, Outcome):
            return locked
        try:
            reply = await self.upstream.retrieve(
                query.provider, query.container_id, query.credential.headers
            )
        except UpstreamFailure:
            served = self._stale_if_error(query, stale)
            if served is None:
                raise
            return served
        finally:
            if locked:
                await self._quietly(
                    self.store.unlock(
                        query.provider, query.container_id, query.credential.fingerprint, token
                    )
                )
        return await self._absorb(query, reply, stale)

    async def _lock(self, query: Query, token: str, started: int) -> bool | Outcome:
        """Take the fetch lock; while another replica holds it, wait for its answer instead."""
        provider, cid, fingerprint = (
            query.provider,
            query.container_id,
            query.credential.fingerprint,
        )
        deadline = time.monotonic() + self._settings.lock_age_s
        delay = 0.005
        while True:
            try:
                if await self.store.try_lock(provider, cid, fingerprint, token, self._lock_ms):
                    return True
                if time.monotonic() >= deadline:
                    return False  # the holder is too old: go anyway (nginx proxy_cache_lock_age)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
                found = await self.store.lookup(provider, cid, fingerprint)
            except StoreUnavailable:
                return False
            for record in (found.record, found.negative):
                if record is not None and record.fetched_at_ms >= started:
                    served = await self._from_cache(query, found, now_ms())
                    if served is not None:
                        return msgspec.structs.replace(served, collapsed=True)

    async def _absorb(self, query: Query, reply: UpstreamReply, stale: Record | None) -> Outcome:
        """Store what the upstream answered and turn it into an outcome (or raise its error)."""
        cache_id = cache_id_for(query.provider, query.container_id)
        fingerprint = query.credential.fingerprint
        if reply.status == 200:
            record = reply.record(query.provider, query.container_id, now_ms())
            stored = await self._quietly(
                self.store.save(
                    record, self.policy, fingerprint=fingerprint, grant_ms=self._grant_ms
                )
            )
            self.local.put(record, fingerprint, self._grant_ms / 1000)
            return Outcome("miss", record, cache_id, stored=stored)
        if reply.status in _REFUSALS:
            self.local.revoke(query.provider, query.container_id, fingerprint)
            await self._quietly(self.store.revoke(query.provider, query.container_id, fingerprint))
        if reply.status == 404 and self._negative_ms > 0:
            negative = reply.record(query.provider, query.container_id, now_ms())
            stored = await self._quietly(
                self.store.save_negative(negative, fingerprint, self._negative_ms)
            )
            return Outcome("miss", negative, cache_id, stored=stored)
        if reply.status == 429:
            await self.throttle.obey(query.provider, reply.retry_after)
        if reply.status >= 500 or reply.status == 429:
            served = self._stale_if_error(query, stale)
            if served is not None:
                return served
        raise UpstreamReplyError(reply.status, reply.body, retry_after=reply.retry_after)

    def _stale_if_error(self, query: Query, stale: Record | None) -> Outcome | None:
        """RFC 5861 stale-if-error: a stale record the caller may see, while the upstream fails."""
        if stale is None or stale.negative:
            return None
        freshness = self.policy.assess(stale, now_ms())
        if freshness.state is State.DEAD:
            return None
        cache_id = cache_id_for(query.provider, query.container_id)
        return Outcome("stale-if-error", stale, cache_id, freshness)

    async def _quietly(self, write: Awaitable[object]) -> bool:
        """Await a store write; Redis trouble is not the caller's problem."""
        try:
            await write
        except StoreUnavailable:
            return False
        return True
