"""The cache store: records, grants and fetch locks in Redis, failing open.

A hit is one ``MGET`` of the record and the caller's grant (one slot, so cluster-safe). Every
method raises :class:`StoreUnavailable` when Redis fails; after a failure the store skips Redis
for ``SIDECAR_REDIS_RETRY_AFTER_S`` so callers do not each pay a timeout, and it logs the outage
once when it starts and once when it ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.errors import StoreUnavailable
from sidecar.keys import KeySpace, cache_id_for, member, parse_member
from sidecar.policy import Policy
from sidecar.records import Record, decode_record, encode_record

__all__ = ["Breaker", "CacheStore", "Lookup"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_UNLOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


# Cache ids map back to containers for at least a day (refreshes do not rewrite the map).
_INDEX_MS = 86_400_000


#: What a Redis failure may raise (cluster client errors are not RedisErrors).
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)

# An outage is logged when it starts, then at most this often while it flaps.
_LOG_EVERY_S = 30.0


class Breaker:
    """Tracks Redis health: open (skipping Redis) for a while after each failure."""

    def __init__(
        self,
        retry_after_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[], object] | None = None,
    ) -> None:
        self._retry_after_s = retry_after_s
        self._on_failure = on_failure
        self._clock = clock
        self._skip_until = 0.0
        self.down_since: float | None = None
        self._logged_at = -_LOG_EVERY_S
        self._outage_logged = False
        self.down_seconds_total = 0.0

    @property
    def down(self) -> bool:
        """True while Redis is considered unavailable."""
        return self.down_since is not None

    def check(self) -> None:
        """Raise StoreUnavailable while Redis is being skipped."""
        if self._skip_until and self._clock() < self._skip_until:
            raise StoreUnavailable("redis skipped after a recent failure")

    def failure(self, exc: BaseException) -> None:
        """Record a failure; the first of an outage is logged.

        Only a slow failure (a timeout) makes callers skip Redis for a while: a refused
        connection costs nothing to retry, and on a cluster it concerns one node's slots only.
        """
        now = self._clock()
        if self._on_failure is not None:
            self._on_failure()
        if isinstance(exc, (TimeoutError, RedisTimeoutError)):
            self._skip_until = now + self._retry_after_s
        if self.down_since is None:
            self.down_since = now
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            self._outage_logged = True
            log.warning(
                "redis unavailable (%s: %s): serving from upstream (fail-open) until it recovers",
                type(exc).__name__,
                exc,
            )

    def fail_open_seconds(self) -> float:
        """Seconds spent without Redis so far, the current outage included."""
        current = self._clock() - self.down_since if self.down_since is not None else 0.0
        return self.down_seconds_total + current

    def success(self) -> None:
        """Record a success; the end of an outage is logged."""
        if self.down_since is not None:
            outage = self._clock() - self.down_since
            self.down_seconds_total += outage
            self.down_since = None
            self._skip_until = 0.0
            if self._outage_logged:  # an end for every start that was logged
                self._outage_logged = False
                log.info("redis recovered after %.1fs of fail-open serving", outage)


class Lookup(NamedTuple):
    """What one hit-path read found."""

    record: Record | None
    grant_left_ms: int
    """How long this credential may still see the record (0: the upstream must answer it)."""
    negative: Record | None
    """A cached 404 for this credential."""

    @property
    def granted(self) -> bool:
        """The upstream answered this credential for this container within the grant TTL."""
        return self.grant_left_ms > 0


def _ms_left(value: bytes | None) -> int:
    """Grants and back-offs hold their expiry (unix ms): what is left of it."""
    if value is None:
        return 0
    try:
        return max(0, int(value) - time.time_ns() // 1_000_000)
    except ValueError:
        return 0


class CacheStore:
    """Records, grants and locks in Redis (or the embedded fakeredis)."""

    def __init__(self, redis: Any, keys: KeySpace, breaker: Breaker) -> None:
        self.redis = redis
        self.keys = keys
        self.breaker = breaker
        self._unlock = redis.register_script(_UNLOCK)
        # Cluster pipelines refuse PUBLISH: announce with a command of its own there.
        self._cluster = hasattr(redis, "get_primaries")

    async def call(self, op: Callable[[], Awaitable[T]]) -> T:
        """Run Redis commands under the breaker: StoreUnavailable when Redis fails."""
        self.breaker.check()
        try:
            result = await op()
        except REDIS_ERRORS as exc:
            self.breaker.failure(exc)
            raise StoreUnavailable(str(exc)) from exc
        self.breaker.success()
        return result

    def _announce(self, pipe: Any, name: str) -> None:
        if not self._cluster:
            pipe.publish(self.keys.changes, name)

    async def lookup(self, provider: str, container_id: str, fingerprint: str) -> Lookup:
        """The cached record, whether this credential may see it, and its cached 404 if any."""
        keys = self.keys
        raw, grant, negative = await self.call(
            lambda: self.redis.mget(
                keys.record(provider, container_id),
                keys.grant(provider, container_id, fingerprint),
                keys.negative(provider, container_id, fingerprint),
            )
        )
        return Lookup(
            decode_record(raw) if raw is not None else None,
            _ms_left(grant),
            decode_record(negative) if negative is not None else None,
        )

    async def read(self, provider: str, container_id: str) -> Record | None:
        """The cached record, whoever asks (workers and admin only)."""
        raw = await self.call(lambda: self.redis.get(self.keys.record(provider, container_id)))
        return decode_record(raw) if raw is not None else None

    async def save(
        self,
        record: Record,
        policy: Policy,
        *,
        fingerprint: str | None = None,
        grant_ms: int = 0,
        read: bool = False,
        index: bool = True,
    ) -> None:
        """Store ``record`` as long as ``policy`` may serve it; with a fingerprint, grant it.

        The record enters the refresh-ahead index at the end of its freshness (a terminal one
        leaves it), and the other processes are told to drop their copies. ``index`` writes the
        public cache id's way back to the container (for purges); a refresh, which keeps the id,
        skips it.
        """
        keys, provider, cid = self.keys, record.provider, record.container_id
        name = member(provider, cid)
        retention_ms, due_ms = policy.retention_ms(record), policy.due_ms(record)

        async def op() -> None:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(keys.record(provider, cid), encode_record(record), px=retention_ms)
                if fingerprint is not None:
                    expiry = time.time_ns() // 1_000_000 + grant_ms
                    pipe.set(keys.grant(provider, cid, fingerprint), expiry, px=grant_ms)
                if index:
                    index_key = keys.cache_id(cache_id_for(provider, cid))
                    pipe.set(index_key, name, px=max(retention_ms, _INDEX_MS))
                if due_ms is None:
                    pipe.zrem(keys.due, name)
                else:
                    pipe.zadd(keys.due, {name: due_ms})
                if read:  # a caller's read, not a worker's refresh: refresh-ahead keeps it fresh
                    pipe.zadd(keys.hot, {name: time.time_ns() // 1_000_000})
                self._announce(pipe, name)
                await pipe.execute()
            if self._cluster:
                await self.redis.execute_command("PUBLISH", keys.changes, name)

        await self.call(op)

    async def save_negative(self, record: Record, fingerprint: str, ttl_ms: int) -> None:
        """Cache a 404 for one credential."""
        key = self.keys.negative(record.provider, record.container_id, fingerprint)
        await self.call(lambda: self.redis.set(key, encode_record(record), px=ttl_ms))

    async def delete(self, provider: str, container_id: str) -> None:
        """Forget a container (deleted upstream, or purged) and tell the other processes."""
        keys, name = self.keys, member(provider, container_id)

        async def op() -> None:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(keys.record(provider, container_id))
                pipe.zrem(keys.due, name)
                self._announce(pipe, name)
                await pipe.execute()
            if self._cluster:
                await self.redis.execute_command("PUBLISH", keys.changes, name)

        await self.call(op)

    async def purge_cache_id(self, cache_id: str) -> tuple[str, str] | None:
        """Drop the entry behind a public cache id; its ``(provider, container_id)``, if any."""
        raw = await self.call(lambda: self.redis.get(self.keys.cache_id(cache_id)))
        if raw is None:
            return None
        provider, container_id = parse_member(raw)
        await self.delete(provider, container_id)
        await self.call(lambda: self.redis.delete(self.keys.cache_id(cache_id)))
        return provider, container_id

    async def count_records(self, limit: int = 100_000) -> tuple[int, bool]:
        """How many records are cached (scanning at most ``limit`` keys); and if exactly."""

        async def op() -> tuple[int, bool]:
            count = 0
            async for _ in self.redis.scan_iter(match=f"{self.keys.prefix}:{{*}}:rec", count=1000):
                count += 1
                if count >= limit:
                    return count, False
            return count, True

        return await self.call(op)

    async def set_backoff(self, provider: str, backoff_ms: int) -> None:
        """Hold off refreshes from ``provider`` (a 429) for ``backoff_ms``."""
        until = time.time_ns() // 1_000_000 + backoff_ms
        key = self.keys.backoff(provider)
        await self.call(lambda: self.redis.set(key, until, px=max(1, backoff_ms)))

    async def backoff_left_ms(self, provider: str) -> int:
        """How long refreshes from ``provider`` must still wait (0: go ahead)."""
        return _ms_left(await self.call(lambda: self.redis.get(self.keys.backoff(provider))))

    async def mark_read(self, names: list[str], at_ms: int) -> None:
        """Note that these containers were read (refresh-ahead keeps them fresh)."""
        await self.call(lambda: self.redis.zadd(self.keys.hot, dict.fromkeys(names, at_ms)))

    async def due_for_refresh(
        self, horizon_ms: int, read_since_ms: int, limit: int = 10_000
    ) -> list[tuple[str, str, int]]:
        """Entries whose freshness ends by ``horizon_ms`` and that were read since then.

        Entries nobody read since ``read_since_ms`` leave the index: they lapse unpolled.
        """
        keys = self.keys

        async def op() -> list[tuple[str, str, int]]:
            await self.redis.zremrangebyscore(keys.hot, "-inf", read_since_ms - 1)
            due = await self.redis.zrangebyscore(
                keys.due, "-inf", horizon_ms, start=0, num=limit, withscores=True
            )
            if not due:
                return []
            names = [name for name, _ in due]
            read_at = await self.redis.zmscore(keys.hot, names)
            # Unread entries that are already stale leave the index (a read puts them back).
            now = time.time_ns() // 1_000_000
            cold = [
                name
                for (name, score), at in zip(due, read_at, strict=True)
                if at is None and score < now
            ]
            if cold:
                await self.redis.zrem(keys.due, *cold)
            return [
                (*parse_member(name), int(score))
                for (name, score), at in zip(due, read_at, strict=True)
                if at is not None
            ]

        return await self.call(op)

    async def revoke(self, provider: str, container_id: str, fingerprint: str) -> None:
        """Drop a credential's grant (the upstream refused it)."""
        await self.call(
            lambda: self.redis.delete(self.keys.grant(provider, container_id, fingerprint))
        )

    async def try_lock(
        self, provider: str, container_id: str, fingerprint: str, token: str, ttl_ms: int
    ) -> bool:
        """Take the cross-replica fetch lock; it lapses after ``ttl_ms`` if its holder dies."""
        key = self.keys.lock(provider, container_id, fingerprint)
        return bool(await self.call(lambda: self.redis.set(key, token, nx=True, px=ttl_ms)))

    async def unlock(self, provider: str, container_id: str, fingerprint: str, token: str) -> None:
        """Release the lock if it is still ours."""
        key = self.keys.lock(provider, container_id, fingerprint)
        await self.call(lambda: self._unlock(keys=[key], args=[token]))
