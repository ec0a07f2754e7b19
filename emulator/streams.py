"""How the emulator's streams go out: server-sent events paced by a delay or by the test.

A stream's events leave one at a time, ``delay_ms`` apart; a test may instead ``pace`` them and
``release`` each next event itself, so that it can check an event reached its client before the
emulator sent the following one. A client that goes away mid-stream is noticed at the next event
(the write, or the closed transport, says so): the stream stops and counts as cancelled, which is
what a test of a proxy asserts to know the upstream saw the disconnect.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from emulator.faults import STOPPING, pause

__all__ = ["Streams", "send_events"]


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

    async def next_event(self, request: web.Request) -> bool:
        """Wait until the next event may go; True if the server is stopping."""
        if not self._paced:
            return self.delay_ms > 0 and await pause(request, self.delay_ms / 1000)
        stopping = request.app[STOPPING]
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


def _gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


async def send_events(
    request: web.Request, streams: Streams, route: str, events: Iterable[bytes]
) -> web.StreamResponse:
    """Answer ``text/event-stream`` with ``events`` (each a whole ``...\\n\\n`` frame), paced;
    stop, counted as cancelled, once the client has gone."""
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    try:
        for index, event in enumerate(events):
            if index and await streams.next_event(request):
                return response  # the server is stopping
            if _gone(request):
                streams.note(streams.cancelled, route)
                return response
            await response.write(event)
            streams.note(streams.sent, route)
        await response.write_eof()
    except ConnectionResetError:  # aiohttp's "Cannot write to closing transport" is one
        streams.note(streams.cancelled, route)
        return response
    except asyncio.CancelledError:
        # A server that cancels handlers when their client goes away (handler_cancellation).
        streams.note(streams.cancelled, route)
        raise
    streams.note(streams.completed, route)
    return response
