"""Injected faults as a client meets them: error statuses, hangs, broken bodies, cut connections."""

from __future__ import annotations

import asyncio
import math

from aiohttp import web

from emulator.gateway import Answer
from emulator.knobs import Fault
from emulator.schema import ApiError

__all__ = ["STOPPING", "hang_up", "inject", "pause"]

# Set on shutdown so that hanging requests (timeout faults, latency) end at once.
STOPPING = web.AppKey("emulator_stopping", asyncio.Event)
_HANG_S = 3600.0

_FAULT_ERRORS: dict[int, tuple[str, str, str | None]] = {
    429: (
        "Rate limit reached for requests per min (RPM): Limit 100, Used 100, Requested 1. "
        "Please try again later.",
        "requests",
        "rate_limit_exceeded",
    ),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
    503: ("The server is overloaded or not ready yet.", "server_error", None),
}


async def pause(request: web.Request, seconds: float) -> bool:
    """Sleep, cut short when the server stops; True if it was cut short."""
    try:
        async with asyncio.timeout(seconds):
            await request.app[STOPPING].wait()
    except TimeoutError:
        return False
    return True


def hang_up(request: web.Request) -> web.Response:
    """Close the connection without an answer; aiohttp then drops the response quietly."""
    if request.transport is not None:
        request.transport.close()
    return web.Response()


async def _cut_short(request: web.Request) -> web.StreamResponse:
    """Drop the connection mid-answer: headers and a fragment of the body, then nothing.

    Unlike a hang-up before any answer, which HTTP clients may retry by themselves (aiohttp does,
    once, for idempotent requests), every client sees this one fail.
    """
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = 1024
    await response.prepare(request)
    await response.write(b'{"id": "cntr_')
    hang_up(request)
    return response


async def inject(request: web.Request, fault: Fault, answer: Answer) -> web.StreamResponse:
    """Answer a request the way ``fault`` says."""
    if fault.kind == "status":
        kind = "server_error" if fault.status >= 500 else "invalid_request_error"
        fallback = (f"The server answered HTTP {fault.status} (injected fault).", kind, None)
        message, kind, code = _FAULT_ERRORS.get(fault.status, fallback)
        response = answer.error(ApiError(fault.status, message, type=kind, code=code))
        if fault.retry_after_s is not None:
            # Retry-After takes whole seconds; OpenAI adds the precise value in milliseconds.
            response.headers["Retry-After"] = str(math.ceil(fault.retry_after_s))
            response.headers["retry-after-ms"] = str(int(fault.retry_after_s * 1000))
        return response
    if fault.kind == "malformed":
        return web.Response(body=b'{"id": "cntr_', content_type="application/json")
    if fault.kind == "reset":
        return await _cut_short(request)
    if fault.kind == "timeout":
        await pause(request, _HANG_S)
    return hang_up(request)
