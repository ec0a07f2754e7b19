"""The cache store: records, grants, locks, failure markers and the due set in Redis.

A hit that misses the process's own copy is one ``MGET`` (record, grant, cached 404 and failure
marker share a slot: cluster-safe). Every method raises :class:`StoreUnavailable` when Redis
fails; a Redis that times out is taken as hung and skipped (:class:`Breaker`) until it answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

from redis.exceptions import RedisClusterException, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from sidecar.announce import announce_delete, announce_record, announce_revoke
from sidecar.errors import StoreUnavailable
from sidecar.keys import KeySpace, member, parse_member
from sidecar.logs import Outage
from sidecar.policy import Policy
from sidecar.records import Record, decode_record, encode_record

__all__ = ["REDIS_ERRORS", "Breaker", "CacheStore", "Failure", "Lookup", "now_ms"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_UNLOCK = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""

# The upstream failed for a container: count it, double the back-off (ARGV[2] up to ARGV[3] ms).
# Stored as "count|until_ms|status|": the answer itself is its caller's alone, never kept.
_FAILED = """
local raw = redis.call('get', KEYS[1])
local count = 1
if raw then count = (tonumber(string.match(raw, '^(%d+)|')) or 0) + 1 end
local backoff = math.floor(math.min(tonumber(ARGV[3]), tonumber(ARGV[2]) * 2 ^ (count - 1)))
local until_ms = tonumber(ARGV[1]) + backoff
redis.call('set', KEYS[1], count .. '|' .. string.format('%d', until_ms) .. '|' .. ARGV[4] ..
  '|', 'PX', backoff + tonumber(ARGV[5]))
return backoff
"""

# Store a record unless its container was deleted lately (KEYS[2], the tombstone): a fill begun
# before a delete must never land after it (container ids are never reused). KEYS: record,
# tombstone, failure marker, [grant]. ARGV: data, retention ms, '1' to clear the failure marker,
# channel ('' on a cluster: the caller publishes), announcement, [grant expiry, grant ms].
_SAVE = """
if redis.call('exists', KEYS[2]) == 1 then return 0 end
redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[3] == '1' then redis.call('del', KEYS[3]) end
if KEYS[4] then redis.call('set', KEYS[4], ARGV[6], 'PX', ARGV[7]) end
if ARGV[4] ~= '' then redis.call('publish', ARGV[4], ARGV[5]) end
return 1
"""
#: How long a deleted container's tombstone keeps fills out: longer than any fill takes.
GONE_MS = 600_000

# The due set: one entry per container refresh-ahead may renew, scored ``due_ms * DUE_MARKS +
# mark``: when its record goes stale (unix ms) and when a caller last read it (the read's
# one-second epoch modulo DUE_MARKS - 1, plus one; 0: none known). One sorted set instead of a
# due set and a read set saves ~130 bytes a container. Scores stay exact doubles until 2109; a
# mark repeats after 34 minutes, and an unread entry leaves at its first due time past the hot
# window, so a stale mark costs at most one refresh too many.
DUE_MARKS = 2048
READ_EPOCH_MS = 1000

# Set due times: ARGV[1] now's mark, then (member, due_ms, how) triples. How: 'r' a caller's read
# (now's mark); 'k' a refresh (the entry keeps its mark, else takes now's); 'g' a rescheduled
# claim (only to an entry still there: one deleted meanwhile stays out).
_DUE_LUA = f"local marks = {DUE_MARKS}\n"
_SET_DUE = (
    _DUE_LUA
    + """
for i = 2, #ARGV, 3 do
  local mark, how = tonumber(ARGV[1]), ARGV[i + 2]
  local score = how ~= 'r' and redis.call('zscore', KEYS[1], ARGV[i])
  if score then mark = tonumber(score) % marks end
  if score or how ~= 'g' then
    redis.call('zadd', KEYS[1], tonumber(ARGV[i + 1]) * marks + mark, ARGV[i])
  end
end
return 1
"""
)

# Note reads: ARGV[1] the mark, then members; only entries in the set (pollable ones) change.
_MARK_READ = (
    _DUE_LUA
    + """
local mark = tonumber(ARGV[1])
for i = 2, #ARGV do
  local score = redis.call('zscore', KEYS[1], ARGV[i])
  if score then
    score = tonumber(score)
    redis.call('zadd', KEYS[1], score - score % marks + mark, ARGV[i])
  end
end
return 1
"""
)

# Claim members whose due time is still ARGV[i + 1]: due at ARGV[1] now, read marks kept.
_CLAIM_DUE = (
    _DUE_LUA
    + """
local claimed = {}
for i = 2, #ARGV, 2 do
  local score = redis.call('zscore', KEYS[1], ARGV[i])
  if score then
    score = tonumber(score)
    local mark = score % marks
    if (score - mark) / marks == tonumber(ARGV[i + 1]) then
      redis.call('zadd', KEYS[1], tonumber(ARGV[1]) * marks + mark, ARGV[i])
      claimed[#claimed + 1] = ARGV[i]
    end
  end
end
return claimed
"""
)

# A stale read's claim: ARGV member, due_ms, until_ms, now, now's mark.
_CLAIM_REFRESH = (
    _DUE_LUA
    + """
local score = redis.call('zscore', KEYS[1], ARGV[1])
if score then
  score = tonumber(score)
  local held = (score - score % marks) / marks
  if held > tonumber(ARGV[2]) and held > tonumber(ARGV[4]) then return 0 end
end
redis.call('zadd', KEYS[1], tonumber(ARGV[3]) * marks + tonumber(ARGV[5]), ARGV[1])
return 1
"""
)

_RENEW_LOCK = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
return redis.call('pexpire', KEYS[1], ARGV[2])
"""

# Replace the value ARGV[1] by ARGV[2], keeping the key's expiry.
_SWAP = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('set', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"""

_SCRIPTS = {
    "unlock": _UNLOCK,
    "renew_lock": _RENEW_LOCK,
    "failed": _FAILED,
    "save": _SAVE,
    "set_due": _SET_DUE,
    "mark_read": _MARK_READ,
    "claim_due": _CLAIM_DUE,
    "claim_refresh": _CLAIM_REFRESH,
    "swap": _SWAP,
}


def read_mark(at_ms: int) -> int:
    """The due-set mark of a read at ``at_ms``."""
    return (at_ms // READ_EPOCH_MS) % (DUE_MARKS - 1) + 1


def read_by_ms(mark: int, now: int) -> int | None:
    """The latest time (unix ms) the read behind ``mark`` may have happened; None: no read."""
    if not mark:
        return None
    epoch = now // READ_EPOCH_MS
    return (epoch - (epoch - (mark - 1)) % (DUE_MARKS - 1) + 1) * READ_EPOCH_MS


#: What a Redis failure may raise (cluster client errors are not RedisErrors).
REDIS_ERRORS = (RedisError, RedisClusterException, OSError, TimeoutError)


def now_ms() -> int:
    """Wall-clock unix milliseconds (records are shared across machines)."""
    return time.time_ns() // 1_000_000


class Breaker:
    """Tracks Redis health; open (every caller skips Redis) while Redis is known to hang.

    A timeout opens it, and a background ``probe`` (a PING) tries every ``retry_after_s`` until
    Redis answers. A refused connection does not open it: retrying costs nothing, and on a
    cluster it concerns one node's slots only.
    """

    def __init__(
        self, retry_after_s: float, on_failure: Callable[[], object] | None = None
    ) -> None:
        self._retry_after_s = retry_after_s
        self._on_failure = on_failure
        self.probe: Callable[[], Awaitable[object]] | None = None
        self._open = False
        self._probing: asyncio.Task[None] | None = None
        self.outage = Outage(log, "redis", "serving without it (fail-open) until it recovers")

    @property
    def down(self) -> bool:
        """True while Redis is considered unavailable."""
        return self.outage.since is not None

    def check(self) -> None:
        """Raise StoreUnavailable while Redis is being skipped."""
        if self._open:
            raise StoreUnavailable("redis skipped: it timed out and has not answered since")

    def failure(self, exc: BaseException) -> None:
        """Record a failure; a timeout opens the breaker."""
        if self._on_failure is not None:
            self._on_failure()
        if isinstance(exc, (TimeoutError, RedisTimeoutError)) and not self._open:
            self._open = True
            self._start_probing()
        self.outage.failed(exc)

    def _start_probing(self) -> None:
        if self.probe is None or (self._probing is not None and not self._probing.done()):
            return
        try:
            self._probing = asyncio.get_running_loop().create_task(self._probe_until_back())
        except RuntimeError:  # no loop (a unit test's breaker): callers retry after the pause
            self._open = False

    async def _probe_until_back(self) -> None:
        assert self.probe is not None
        while self._open:
            await asyncio.sleep(self._retry_after_s)
            try:
                await self.probe()
            except REDIS_ERRORS:
                continue
            self._open = False
            self.success()

    def fail_open_seconds(self) -> float:
        """Seconds spent without Redis so far, the current outage included."""
        return self.outage.seconds()

    def success(self) -> None:
        """Record a success."""
        self.outage.recovered()

    async def close(self) -> None:
        """Stop probing."""
        if self._probing is not None:
            self._probing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probing


class Failure(NamedTuple):
    """The upstream failed for a container (``failures`` times in a row, last with ``status``):
    until ``until_ms`` nobody calls it again for it."""

    status: int
    until_ms: int
    failures: int

    @property
    def left_ms(self) -> int:
        """How long the back-off still runs."""
        return max(0, self.until_ms - now_ms())


def _parse_failure(raw: bytes | None) -> Failure | None:
    if raw is None:
        return None
    try:
        count, until, status = raw.split(b"|", 3)[:3]
        return Failure(int(status), int(until), int(count))
    except ValueError:
        return None


class Lookup(NamedTuple):
    """What one hit-path read found: the record, how long this credential may still see it
    (0: the upstream must answer it), its cached 404, and the container's failure marker."""

    record: Record | None
    grant_left_ms: int
    negative: Record | None
    failure: Failure | None = None

    @property
    def granted(self) -> bool:
        """The upstream answered this credential for this container within the grant TTL."""
        return self.grant_left_ms > 0


def _ms_left(value: bytes | None) -> int:
    """Grants and back-offs hold their expiry (unix ms): what is left of it."""
    if value is None:
        return 0
    try:
        return max(0, int(value) - now_ms())
    except ValueError:
        return 0


class CacheStore:
    """Records, grants, locks and failure markers in Redis (or the embedded fakeredis)."""

    def __init__(self, redis: Any, keys: KeySpace, breaker: Breaker) -> None:
        self.redis = redis
        self.keys = keys
        self.breaker = breaker
        breaker.probe = redis.ping
        self._scripts = {name: redis.register_script(text) for name, text in _SCRIPTS.items()}
        # Cluster pipelines refuse PUBLISH: announce with a command of its own there.
        self._cluster = hasattr(redis, "get_primaries")

    async def close(self) -> None:
        """Stop background work (the breaker's probe); the client is closed by its owner."""
        await self.breaker.close()

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

    async def _publish(self, pipe: Any, message: bytes) -> None:
        """Announce a change: in the pipeline, or (cluster) with a command of its own after."""
        if not self._cluster:
            pipe.publish(self.keys.changes, message)
            await pipe.execute()
            return
        await pipe.execute()
        await self.redis.execute_command("PUBLISH", self.keys.changes, message)

    async def lookup(self, provider: str, container_id: str, fingerprint: str) -> Lookup:
        """The cached record, whether this credential may see it, its cached 404, a failure."""
        keys = self.keys
        raw, grant, negative, failing = await self.call(
            lambda: self.redis.mget(
                keys.record(provider, container_id),
                keys.grant(provider, container_id, fingerprint),
                keys.negative(provider, container_id, fingerprint),
                keys.failing(provider, container_id),
            )
        )
        return Lookup(
            decode_record(raw) if raw is not None else None,
            _ms_left(grant),
            decode_record(negative) if negative is not None else None,
            _parse_failure(failing),
        )

    async def save(
        self,
        record: Record,
        policy: Policy,
        *,
        fingerprint: str | None = None,
        grant_ms: int = 0,
        read: bool = False,
    ) -> bool:
        """Store ``record`` as long as ``policy`` may serve it (False: the container was deleted
        lately), grant it to ``fingerprint``, clear its failure marker, (re)schedule its refresh
        and announce it to the other processes."""
        name = member(record.provider, record.container_id)
        due_ms = None if record.inline_refresh else policy.due_ms(record)
        scores = [] if due_ms is None else [(name, due_ms, "r" if read else "k")]
        grant = () if fingerprint is None else (fingerprint, now_ms() + grant_ms, grant_ms)
        save = (record, encode_record(record), True, grant)
        stored = await self._write(policy, [save], scores, [] if scores else [name])
        return stored[0]

    async def _write(
        self,
        policy: Policy,
        saves: list[tuple[Record, bytes, bool, tuple[str, int, int] | tuple[()]]],
        scores: list[tuple[str, int, str]],
        dropped: list[str],
    ) -> list[bool]:
        """Run ``_SAVE`` for each ``(record, data, clear_failing, grant)``, set ``scores`` in the
        due set (as ``_SET_DUE`` reads them) and take ``dropped`` out of it: in one pipeline, or
        on a cluster (no scripts or PUBLISH in its pipelines) one command after another."""
        keys = self.keys

        def save_in(client: Any, save: tuple[Record, bytes, bool, Any]) -> Any:
            record, data, clear_failing, grant = save
            provider, cid = record.provider, record.container_id
            names = [keys.record(provider, cid), keys.gone(provider, cid)]
            names.append(keys.failing(provider, cid))
            channel = "" if self._cluster else keys.changes
            args: list[Any] = [data, policy.retention_ms(record), "1" if clear_failing else "0"]
            args += [channel, announce_record(data) if channel else b""]
            if grant:
                fingerprint, expiry, grant_ms = grant
                names.append(keys.grant(provider, cid, fingerprint))
                args += [expiry, grant_ms]
            return self._scripts["save"](keys=names, args=args, client=client)

        async def op() -> list[bool]:
            if self._cluster:
                client = self.redis
                stored = [
                    bool(ok) for ok in await asyncio.gather(*(save_in(client, s) for s in saves))
                ]
                if scores:
                    await self._set_due(client, scores)
                if dropped:
                    await client.zrem(keys.due, *dropped)
                published = [save[1] for save, ok in zip(saves, stored, strict=True) if ok]
                await asyncio.gather(
                    *(
                        client.execute_command("PUBLISH", keys.changes, announce_record(data))
                        for data in published
                    )
                )
                return stored
            async with self.redis.pipeline(transaction=False) as pipe:
                for save in saves:
                    await save_in(pipe, save)
                if scores:
                    await self._set_due(pipe, scores)
                if dropped:
                    pipe.zrem(keys.due, *dropped)
                return [bool(ok) for ok in (await pipe.execute())[: len(saves)]]

        return await self.call(op)

    async def save_negative(self, record: Record, fingerprint: str, ttl_ms: int) -> None:
        """Cache a 404 for one credential."""
        key = self.keys.negative(record.provider, record.container_id, fingerprint)
        await self.call(lambda: self.redis.set(key, encode_record(record), px=ttl_ms))

    async def delete(self, provider: str, container_id: str, *, gone: bool = False) -> None:
        """Forget a container everywhere; ``gone``: it was deleted upstream, so no fill lands
        for ``GONE_MS``."""
        keys, name = self.keys, member(provider, container_id)

        async def op() -> None:
            async with self.redis.pipeline(transaction=False) as pipe:
                if gone:
                    pipe.set(keys.gone(provider, container_id), now_ms(), px=GONE_MS)
                pipe.delete(keys.record(provider, container_id))
                pipe.delete(keys.failing(provider, container_id))
                pipe.zrem(keys.due, name)
                await self._publish(pipe, announce_delete(name))

        await self.call(op)

    async def purge_cache_id(self, cache_id: str) -> tuple[str, str] | None:
        """Drop the entry behind a public cache id; its ``(provider, container_id)``, if any."""
        raw = await self.call(lambda: self.redis.get(self.keys.record_of(cache_id)))
        record = decode_record(raw) if raw is not None else None
        if record is None:
            return None
        await self.delete(record.provider, record.container_id)
        return record.provider, record.container_id

    async def count_records(self, limit: int = 100_000) -> tuple[int, bool]:
        """How many records are cached (scanning at most ``limit`` keys); and if exactly."""

        async def op() -> tuple[int, bool]:
            count = 0
            async for _ in self.redis.scan_iter(match=self.keys.records, count=1000):
                count += 1
                if count >= limit:
                    return count, False
            return count, True

        return await self.call(op)

    async def upstream_failed(
        self, provider: str, container_id: str, status: int, policy: Policy, floor_ms: int = 0
    ) -> int:
        """Start the container's back-off after an upstream failure (:meth:`Policy.backoff_ms`,
        at least ``floor_ms``); its length (ms). Until it ends no sidecar or worker calls the
        upstream for the container."""
        key = self.keys.failing(provider, container_id)
        base_ms, cap_ms, keep_ms = policy.backoff(floor_ms)
        args = [now_ms(), base_ms, cap_ms, status, keep_ms]
        return int(await self.call(lambda: self._scripts["failed"](keys=[key], args=args)))

    async def set_backoff(self, provider: str, backoff_ms: int) -> None:
        """Hold off refreshes from ``provider`` (a 429) for ``backoff_ms``."""
        until = now_ms() + backoff_ms
        key = self.keys.backoff(provider)
        await self.call(lambda: self.redis.set(key, until, px=max(1, backoff_ms)))

    async def backoff_left_ms(self, provider: str) -> int:
        """How long refreshes from ``provider`` must still wait (0: go ahead)."""
        return _ms_left(await self.call(lambda: self.redis.get(self.keys.backoff(provider))))

    async def remove_retired(self) -> None:
        """Delete the keys earlier versions kept and this one does not (``KeySpace.retired``)."""
        await self.call(lambda: self.redis.delete(*self.keys.retired))

    async def mark_read(self, names: list[str], at_ms: int) -> None:
        """Note that these containers were read (refresh-ahead keeps them fresh)."""
        mark_read = self._scripts["mark_read"]
        args = [read_mark(at_ms), *names]
        await self.call(lambda: mark_read(keys=[self.keys.due], args=args))

    async def _set_due(self, client: Any, entries: list[tuple[str, int, str]]) -> None:
        """Set due times: ``(member, due_ms, how)``, how as ``_SET_DUE`` reads it."""
        set_due = self._scripts["set_due"]
        args: list[str | int] = [read_mark(now_ms())]
        for entry in entries:
            args += entry
        await set_due(keys=[self.keys.due], args=args, client=client)

    async def due_for_refresh(
        self, horizon_ms: int, read_since_ms: int, limit: int = 10_000
    ) -> list[tuple[str, str, int]]:
        """``(provider, container_id, due_ms)`` of entries due by ``horizon_ms`` and read since
        ``read_since_ms``. Stale entries nobody read leave the index (a read puts them back)."""
        keys = self.keys

        async def op() -> list[tuple[str, str, int]]:
            top = horizon_ms * DUE_MARKS + DUE_MARKS - 1
            due = await self.redis.zrangebyscore(
                keys.due, "-inf", top, start=0, num=limit, withscores=True
            )
            now = now_ms()
            read, cold = [], []
            for name, score in due:
                due_ms, mark = divmod(int(score), DUE_MARKS)
                read_by = read_by_ms(mark, now)
                if read_by is not None and read_by > read_since_ms:
                    read.append((*parse_member(name), due_ms))
                elif due_ms < now:
                    cold.append(name)
            if cold:
                await self.redis.zrem(keys.due, *cold)
            return read

        return await self.call(op)

    async def revoke(self, provider: str, container_id: str, fingerprint: str) -> None:
        """Drop a credential's grant (the upstream refused it); other processes drop theirs."""
        keys = self.keys

        async def op() -> None:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(keys.grant(provider, container_id, fingerprint))
                await self._publish(
                    pipe, announce_revoke(member(provider, container_id), fingerprint)
                )

        await self.call(op)

    async def try_lock(
        self, provider: str, container_id: str, fingerprint: str, token: str, ttl_ms: int
    ) -> bool:
        """Take the cross-replica fetch lock; it lapses after ``ttl_ms`` if its holder dies."""
        key = self.keys.lock(provider, container_id, fingerprint)
        return bool(await self.call(lambda: self.redis.set(key, token, nx=True, px=ttl_ms)))

    async def renew_lock(
        self, provider: str, container_id: str, fingerprint: str, token: str, ttl_ms: int
    ) -> bool:
        """Extend the lock's lease if it is still ours; False if it is not."""
        key = self.keys.lock(provider, container_id, fingerprint)
        renew = self._scripts["renew_lock"]
        return bool(await self.call(lambda: renew(keys=[key], args=[token, ttl_ms])))

    async def unlock(self, provider: str, container_id: str, fingerprint: str, token: str) -> None:
        """Release the lock if it is still ours."""
        key = self.keys.lock(provider, container_id, fingerprint)
        await self.call(lambda: self._scripts["unlock"](keys=[key], args=[token]))

    # -- The workers' batch work (per-key commands and single-key scripts: cluster-safe). A
    # -- refresh claims its due-set entry by moving its score past the planning horizon until
    # -- the refreshed record's save puts it back, so no other refresh starts meanwhile.

    async def read_many(
        self, names: list[tuple[str, str]]
    ) -> list[tuple[bytes | None, Failure | None]]:
        """The stored bytes (None: not cached) and failure marker of each record."""
        keys: list[str] = []
        for provider, cid in names:
            keys += (self.keys.record(provider, cid), self.keys.failing(provider, cid))

        async def op() -> list[bytes | None]:
            if not self._cluster:
                return list(await self.redis.mget(keys)) if keys else []
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.get(key)
                return list(await pipe.execute())

        found = await self.call(op)
        pairs = zip(found[::2], found[1::2], strict=True)
        return [(raw, _parse_failure(failing)) for raw, failing in pairs]

    async def save_many(
        self,
        records: list[Record],
        policy: Policy,
        due: dict[str, int | None] | None = None,
        failing: set[str] | None = None,
    ) -> None:
        """Store refreshed records as :meth:`save` does (no grants), in one pipeline; ``due``
        reschedules other entries' claims (None: out of the set); only the failure markers of
        the ``failing`` members (None: all) are cleared."""
        given = (due or {}).items()
        scores = {name: (name, due_ms, "g") for name, due_ms in given if due_ms is not None}
        dropped = [name for name, due_ms in given if due_ms is None]
        saves: list[tuple[Record, bytes, bool, tuple[()]]] = []
        for record in records:
            name = member(record.provider, record.container_id)
            due_ms = None if record.inline_refresh else policy.due_ms(record)
            if due_ms is None:
                dropped.append(name)
            else:
                scores[name] = (name, due_ms, "k")
            clear = failing is None or name in failing
            saves.append((record, encode_record(record), clear, ()))
        if saves or scores or dropped:
            await self._write(policy, list(saves), list(scores.values()), dropped)

    async def claim_due(self, entries: list[tuple[str, int]], until_ms: int) -> list[str]:
        """Claim (or renew the claim of) members whose due time is still the one given: due at
        ``until_ms`` now, read marks kept. The members claimed (the others changed meanwhile)."""
        claim = self._scripts["claim_due"]
        args: list[str | int] = [until_ms]
        for name, score in entries:
            args += [name, score]
        claimed = await self.call(lambda: claim(keys=[self.keys.due], args=args))
        return [n.decode() if isinstance(n, bytes) else str(n) for n in claimed]

    async def claim_refresh(
        self, provider: str, container_id: str, due_ms: int, until_ms: int
    ) -> bool:
        """Claim a container's due entry until ``until_ms`` for a stale read's refresh; False if
        another refresh holds it or made it fresh (its score is past both ``due_ms`` and now: a
        lapsed claim holds nothing). Marked read now, so refresh-ahead redoes a lost refresh."""
        claim = self._scripts["claim_refresh"]
        now = now_ms()
        args = [member(provider, container_id), due_ms, until_ms, now, read_mark(now)]
        return bool(await self.call(lambda: claim(keys=[self.keys.due], args=args)))

    async def leave_to_callers(self, read: bytes, record: Record) -> bool:
        """Replace a record still stored as ``read`` by ``record`` (same expiry) and drop it from
        the refresh-ahead index: for records the workers cannot refresh. False if it changed."""
        keys, provider, cid = self.keys, record.provider, record.container_id
        name, data = member(provider, cid), encode_record(record)
        swap = self._scripts["swap"]

        async def op() -> bool:
            if not await swap(keys=[keys.record(provider, cid)], args=[read, data]):
                return False
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.zrem(keys.due, name)
                await self._publish(pipe, announce_record(data))
            return True

        return await self.call(op)
