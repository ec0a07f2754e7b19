"""Admin endpoints, in the gateway's shapes: purge by cache id or container, fleet stats.

Off (404) unless ``SIDECAR_ADMIN_TOKEN`` is set; then they take ``Authorization: Bearer <token>``.
"""

from __future__ import annotations

import hmac
import re

from aiohttp import web

from sidecar.errors import Forbidden, InvalidParameter, MissingCredential, NotFound
from sidecar.middleware import OUTCOME, ROUTE_GROUP
from sidecar.settings import Secret, Settings
from sidecar.state import SERVICES, Services
from sidecar.views import parse_container_id

__all__ = ["add_routes", "refuse_admin_token"]

_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _is_token(given: str, token: Secret) -> bool:
    # Header values are decoded with surrogateescape: a non-UTF-8 one is a mismatch, not a 500.
    given_bytes = given.strip().encode("utf-8", "surrogateescape")
    return hmac.compare_digest(given_bytes, token.reveal().encode())


def refuse_admin_token(request: web.Request, settings: Settings) -> None:
    """Refuse (403) a request carrying the admin token in any header: it is never relayed (an
    admin call with a typo in its path would otherwise take it upstream)."""
    token = settings.admin_token
    if token is None:
        return
    for value in request.headers.values():
        scheme, _, rest = value.partition(" ")
        if _is_token(rest if scheme.lower() == "bearer" else value, token):
            raise Forbidden("the sidecar's admin token is never sent on: no such admin route")


def _authorize(request: web.Request) -> Services:
    request[ROUTE_GROUP] = "admin"
    services = request.app[SERVICES]
    token = services.settings.admin_token
    if token is None:
        raise NotFound(f"no route for {request.method} {request.path[:200]}")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise MissingCredential("the admin token is required: 'Authorization: Bearer <token>'")
    if not _is_token(given, token):
        raise Forbidden("that admin token is not valid")
    return services


def _answer(body: dict[str, object]) -> web.Response:
    response = web.json_response(body)
    response[OUTCOME] = "bypass"
    return response


async def clear_by_cache_id(request: web.Request) -> web.Response:
    """``DELETE /api/cache/clear/{cache_id}``: drop one entry (as ``cache_debug.cache_id``)."""
    services = _authorize(request)
    cache_id = request.match_info["cache_id"].lower()
    if not _UUID.match(cache_id):
        raise InvalidParameter(f"invalid cache_id {cache_id[:64]!r}", param="cache_id")
    target = await services.store.purge_cache_id(cache_id)
    if target is None:
        raise NotFound(f"no cache entry with id {cache_id}")
    services.service.local.drop(*target)
    return _answer({"message": "cache entry cleared", "cache_id": cache_id,
                    "provider": target[0], "container_id": target[1]})  # fmt: skip


async def clear_by_key(request: web.Request) -> web.Response:
    """``DELETE /api/cache/clear-by-key/{container_id}[?provider=...]``: drop a container."""
    services = _authorize(request)
    container_id = parse_container_id(request.match_info["key"])
    provider = request.query.get("provider", "")
    providers = [provider] if provider else sorted(services.settings.container_providers)
    if provider and provider not in services.settings.container_providers:
        raise InvalidParameter(
            f"provider {provider[:64]!r} has no cached containers", param="provider"
        )
    for name in providers:
        await services.store.delete(name, container_id)
        services.service.local.drop(name, container_id)
    return _answer({"message": "cache cleared", "container_id": container_id,
                    "providers": providers})  # fmt: skip


async def stats(request: web.Request) -> web.Response:
    """``GET /api/cache/stats``: a JSON summary for dashboards without Prometheus."""
    services = _authorize(request)
    summary = await services.stats.read()
    entries, exact = await services.store.count_records()
    refresher = services.service.refresher
    summary.update(
        entries=entries,
        entries_exact=exact,
        refresh_backlog=await refresher.backlog() if refresher is not None else None,
        redis="down" if services.store.breaker.down else "up",
    )
    return _answer(summary)


def add_routes(router: web.UrlDispatcher) -> None:
    """Register the admin endpoints."""
    router.add_delete("/api/cache/clear/{cache_id}", clear_by_cache_id)
    router.add_delete("/api/cache/clear-by-key/{key}", clear_by_key)
    router.add_get("/api/cache/stats", stats, allow_head=False)
