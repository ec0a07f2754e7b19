"""The application factory: resources, services and routes, in that order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from sidecar.announce import listen_for_changes
from sidecar.connections import create_redis
from sidecar.credentials import CredentialReader
from sidecar.keys import KeySpace
from sidecar.local import LocalCache
from sidecar.middleware import error_middleware
from sidecar.outcomes import Refresher
from sidecar.queue import ArqRefresher
from sidecar.reads import ReadTracker
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
EMBEDDED_WORKER: web.AppKey[Any] = web.AppKey("embedded_worker", object)
REFRESHER: web.AppKey[Any] = web.AppKey("refresher", object)


class ClosableRefresher(Refresher, Protocol):
    """A refresher with resources of its own."""

    async def close(self) -> None:
        """Release them."""


#: Builds the in-process worker of the embedded default from the settings, Redis and session.
EmbeddedWorkerFactory = Callable[[Settings, Any, aiohttp.ClientSession], ClosableRefresher]


def create_app(
    settings: Settings,
    *,
    embedded_server: Any = None,
    embedded_worker: EmbeddedWorkerFactory | None = None,
) -> web.Application:
    """The sidecar's aiohttp application.

    Without ``SIDECAR_REDIS_URL`` it runs on an embedded store (``embedded_server``, a fakeredis
    server, may be shared) and, given ``embedded_worker``, refreshes in-process.
    """
    app = web.Application(middlewares=[error_middleware])
    app[SETTINGS] = settings
    app[EMBEDDED_SERVER] = embedded_server
    app[EMBEDDED_WORKER] = embedded_worker
    app.cleanup_ctx.append(_redis)
    app.cleanup_ctx.append(_http)
    app.cleanup_ctx.append(_refresher)
    app.cleanup_ctx.append(_services)
    app.cleanup_ctx.append(_announcements)
    app.cleanup_ctx.append(_reads)
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


async def _refresher(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    refresher: ClosableRefresher | None = None
    if not settings.refresh_enabled:
        log.info(
            "no SIDECAR_SERVICE_API_KEY: background refresh is off; stale entries are "
            "revalidated inline with the caller's credential"
        )
    elif settings.redis_url:
        refresher = ArqRefresher(settings)
    elif app[EMBEDDED_WORKER] is not None:
        refresher = app[EMBEDDED_WORKER](settings, app[REDIS], app[HTTP])
    else:
        log.warning("embedded store without an embedded worker: background refresh is off")
    app[REFRESHER] = refresher
    yield
    if refresher is not None:
        await refresher.close()


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
    refresher = app[REFRESHER]
    service = ContainerService(
        store,
        Upstream(app[HTTP], settings),
        settings,
        refresher=refresher,
        local=LocalCache(settings.local_ttl_s),
        reads=ReadTracker(store) if refresher is not None else None,
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


async def _reads(app: web.Application) -> AsyncIterator[None]:
    reads = app[SERVICES].service.reads
    if reads is None:
        yield
        return
    task = asyncio.create_task(reads.run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
