"""In-process machinery: shared calls, owned tasks, counted connections, bounded maps, flushes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from sidecar.errors import Overloaded

__all__ = ["BackgroundTasks", "ConnectionSlots", "SingleFlight", "flush_every", "remember"]

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


def remember(
    table: dict[K, T], key: K, value: T, limit: int, stale: Callable[[T], bool] | None = None
) -> None:
    """Set ``table[key]`` as its newest entry, keeping at most ``limit`` entries: when it is
    full, the ``stale`` ones go first, then the oldest."""
    table.pop(key, None)
    if len(table) >= limit and stale is not None:  # a scan, only where staleness can be told
        for old in [k for k, v in table.items() if stale(v)]:
            del table[old]
    while len(table) >= limit:
        del table[next(iter(table))]
    table[key] = value


class SingleFlight(Generic[K, T]):
    """Coalesces concurrent calls per key; the shared call is a task of its own, so a caller
    that is cancelled never cancels it."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Task[T]] = {}

    def __len__(self) -> int:
        return len(self._running)

    def __contains__(self, key: K) -> bool:
        return key in self._running

    async def run(self, key: K, call: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """The result of the call running for ``key`` (starting it if none), and whether joined."""
        task = self._running.get(key)
        joined = task is not None
        if task is None:
            task = asyncio.ensure_future(call())
            self._running[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return await asyncio.shield(task), joined

    def _finished(self, key: K, task: asyncio.Task[T]) -> None:
        if self._running.get(key) is task:
            del self._running[key]
        if not task.cancelled():
            task.exception()  # retrieved: nobody may be left waiting for it

    async def close(self) -> None:
        """Cancel and await the calls still running."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class BackgroundTasks:
    """Owns fire-and-forget tasks so that each is cancelled and awaited at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Awaitable[object]) -> None:
        """Run ``work`` in the background."""
        task: asyncio.Task[object] = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background task failed: %r", task.exception())

    async def close(self) -> None:
        """Cancel and await every task still running."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ConnectionSlots:
    """A pool's connections, counted: waiting for one past ``wait_s`` is the sidecar's own
    exhaustion (``Overloaded``, a 503), never taken for an upstream failure."""

    def __init__(self, limit: int, wait_s: float, what: str) -> None:
        self._free = asyncio.Semaphore(limit)
        self._wait_s = wait_s
        self._what = what

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """One connection for the block's duration."""
        try:
            async with asyncio.timeout(self._wait_s):
                await self._free.acquire()
        except TimeoutError:
            raise Overloaded(
                f"every {self._what} connection of this sidecar stayed busy for {self._wait_s:g}s"
            ) from None
        try:
            yield
        finally:
            self._free.release()


async def flush_every(interval_s: float, flush: Callable[[], Awaitable[None]]) -> None:
    """Run ``flush`` every interval until cancelled, then once more."""
    try:
        while True:
            await asyncio.sleep(interval_s)
            await flush()
    finally:
        await asyncio.shield(flush())
