"""The one place where errors become answers in the gateway's ``BifrostError`` shape."""

from __future__ import annotations

import logging
import time

from aiohttp import web
from aiohttp.typedefs import Handler

from sidecar.errors import RouteNotFound, SidecarError, UpstreamReplyError
from sidecar.state import SERVICES
from sidecar.wire import error_body

__all__ = ["OUTCOME", "ROUTE_GROUP", "error_middleware", "error_response", "observe_middleware"]

#: Where a handler leaves what happened, for ``observe_middleware`` (a retrieval's Outcome and
#: Rules, or a metrics outcome word).
OUTCOME: web.ResponseKey[object] = web.ResponseKey("outcome", object)
_KINDS = {"hit": "hit", "stale": "stale", "stale-if-error": "stale_if_error",
          "negative": "negative", "miss": "miss"}  # fmt: skip
_UNOBSERVED = frozenset({"/healthz", "/readyz", "/metrics"})
#: A handler's ``route`` label when its routes are counted together (``passthrough``, ``admin``).
ROUTE_GROUP: web.RequestKey[str] = web.RequestKey("route_group", str)

log = logging.getLogger(__name__)


def error_response(exc: SidecarError, provider: str) -> web.Response:
    """The gateway-shaped answer for ``exc``."""
    if isinstance(exc, UpstreamReplyError):
        response = web.Response(body=exc.body, status=exc.status, content_type="application/json")
        if exc.retry_after:
            response.headers["Retry-After"] = exc.retry_after
        return response
    return web.Response(
        body=error_body(exc, provider), status=exc.status, content_type="application/json"
    )


def _provider(request: web.Request) -> str:
    provider = request.query.get("provider", "")
    if not provider and not request.path.startswith("/v1/"):
        return "openai"
    return provider[:64]


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every answer by route and outcome, with its duration (one place for all routes)."""
    started = time.perf_counter()
    response = await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    if route in _UNOBSERVED:
        return response
    route = request.get(ROUTE_GROUP, route)
    services = request.app[SERVICES]
    metrics = services.metrics
    seen = response.get(OUTCOME)
    if isinstance(seen, tuple):
        outcome, rules = seen
        label = _KINDS[outcome.kind]
        if label == "miss" and (rules.no_cache or rules.no_store):
            label = "bypass"
        if outcome.from_cache and outcome.freshness is not None:
            metrics.served_age.observe(outcome.freshness.age_s)
        if outcome.collapsed:
            metrics.collapsed.labels(outcome.collapsed).inc()
    else:
        label = seen if isinstance(seen, str) else ("error" if response.status >= 400 else "bypass")
    metrics.answered(route, label, time.perf_counter() - started)
    services.stats.add(f"answers.{label}")
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer every error in the gateway's shape; never a stack trace."""
    try:
        return await handler(request)
    except SidecarError as exc:
        if exc.status >= 500:
            log.warning("%s %s: %s", request.method, request.path, exc.message)
        return error_response(exc, _provider(request))
    except web.HTTPException as exc:
        if exc.status == 404:
            return error_response(
                RouteNotFound(f"no route for {request.method} {request.path[:200]}"),
                _provider(request),
            )
        if exc.status == 405:
            not_allowed = RouteNotFound(f"method {request.method} not allowed here")
            not_allowed.status = 405
            not_allowed.code = "method_not_allowed"
            return error_response(not_allowed, _provider(request))
        raise
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(SidecarError("internal error in the sidecar"), _provider(request))
