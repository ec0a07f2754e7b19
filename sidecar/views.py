"""HTTP handlers for retrievals: parse, call the service, answer in the gateway's shape."""

from __future__ import annotations

import re
import time

from aiohttp import web

from sidecar.controls import Rules, parse_rules
from sidecar.errors import InvalidParameter, MissingCredential, UnsupportedOperation
from sidecar.headers import cache_headers
from sidecar.middleware import OUTCOME
from sidecar.outcomes import Outcome, Query
from sidecar.settings import PROVIDERS, Settings
from sidecar.state import SERVICES
from sidecar.wire import REQUEST_TYPE, CacheDebug, render_container, with_cache_debug

__all__ = ["parse_container_id", "parse_provider", "retrieve_native", "retrieve_openai"]

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
_HIT_TYPES = {"hit": "direct", "stale": "direct", "negative": "direct",
              "stale-if-error": "stale_if_error"}  # fmt: skip


async def retrieve_openai(request: web.Request) -> web.Response:
    """``GET /openai[/v1]/containers/{container_id}``: ``provider`` defaults to openai."""
    return await _retrieve(request, provider_required=False)


async def retrieve_native(request: web.Request) -> web.Response:
    """``GET /v1/containers/{container_id}``: the gateway's native route, ``provider`` required."""
    return await _retrieve(request, provider_required=True)


async def _retrieve(request: web.Request, *, provider_required: bool) -> web.Response:
    started = time.perf_counter()
    services = request.app[SERVICES]
    settings = services.settings
    credential = services.credentials.read(request.headers)
    if credential is None:
        where = "'Authorization: Bearer <key>'"
        if settings.upstream_kind == "bifrost":
            where += ", x-api-key, x-goog-api-key or x-bf-vk"
        raise MissingCredential(f"a credential is required: send it as {where}")
    provider = parse_provider(request.query.get("provider", ""), provider_required, settings)
    query = Query(
        provider=provider,
        container_id=parse_container_id(request.match_info["container_id"]),
        credential=credential,
        rules=parse_rules(request.headers, settings.freshness_threshold),
    )
    outcome = await services.service.retrieve(query)
    latency_ms = int((time.perf_counter() - started) * 1000)
    return render(outcome, provider, query.rules, latency_ms)


def parse_provider(provider: str, required: bool, settings: Settings) -> str:
    """The ``provider`` query parameter: required on /v1, else ``openai``; must have containers."""
    if not provider:
        if required:
            raise InvalidParameter("provider query parameter is required", param="provider")
        return "openai"
    if provider not in PROVIDERS:
        raise InvalidParameter(
            f"unknown provider {provider[:64]!r}: expected one of {', '.join(sorted(PROVIDERS))}",
            param="provider",
        )
    if provider not in settings.container_providers:
        raise UnsupportedOperation(
            f"{REQUEST_TYPE} is not supported by {provider} provider", param="provider"
        )
    return provider


def parse_container_id(value: str, param: str = "container_id") -> str:
    """A plausible container (or file) id: 1-128 letters, digits, '_' or '-', not starting
    with either; anything else, path tricks included, never reaches the upstream."""
    if not _ID.fullmatch(value):
        shown = value if len(value) <= 64 else value[:64] + "..."
        raise InvalidParameter(
            f"invalid {param} {shown!r}: expected 1-128 letters, digits, '_' or '-'",
            param=param,
        )
    return value


def render(outcome: Outcome, provider: str, rules: Rules, latency_ms: int) -> web.Response:
    """The response for an outcome: the container, or the 404, with ``cache_debug``."""
    record = outcome.record
    hit_type = _HIT_TYPES.get(outcome.kind)
    hit = hit_type is not None
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
        body = with_cache_debug(record.body, debug)
    else:
        body = render_container(record.body, provider, latency_ms, debug)
    headers = cache_headers(outcome)
    headers["Content-Type"] = "application/json"
    response = web.Response(body=body, status=record.status_code, headers=headers)
    response[OUTCOME] = (outcome, rules)
    return response
