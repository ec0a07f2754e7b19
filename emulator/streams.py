"""The pace of the emulator's streams, and what they sent (pure asyncio, like the state).

A stream's events leave one at a time, ``delay_ms`` apart; a test may instead ``pace`` them and
``release`` each next event itself, so that it can check an event reached its client before the
emulator sent the following one. A stream whose client went away counts as cancelled, which is
what a test of a proxy asserts to know the upstream saw the disconnect; tests wait on the counts
with :meth:`Streams.wait_until`.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

__all__ = ["Streams"]


class Streams:
    """The pace of streams, and what they sent, lost and heard (tests wait on it)."""

    def __init__(self, delay_ms: float) -> None:
        self.delay_ms = delay_ms
        self._paced = False
        self._permits = 0
        self.sent: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.cancelled: Counter[str] = Counter()
        # Closes of realtime sessions: who closed ("client" or "server"), code and reason.
        self.closes: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    def set_delay(self, ms: float) -> None:
        """Space every stream's events ``ms`` apart from now on."""
        if ms < 0:
            raise ValueError("delay_ms must be >= 0")
        self.delay_ms = ms

    def pace(self, paced: bool = True) -> None:
        """Hold each stream's next event until :meth:`release` (True), or send on (False)."""
        self._paced = paced
        self._permits = 0
        self.changed()

    def release(self, events: int = 1) -> None:
        """Let paced streams send ``events`` more events (between them)."""
        if not self._paced:
            raise ValueError("streams are not paced")
        self._permits += events
        self.changed()

    async def next_event(self, stopping: asyncio.Event) -> bool:
        """Wait until the next event may go; True if the server is stopping."""
        if not self._paced:
            try:
                async with asyncio.timeout(self.delay_ms / 1000):
                    await stopping.wait()
            except TimeoutError:
                return False
            return True
        await self.wait_until(lambda s: stopping.is_set() or not s._paced or s._permits > 0)
        if stopping.is_set():
            return True
        if self._paced:
            self._permits -= 1
        return False

    def note(self, counter: Counter[str], route: str) -> None:
        """Count a stream event in ``counter`` and wake whoever waits on the counts."""
        counter[route] += 1
        self.changed()

    def changed(self) -> None:
        """Wake whoever waits in :meth:`wait_until`."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[Streams], bool]) -> None:
        """Return once ``predicate(self)`` holds (the caller bounds the wait)."""
        while not predicate(self):
            await self._changed.wait()

    def stats(self) -> dict[str, Any]:
        """Events sent, streams completed and cancelled, by route; realtime closes."""
        return {
            "delay_ms": self.delay_ms,
            "paced": self._paced,
            "sent": dict(self.sent),
            "completed": dict(self.completed),
            "cancelled": dict(self.cancelled),
            "closes": list(self.closes),
        }

    def reset(self) -> None:
        """Forget what was counted (the pace stays)."""
        for counter in (self.sent, self.completed, self.cancelled):
            counter.clear()
        self.closes.clear()
        self.changed()
