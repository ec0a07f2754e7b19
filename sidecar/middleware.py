"""The one place where errors become answers in the gateway's ``BifrostError`` shape, and where
answers are counted (retrievals count themselves: ``count_answer``)."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler

from sidecar import OPS_PATHS
from sidecar.errors import (
    MethodNotAllowed,
    NotFound,
    RequestError,
    SidecarError,
    UpstreamFailure,
    UpstreamReplyError,
)
from sidecar.logs import printable
from sidecar.state import SERVICES
from sidecar.wire import REQUEST_TYPE, error_body

if TYPE_CHECKING:
    from sidecar.controls import Rules
    from sidecar.outcomes import Outcome
    from sidecar.state import Services

__all__ = [
    "ACCESS_ROUTE",
    "COUNTED",
    "OUTCOME",
    "ROUTE_GROUP",
    "answer_middleware",
    "count_answer",
    "count_route",
    "error_response",
    "outcome_label",
]

#: What a handler leaves for the access log: a retrieval's (Outcome, Rules), or an outcome word.
OUTCOME: web.ResponseKey[object] = web.ResponseKey("outcome", object)
#: Set by handlers that counted their own answer.
COUNTED: web.ResponseKey[bool] = web.ResponseKey("counted", bool)
#: The ``route`` label of handlers counted together (``passthrough``: the relay; ``admin``).
ROUTE_GROUP: web.RequestKey[str] = web.RequestKey("route_group", str)
#: The route an access line names when it has no template (the relay's ``relay:<family>``).
ACCESS_ROUTE: web.RequestKey[str] = web.RequestKey("access_route", str)

log = logging.getLogger(__name__)


def error_response(
    exc: SidecarError, provider: str, request_type: str = REQUEST_TYPE
) -> web.Response:
    """The gateway-shaped answer for ``exc`` (``request_type``: what the request was, as the
    gateway names it; empty, and so left out, for requests that are not retrievals)."""
    if isinstance(exc, UpstreamReplyError):  # the upstream's own error, already in the shape
        body = exc.body
    else:
        body = error_body(exc, provider, request_type)
    response = web.Response(body=body, status=exc.status, content_type="application/json")
    if exc.retry_after:
        response.headers["Retry-After"] = exc.retry_after
    return response


def _provider(request: web.Request) -> str:
    provider = request.query.get("provider", "")
    if not provider and not request.path.startswith("/v1/"):
        return "openai"
    return provider[:64]


@web.middleware
async def answer_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Errors in the gateway's shape (never a stack trace); answers counted unless ``COUNTED``."""
    started = time.perf_counter()
    try:
        response = await handler(request)
    except Exception as exc:
        response = _error_answer(request, exc)
    if COUNTED not in response:
        _observe(request, response, started)
    return response


def _error_answer(request: web.Request, exc: Exception) -> web.StreamResponse:
    # Relayed and admin requests say which group they are: they are no container_retrieve.
    kind = "" if ROUTE_GROUP in request else REQUEST_TYPE
    if isinstance(exc, SidecarError):
        _log_error(request, exc)
        return error_response(exc, _provider(request), kind)
    if isinstance(exc, web.HTTPException):
        if exc.status not in (404, 405):
            raise exc
        route = f"{request.method} {request.path[:200]}"
        error: SidecarError = (
            MethodNotAllowed(f"method not allowed: {route}")
            if exc.status == 405
            else NotFound(f"no route for {route}")
        )
        return error_response(error, _provider(request), kind)
    log.error("unhandled error on %s %s", request.method, printable(request.path), exc_info=exc)
    return error_response(SidecarError("internal error in the sidecar"), _provider(request), kind)


def _log_error(request: web.Request, exc: SidecarError) -> None:
    """Levels that mean something: our upstream call failing is a warning; the upstream's own
    answers, the caller's mistakes and ``only-if-cached`` misses are normal answers."""
    if isinstance(exc, UpstreamFailure):
        warnings = request.app[SERVICES].warnings
        held = warnings.due(type(exc).__name__)
        if held is not None:
            more = f" ({held} more like it in the last {warnings.every_s:g}s)" if held else ""
            log.warning("%s %s: %s%s", request.method, printable(request.path), exc.message, more)
    elif isinstance(exc, RequestError):
        log.debug("%s %s: %d %s", request.method, printable(request.path), exc.status, exc.message)
    elif isinstance(exc, UpstreamReplyError) and exc.status >= 500:
        log.info(
            "%s %s: the upstream answered %d", request.method, printable(request.path), exc.status
        )


def _retrieval_label(outcome: Outcome, rules: Rules) -> str:
    label = outcome.kind
    return "bypass" if label == "miss" and (rules.no_cache or rules.no_store) else label


def outcome_label(seen: object, status: int) -> str:
    """An answer's outcome word (metrics, stats, access log): from ``OUTCOME``, else its status."""
    if isinstance(seen, tuple):
        return _retrieval_label(*seen)
    if isinstance(seen, str):
        return seen
    return "error" if status >= 400 else "bypass"


def count_answer(
    services: Services, route: str, outcome: Outcome, rules: Rules, seconds: float
) -> None:
    """Count one retrieval answer (metrics and the fleet's stats)."""
    if outcome.kind != "miss" and outcome.freshness is not None:
        services.metrics.served_age.observe(outcome.freshness.age_s)
    if outcome.collapsed:
        services.metrics.collapsed.labels(outcome.collapsed).inc()
    count_route(services, route, _retrieval_label(outcome, rules), seconds)


def _observe(request: web.Request, response: web.StreamResponse, started: float) -> None:
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    if route in OPS_PATHS:
        return
    route = request.get(ROUTE_GROUP, route)
    label = outcome_label(response.get(OUTCOME), response.status)
    count_route(request.app[SERVICES], route, label, time.perf_counter() - started)


def count_route(services: Services, route: str, label: str, seconds: float) -> None:
    """Count one answer under a route (or route group) and outcome word."""
    services.metrics.answered(route, label, seconds)
    services.stats.add(f"answers.{label}")
