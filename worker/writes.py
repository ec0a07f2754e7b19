"""Writes behind the refreshes: records and due-set scores saved in pipelines, a few ms apart."""

from __future__ import annotations

import asyncio

from sidecar.errors import StoreUnavailable
from sidecar.flight import remember
from sidecar.keys import member
from sidecar.policy import Policy
from sidecar.records import Record
from sidecar.store import CacheStore

__all__ = ["WriteBehind"]


#: Reschedules waiting for Redis, at most (the oldest dropped past it: their claims lapse).
_MAX_PENDING_RESCHEDULES = 100_000
_RETRY_S = 1.0


class WriteBehind:
    """Saves refreshed records and reschedules claims in pipelines (whatever is ready within
    ``delay_s`` of the first goes together); each call answers whether its write succeeded.

    A reschedule that met a Redis outage is retried every second: a claim outliving its refresh
    would stop every other refresh of its container, leaving a hot container stale."""

    def __init__(self, store: CacheStore, policy: Policy, delay_s: float = 0.005) -> None:
        self._store = store
        self._policy = policy
        self._delay_s = delay_s
        self._records: list[Record] = []
        self._due: dict[str, int | None] = {}
        self._failing: set[str] = set()
        self._flushed: asyncio.Future[bool] | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None

    async def save(self, record: Record, failing: bool) -> bool:
        """Store a refreshed record (as ``CacheStore.save``, without grants); ``failing``: its
        container has a failure marker to clear."""
        self._records.append(record)
        if failing:
            self._failing.add(member(record.provider, record.container_id))
        return await asyncio.shield(self._next_flush())

    async def reschedule(self, provider: str, container_id: str, due_ms: int | None) -> bool:
        """Put a claimed entry back in the due set at ``due_ms`` (its refresh did not happen),
        or take it out (None: there is nothing for the workers to renew)."""
        self._due[member(provider, container_id)] = due_ms
        return await asyncio.shield(self._next_flush())

    def _next_flush(self) -> asyncio.Future[bool]:
        if self._flushed is None:
            self._flushed = asyncio.get_running_loop().create_future()
            task = asyncio.ensure_future(self._flush(self._flushed))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)
        return self._flushed

    async def _flush(self, done: asyncio.Future[bool]) -> None:
        try:
            await asyncio.sleep(self._delay_s)
            records, due, failing = self._records, self._due, self._failing
            self._records, self._due, self._failing, self._flushed = [], {}, set(), None
            await self._store.save_many(records, self._policy, due, failing)
            done.set_result(True)
        except StoreUnavailable:
            for name, due_ms in due.items():
                if name not in self._due:  # a later reschedule of it holds
                    remember(self._due, name, due_ms, _MAX_PENDING_RESCHEDULES)
            if self._due and self._retry is None:
                self._retry = asyncio.get_running_loop().call_later(_RETRY_S, self._retry_due)
            done.set_result(False)
        except Exception as exc:  # a bug: every waiter raises it
            done.set_exception(exc)
        finally:
            if not done.done():  # cancelled (shutdown): the waiters are being cancelled too
                done.cancel()

    def _retry_due(self) -> None:
        self._retry = None
        if self._due:
            self._next_flush()

    async def close(self) -> None:
        """Let the flushes under way finish (claims still waiting for Redis lapse by
        themselves)."""
        if self._retry is not None:
            self._retry.cancel()
        await asyncio.gather(*self._flushes, return_exceptions=True)
