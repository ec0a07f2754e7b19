"""The application factory: resources, services and routes, in that order."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web

from sidecar import admin, health, relay, tracing
from sidecar.announce import listen_for_changes
from sidecar.connections import close_redis, create_redis, create_subscriber
from sidecar.credentials import CredentialReader
from sidecar.flight import flush_every
from sidecar.keys import KeySpace
from sidecar.metrics import Metrics, counter, gauge, process_gauges
from sidecar.middleware import answer_middleware
from sidecar.outcomes import Refresher
from sidecar.queue import ArqRefresher
from sidecar.service import ContainerService
from sidecar.settings import Settings
from sidecar.state import DRAINING, SERVICES, Services
from sidecar.stats import FleetStats
from sidecar.store import Breaker, CacheStore
from sidecar.upstream import Upstream, create_session
from sidecar.views import RETRIEVE_ROUTES

__all__ = ["SETTINGS", "create_app"]

log = logging.getLogger(__name__)

SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
REDIS: web.AppKey[Any] = web.AppKey("redis", object)
HTTP: web.AppKey[aiohttp.ClientSession] = web.AppKey("http", aiohttp.ClientSession)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
EMBEDDED_WORKER: web.AppKey[Any] = web.AppKey("embedded_worker", object)

#: The ``route`` label values besides the retrieval routes (a closed set).
ROUTE_GROUPS = {"passthrough": ("bypass", "error"), "admin": ("bypass", "error"),
                "unmatched": ("error",)}  # fmt: skip


#: Builds the in-process worker of the embedded default.
EmbeddedWorkerFactory = Callable[
    [Settings, Any, aiohttp.ClientSession, Metrics, FleetStats], Refresher
]


def create_app(
    settings: Settings, *, embedded_worker: EmbeddedWorkerFactory | None = None
) -> web.Application:
    """The sidecar's aiohttp application; without ``SIDECAR_REDIS_URL`` it runs on an embedded
    store and, given ``embedded_worker``, refreshes in-process."""
    app = web.Application(middlewares=[*tracing.server_middlewares(), answer_middleware])
    app[SETTINGS] = settings
    metrics = Metrics("sidecar", settings.container_providers, RETRIEVE_ROUTES)
    for group, outcomes in ROUTE_GROUPS.items():
        metrics.route(group, outcomes)
    app[METRICS] = metrics
    app[EMBEDDED_WORKER] = embedded_worker
    app[DRAINING] = asyncio.Event()
    app.cleanup_ctx.extend([_redis, _http, _services, relay.relay_ctx, _background])
    app.on_shutdown.append(_drain)
    for path, handler in RETRIEVE_ROUTES.items():
        app.router.add_get(path, handler, allow_head=False)
    health.add_routes(app.router, ready=health.readyz, render=metrics.render)
    admin.add_routes(app.router)
    relay.add_route(app.router)  # last: everything else goes to the upstream as it came
    return app


async def _redis(app: web.Application) -> AsyncIterator[None]:
    client = create_redis(app[SETTINGS])
    app[REDIS] = client
    yield
    await close_redis(client)


async def _http(app: web.Application) -> AsyncIterator[None]:
    async with create_session(app[SETTINGS], tracing.client_trace_configs()) as session:
        app[HTTP] = session
        yield


def _start_refresher(app: web.Application, stats: FleetStats) -> Refresher | None:
    settings = app[SETTINGS]
    refresher: Refresher | None = None
    if not settings.refresh_enabled:
        log.info(
            "no SIDECAR_SERVICE_API_KEY: background refresh is off; stale entries are "
            "revalidated inline with the caller's credential"
        )
    elif settings.redis_url:
        refresher = ArqRefresher(settings, app[METRICS])
    elif app[EMBEDDED_WORKER] is not None:
        refresher = app[EMBEDDED_WORKER](settings, app[REDIS], app[HTTP], app[METRICS], stats)
    else:
        log.warning("embedded store without an embedded worker: background refresh is off")
    return refresher


async def _services(app: web.Application) -> AsyncIterator[None]:
    settings, metrics = app[SETTINGS], app[METRICS]
    secret = settings.key_secret.reveal() if settings.key_secret else None
    if secret is None:
        log.warning(
            "no SIDECAR_KEY_SECRET: credential fingerprints use a per-process key, so grants "
            "are not shared with other replicas"
        )
    breaker = Breaker(settings.redis_retry_after_s, on_failure=metrics.redis_errors.inc)
    store = CacheStore(app[REDIS], KeySpace(settings.key_prefix), breaker)
    stats = FleetStats(store)
    refresher = _start_refresher(app, stats)
    upstream = Upstream(app[HTTP], settings, metrics, caller="sidecar", stats=stats)
    service = ContainerService(
        store,
        upstream,
        settings,
        refresher=refresher,
        reads=stats if refresher is not None else None,
    )
    services = Services(
        settings=settings,
        credentials=CredentialReader(settings.upstream_kind, secret),
        store=store,
        service=service,
        upstream=upstream,
        metrics=metrics,
        stats=stats,
    )
    app[SERVICES] = services
    metrics.watch(lambda: _scrape_time(services))
    yield
    await service.close()
    if refresher is not None:
        await refresher.close()
    await store.close()


def _scrape_time(services: Services) -> list[Any]:
    breaker = services.store.breaker
    return [
        *process_gauges(not breaker.down, services.service.throttle.remaining()),
        counter(
            "sidecar_redis_fail_open_seconds",
            "Seconds this process served from upstream because Redis was unavailable",
            breaker.fail_open_seconds(),
        ),
        gauge(
            "sidecar_local_cache_entries",
            "Records this process keeps a copy of",
            len(services.service.local),
        ),
    ]


async def _background(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    local = services.service.local
    tasks = [asyncio.create_task(flush_every(0.5, services.stats.flush))]
    subscriber = create_subscriber(app[SETTINGS], app[REDIS])
    if local.enabled:
        listener = listen_for_changes(subscriber, services.store.keys, local)
        tasks.append(asyncio.create_task(listener))
    yield
    # Cancelled together, awaited one by one: gathered, the change listener on a cluster's
    # subscriber was seen to outlive its cancellation (tests/cluster, the sentinel queue).
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if subscriber is not app[REDIS]:
        await subscriber.aclose()


async def _drain(app: web.Application) -> None:
    """SIGTERM: readiness fails at once so no new traffic arrives while requests finish."""
    app[DRAINING].set()
