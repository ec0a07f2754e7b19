"""The application factory: resources, services and routes, in that order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.announce import listen_for_changes
from sidecar.connections import create_redis
from sidecar.credentials import CredentialReader
from sidecar.keys import KeySpace
from sidecar.local import LocalCache
from sidecar.middleware import error_middleware
from sidecar.service import ContainerService
from sidecar.settings import Settings
from sidecar.state import SERVICES, Services
from sidecar.store import Breaker, CacheStore
from sidecar.upstream import Upstream, create_session
from sidecar.views import retrieve_native, retrieve_openai

__all__ = ["REDIS", "SETTINGS", "create_app"]

log = logging.getLogger(__name__)

SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
REDIS: web.AppKey[Any] = web.AppKey("redis", object)
HTTP: web.AppKey[aiohttp.ClientSession] = web.AppKey("http", aiohttp.ClientSession)
EMBEDDED_SERVER: web.AppKey[Any] = web.AppKey("embedded_server", object)


def create_app(settings: Settings, *, embedded_server: Any = None) -> web.Application:
    """The sidecar's aiohttp application."""
    app = web.Application(middlewares=[error_middleware])
    app[SETTINGS] = settings
    app[EMBEDDED_SERVER] = embedded_server
    app.cleanup_ctx.append(_redis)
    app.cleanup_ctx.append(_http)
    app.cleanup_ctx.append(_services)
    app.cleanup_ctx.append(_announcements)
    for path in ("/openai/v1/containers/{container_id}", "/openai/containers/{container_id}"):
        app.router.add_get(path, retrieve_openai, allow_head=False)
    app.router.add_get("/v1/containers/{container_id}", retrieve_native, allow_head=False)
    return app


async def _redis(app: web.Application) -> AsyncIterator[None]:
    client = create_redis(app[SETTINGS], embedded_server=app[EMBEDDED_SERVER])
    app[REDIS] = client
    yield
    await client.aclose()


async def _http(app: web.Application) -> AsyncIterator[None]:
    async with create_session(app[SETTINGS]) as session:
        app[HTTP] = session
        yield


async def _services(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    secret = settings.key_secret.reveal() if settings.key_secret else None
    if secret is None:
        log.warning(
            "no SIDECAR_KEY_SECRET: credential fingerprints use a per-process key, so grants "
            "are not shared with other replicas"
        )
    store = CacheStore(
        app[REDIS], KeySpace(settings.key_prefix), Breaker(settings.redis_retry_after_s)
    )
    service = ContainerService(
        store, Upstream(app[HTTP], settings), settings, local=LocalCache(settings.local_ttl_s)
    )
    app[SERVICES] = Services(
        settings=settings,
        credentials=CredentialReader(settings.upstream_kind, secret),
        store=store,
        service=service,
    )
    yield
    await service.close()


async def _announcements(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    local = services.service.local
    if not local.enabled or app[SETTINGS].redis_cluster:
        # Cluster pub/sub is not offered by the async cluster client: copies just time out.
        yield
        return
    task = asyncio.create_task(listen_for_changes(app[REDIS], services.store.keys, local))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
