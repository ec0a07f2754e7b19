"""The emulator's control API under ``/_emulator``: stats, clock, latency, faults, overrides.

No authentication: it is for the tests, benchmarks and demos that drive the emulator.

- ``GET /_emulator/healthz``; ``GET /_emulator/stats``; ``POST /_emulator/stats/reset``
- ``POST /_emulator/clock`` ``{"advance_s": 90}`` and/or ``{"frozen": true}`` (a frozen clock
  moves only when advanced; ``false`` lets it run on from there); ``POST /_emulator/latency``
  ``{"ms": 25}``
- ``GET /_emulator/requests``: the latest API requests (route, method, path and query, headers
  with credentials masked), for tests of what a proxy forwards; cleared with the stats
- ``GET|POST|DELETE /_emulator/faults``: ``{"kind": "status"|"timeout"|"malformed"|"reset"|
  "hangup", "status": 503, "retry_after_s": 2, "route": "retrieve"|"*", "container_id": ...,
  "count": 1}``. "reset" drops the connection mid-answer, which every client sees; "hangup"
  closes it before any answer, which aiohttp's client retries once by itself (RFC 9112 9.3.1).
- ``GET /_emulator/streams``: events sent, streams completed and cancelled by route, realtime
  closes; ``POST /_emulator/streams`` ``{"delay_ms": 50}`` spaces stream events,
  ``{"paced": true}`` holds each next event until ``{"release": 1}``
- ``POST /_emulator/containers/{id}/touch``; ``PATCH /_emulator/containers/{id}`` with fields to
  overwrite (``status`` sticks until set to null, ``last_active_at``, ``created_at``, ...).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from emulator.knobs import FaultKind
from emulator.schema import ApiError
from emulator.state import EmulatorState

__all__ = ["routes"]

_encoder = msgspec.json.Encoder()


class _Clock(msgspec.Struct, forbid_unknown_fields=True):
    advance_s: float = 0.0
    frozen: bool | None = None


class _Latency(msgspec.Struct):
    ms: float


class _StreamsBody(msgspec.Struct, forbid_unknown_fields=True):
    delay_ms: float | None = None
    paced: bool | None = None
    release: int = 0


class _FaultBody(msgspec.Struct, kw_only=True):
    kind: FaultKind
    status: int = 500
    retry_after_s: float | None = None
    route: str = "*"
    container_id: str | None = None
    count: int | None = None


_clock_decoder = msgspec.json.Decoder(_Clock)
_latency_decoder = msgspec.json.Decoder(_Latency)
_fault_decoder = msgspec.json.Decoder(_FaultBody)
_streams_decoder = msgspec.json.Decoder(_StreamsBody)
_fields_decoder = msgspec.json.Decoder(dict[str, Any])
Control = Callable[[EmulatorState, web.Request], Awaitable[object]]


def _json(payload: object, status: int = 200) -> web.Response:
    body = _encoder.encode(payload)
    return web.Response(body=body, status=status, content_type="application/json")


def _control(state: EmulatorState, action: Control) -> Handler:
    """A control endpoint: no auth, JSON in and out, bad input answered 400."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return _json(await action(state, request))
        except ApiError as exc:
            return _json(exc.envelope(), exc.status)
        except (msgspec.DecodeError, ValueError) as exc:
            return _json({"error": {"message": str(exc)}}, 400)

    return handle


async def _stats(state: EmulatorState, request: web.Request) -> object:
    return state.stats()


async def _reset_stats(state: EmulatorState, request: web.Request) -> object:
    state.reset_stats()
    return state.stats()


async def _set_clock(state: EmulatorState, request: web.Request) -> object:
    body = _clock_decoder.decode(await request.read())
    if body.frozen is not None:
        state.freeze_clock(body.frozen)
    return {"now": state.advance_clock(body.advance_s), "frozen": state.clock_frozen}


async def _requests(state: EmulatorState, request: web.Request) -> object:
    return {"data": state.requests()}


async def _set_latency(state: EmulatorState, request: web.Request) -> object:
    state.set_latency(_latency_decoder.decode(await request.read()).ms)
    return {"latency_ms": state.latency_ms}


async def _streams(state: EmulatorState, request: web.Request) -> object:
    return state.streams.stats()


async def _set_streams(state: EmulatorState, request: web.Request) -> object:
    body = _streams_decoder.decode(await request.read())
    if body.delay_ms is not None:
        state.streams.set_delay(body.delay_ms)
    if body.paced is not None:
        state.streams.pace(body.paced)
    if body.release:
        state.streams.release(body.release)
    return state.streams.stats()


async def _list_faults(state: EmulatorState, request: web.Request) -> object:
    return {"data": state.faults()}


async def _add_fault(state: EmulatorState, request: web.Request) -> object:
    body = _fault_decoder.decode(await request.read())
    return state.add_fault(**msgspec.structs.asdict(body))


async def _clear_faults(state: EmulatorState, request: web.Request) -> object:
    return {"cleared": state.clear_faults()}


async def _touch(state: EmulatorState, request: web.Request) -> object:
    return state.touch(request.match_info["container_id"])


async def _update(state: EmulatorState, request: web.Request) -> object:
    fields = _fields_decoder.decode(await request.read())
    return state.update_container(request.match_info["container_id"], **fields)


async def _healthz(state: EmulatorState, request: web.Request) -> object:
    return {"status": "ok"}


def routes(state: EmulatorState) -> list[web.RouteDef]:
    """The control routes, bound to the emulator's state."""
    return [
        web.get("/_emulator/healthz", _control(state, _healthz)),
        web.get("/_emulator/stats", _control(state, _stats)),
        web.post("/_emulator/stats/reset", _control(state, _reset_stats)),
        web.post("/_emulator/clock", _control(state, _set_clock)),
        web.get("/_emulator/requests", _control(state, _requests)),
        web.post("/_emulator/latency", _control(state, _set_latency)),
        web.get("/_emulator/streams", _control(state, _streams)),
        web.post("/_emulator/streams", _control(state, _set_streams)),
        web.get("/_emulator/faults", _control(state, _list_faults)),
        web.post("/_emulator/faults", _control(state, _add_fault)),
        web.delete("/_emulator/faults", _control(state, _clear_faults)),
        web.post("/_emulator/containers/{container_id}/touch", _control(state, _touch)),
        web.patch("/_emulator/containers/{container_id}", _control(state, _update)),
    ]
