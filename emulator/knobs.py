"""The emulator's knobs: its clock, latency, injected faults, request counters and log.

The base of :class:`~emulator.state.EmulatorState`; the control API turns them.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

from emulator.schema import mask_key

__all__ = ["ROUTE_NAMES", "Fault", "FaultKind", "Knobs"]

ROUTE_NAMES = (
    "create", "list", "retrieve", "delete",
    "file_create", "file_list", "file_retrieve", "file_content", "file_delete",
    "upload", "upload_list", "upload_retrieve", "upload_content", "upload_delete",
    "models", "model", "chat", "responses", "transcription", "realtime",
)  # fmt: skip
FaultKind = Literal["status", "timeout", "malformed", "reset", "hangup"]
# Request headers that carry a credential: recorded masked, never whole.
_SECRET_HEADERS = frozenset({"authorization", "x-api-key", "x-goog-api-key", "x-bf-vk",
                             "x-bf-direct-key", "openai-api-key"})  # fmt: skip
_LOGGED_REQUESTS = 200
_KEY_PROTOCOL = "openai-insecure-api-key."


class Fault(msgspec.Struct, kw_only=True):
    """A failure injected into matching API requests, ``count`` times or until cleared."""

    id: int = 0
    kind: FaultKind
    status: int = 500
    retry_after_s: float | None = None
    route: str = "*"
    container_id: str | None = None
    count: int | None = None


def _mask_header(name: str, value: str) -> str:
    if name.lower() == "sec-websocket-protocol":
        # A browser sends its key as a subprotocol: openai-insecure-api-key.<key>.
        parts = (part.strip() for part in value.split(","))
        return ", ".join(
            _KEY_PROTOCOL + mask_key(p.removeprefix(_KEY_PROTOCOL))
            if p.startswith(_KEY_PROTOCOL)
            else p
            for p in parts
        )
    if name.lower() not in _SECRET_HEADERS:
        return value
    scheme, sep, token = value.partition(" ")
    if sep and scheme.lower() in ("bearer", "basic"):
        return f"{scheme} {mask_key(token.strip())}"
    return mask_key(value)


class Knobs:
    """What tests, benchmarks and demos turn, beside the API itself."""

    def __init__(self, latency_ms: float) -> None:
        self.latency_ms = latency_ms
        self._offset_s = 0.0
        self._frozen_at: float | None = None
        self._seq = 0
        self._faults: list[Fault] = []
        self._calls: Counter[str] = Counter()
        self._retrieves: Counter[str] = Counter()
        self._requests: deque[dict[str, Any]] = deque(maxlen=_LOGGED_REQUESTS)

    def now(self) -> int:
        """The emulator's clock in unix seconds: wall time (or the instant it was frozen at)
        plus every ``advance_clock``."""
        base = self._frozen_at if self._frozen_at is not None else time.time()
        return int(base + self._offset_s)

    def advance_clock(self, seconds: float) -> int:
        """Move the clock forward; answer the new time."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self._offset_s += seconds
        return self.now()

    def freeze_clock(self, frozen: bool = True) -> int:
        """Stop the clock (it then moves only by ``advance_clock``), or let it run again from
        where it stands; answer the time."""
        wall = time.time()
        if frozen and self._frozen_at is None:
            self._frozen_at = wall
        elif not frozen and self._frozen_at is not None:
            self._offset_s += self._frozen_at - wall
            self._frozen_at = None
        return self.now()

    @property
    def clock_frozen(self) -> bool:
        return self._frozen_at is not None

    def set_latency(self, ms: float) -> None:
        """Delay every API answer by ``ms`` from now on."""
        if ms < 0:
            raise ValueError("latency must be >= 0")
        self.latency_ms = ms

    def count(self, route: str, container_id: str | None) -> None:
        """Record one API request as it arrives."""
        self._calls[route] += 1
        if route == "retrieve" and container_id is not None:
            self._retrieves[container_id] += 1

    def record_request(
        self, route: str, method: str, path_qs: str, headers: Mapping[str, str]
    ) -> None:
        """Keep what a request carried (credentials masked), for tests of what a proxy forwards."""
        self._requests.append({
            "route": route,
            "method": method,
            "path": path_qs,
            "headers": {name.lower(): _mask_header(name, value) for name, value in headers.items()},
        })  # fmt: skip

    def requests(self) -> list[dict[str, Any]]:
        """The latest API requests (up to 200), oldest first."""
        return list(self._requests)

    def stats(self) -> dict[str, Any]:
        """Requests seen since start or the last reset, by route and retrieves by container."""
        return {
            "total": self._calls.total(),
            "calls": dict(self._calls),
            "retrieve_by_container": dict(self._retrieves),
        }

    def reset_stats(self) -> None:
        """Forget the counted (and recorded) requests."""
        self._calls.clear()
        self._retrieves.clear()
        self._requests.clear()

    def add_fault(
        self,
        kind: FaultKind,
        *,
        status: int = 500,
        retry_after_s: float | None = None,
        route: str = "*",
        container_id: str | None = None,
        count: int | None = None,
    ) -> Fault:
        """Make matching requests fail; ``count=None`` keeps the fault until cleared."""
        if route != "*" and route not in ROUTE_NAMES:
            raise ValueError(f"unknown route {route!r}: use '*' or one of {', '.join(ROUTE_NAMES)}")
        if not 100 <= status <= 599:
            raise ValueError("status must be an HTTP status code")
        if count is not None and count < 1:
            raise ValueError("count must be >= 1 (or null for until cleared)")
        self._seq += 1
        fault = Fault(
            id=self._seq, kind=kind, status=status, retry_after_s=retry_after_s,
            route=route, container_id=container_id, count=count,
        )  # fmt: skip
        self._faults.append(fault)
        return fault

    def faults(self) -> list[Fault]:
        """The faults still armed, oldest first."""
        return list(self._faults)

    def clear_faults(self) -> int:
        """Disarm every fault; answer how many there were."""
        cleared = len(self._faults)
        self._faults.clear()
        return cleared

    def take_fault(self, route: str, container_id: str | None) -> Fault | None:
        """The first fault matching this request, used up by one if it has a count."""
        for fault in self._faults:
            if fault.route not in ("*", route):
                continue
            if fault.container_id is not None and fault.container_id != container_id:
                continue
            if fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)
            return fault
        return None
