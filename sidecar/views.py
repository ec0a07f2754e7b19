"""HTTP handlers for retrievals: parse, call the service, answer in the gateway's shape.

A hit on the process's own copy is usually answered before routing by the hit lane
(``sidecar.lane``), with the copy's pre-rendered body (``hit_body``); the rest comes here.
"""

from __future__ import annotations

import functools
import re
import time

from aiohttp import web

from sidecar.controls import Rules, parse_rules
from sidecar.errors import InvalidParameter, UnsupportedOperation
from sidecar.headers import cache_headers
from sidecar.local import Copy
from sidecar.middleware import COUNTED, OUTCOME, count_answer
from sidecar.outcomes import Outcome, Query
from sidecar.settings import PROVIDER_NAME, PROVIDERS, Settings, cache_provider
from sidecar.state import SERVICES
from sidecar.wire import REQUEST_TYPE, CacheDebug, default_extra, render_container, with_cache_debug

__all__ = [
    "CONTAINER_ID",
    "RETRIEVE_ROUTES",
    "hit_body",
    "parse_container_id",
    "parse_provider",
    "requires_provider",
]

#: A plausible container (or file) id: 1-128 letters, digits, '_' or '-', not starting with either.
CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_OPENAI_V1 = "/openai/v1/containers/{container_id}"
_OPENAI = "/openai/containers/{container_id}"
_NATIVE = "/v1/containers/{container_id}"


def requires_provider(route: str, settings: Settings) -> bool:
    """Whether a route needs ``?provider=``: the gateway's native ``/v1`` route (not OpenAI's)."""
    return route == _NATIVE and settings.upstream_kind == "bifrost"


async def _retrieve(request: web.Request, route: str) -> web.Response:
    started = time.perf_counter()
    services = request.app[SERVICES]
    settings = services.settings
    headers = request.headers
    credential, passed = services.credentials.scan(headers.items())
    provider = request.query.get("provider", "") if request.query_string else ""
    provider = parse_provider(provider, requires_provider(route, settings), settings)
    query = Query(
        provider=cache_provider(settings, provider),
        container_id=parse_container_id(request.match_info["container_id"]),
        credential=credential,
        rules=parse_rules(headers, settings.freshness_threshold),
        passed=passed,
    )
    outcome = await services.service.retrieve(query)
    elapsed = time.perf_counter() - started
    response = render(outcome, provider, query.rules, int(elapsed * 1000))
    count_answer(services, route, outcome, query.rules, elapsed)
    response[COUNTED] = True
    return response


#: The retrieval routes and their handlers (each counts its answers under its own route).
RETRIEVE_ROUTES = {
    route: functools.partial(_retrieve, route=route) for route in (_OPENAI_V1, _OPENAI, _NATIVE)
}


def parse_provider(provider: str, required: bool, settings: Settings) -> str:
    """The ``provider`` query parameter (default ``openai``): in front of a gateway any name it
    may know goes through and the gateway decides; straight against OpenAI, configured ones."""
    if not provider:
        if required:
            raise InvalidParameter("provider query parameter is required", param="provider")
        return "openai"
    if settings.upstream_kind == "bifrost":
        if not PROVIDER_NAME.fullmatch(provider):
            raise InvalidParameter(
                f"invalid provider {provider[:64]!r}: expected a provider name (letters, "
                "digits, '-', '_', '.')",
                param="provider",
            )
        return provider
    if provider not in settings.container_providers:
        if provider not in PROVIDERS:
            raise InvalidParameter(
                f"unknown provider {provider[:64]!r}: expected one of "
                f"{', '.join(sorted(settings.container_providers | PROVIDERS))}",
                param="provider",
            )
        raise UnsupportedOperation(
            f"{REQUEST_TYPE} is not supported by {provider} provider", param="provider"
        )
    return provider


def parse_container_id(value: str, param: str = "container_id") -> str:
    """A plausible container (or file) id (``CONTAINER_ID``): path tricks never go upstream."""
    if not CONTAINER_ID.fullmatch(value):
        shown = value if len(value) <= 64 else value[:64] + "..."
        raise InvalidParameter(
            f"invalid {param} {shown!r}: expected 1-128 letters, digits, '_' or '-'",
            param=param,
        )
    return value


def render(outcome: Outcome, provider: str, rules: Rules, latency_ms: int) -> web.Response:
    """The response for an outcome: the container, or the 404, with ``cache_debug``."""
    if outcome.copy is not None and latency_ms == 0:
        body = hit_body(outcome, provider, rules)
    else:
        body = _render_body(outcome, provider, rules, latency_ms)
    headers = cache_headers(outcome, rules=rules)
    headers["Content-Type"] = "application/json"
    response = web.Response(body=body, status=outcome.record.status_code, headers=headers)
    response[OUTCOME] = (outcome, rules)
    return response


def hit_body(outcome: Outcome, provider: str, rules: Rules) -> bytes:
    """A hit's body from the process's own copy (latency 0): rendered once per threshold."""
    copy: Copy = outcome.copy
    cached = copy.hit_body
    if cached is not None and cached[0] == rules.threshold:
        return cached[1]
    body = _render_body(outcome, provider, rules, 0)
    copy.hit_body = (rules.threshold, body)
    return body


def _render_body(outcome: Outcome, provider: str, rules: Rules, latency_ms: int) -> bytes:
    record = outcome.record
    # The gateway's hit type ("direct": an exact lookup), or ours: the outcome "stale_if_error".
    hit = outcome.kind != "miss"
    hit_type = (outcome.kind if outcome.kind == "stale_if_error" else "direct") if hit else None
    debug = CacheDebug(
        cache_hit=hit,
        cache_id=outcome.cache_id,
        hit_type=hit_type,
        requested_provider=provider,
        provider_used=record.provider,
        threshold=rules.threshold if hit else None,
        similarity=outcome.freshness.similarity if hit and outcome.freshness else None,
    )
    if record.negative:
        return with_cache_debug(record.body, debug)
    extra = record.extra or default_extra(record.provider)
    return render_container(record.body, extra, latency_ms, debug)
