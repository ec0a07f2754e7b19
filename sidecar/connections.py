"""Redis clients from the settings: a server, a Sentinel-managed master, a cluster, or the
embedded in-process store."""

from __future__ import annotations

import logging
import re
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from sidecar.settings import Settings, SettingsError

__all__ = [
    "SentinelTarget",
    "close_redis",
    "create_redis",
    "create_subscriber",
    "parse_sentinel_url",
]

log = logging.getLogger(__name__)


class SentinelTarget(NamedTuple):
    """Where a ``redis+sentinel://`` URL points."""

    sentinels: list[tuple[str, int]]
    master: str
    db: int
    password: str | None


def _redact_url(url: str) -> str:
    """``url`` with any password replaced, for log lines."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def parse_sentinel_url(url: str) -> SentinelTarget:
    """``redis+sentinel://[:password@]host1:26379,host2:26379/<master name>/<db>``."""
    parts = urlsplit(url)
    sentinels = []
    for node in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = node.rpartition(":")
        sentinels.append((host or node, int(port or 26379)))
    path = [p for p in parts.path.split("/") if p]
    return SentinelTarget(
        sentinels=sentinels,
        master=path[0] if path else "mymaster",
        db=int(path[1]) if len(path) > 1 else 0,
        password=unquote(parts.password) if parts.password else None,
    )


def _options(settings: Settings) -> dict[str, Any]:
    return {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        # No periodic PING: every command has a timeout, and a dead connection fails fast.
        "health_check_interval": 0,
    }


def create_redis(settings: Settings) -> Any:
    """The cache's Redis client; with no ``SIDECAR_REDIS_URL``, an embedded fakeredis store."""
    url = settings.redis_url
    if not url:
        try:
            import fakeredis  # the embedded default only
        except ImportError:
            raise SettingsError(
                "SIDECAR_REDIS_URL: required (trying the sidecar without Redis needs the "
                "'embedded' extra: pip install 'bifrost-container-sidecar[embedded]')"
            ) from None

        log.warning(
            "no SIDECAR_REDIS_URL: using the embedded in-process store (fakeredis); "
            "the cache is not shared with other processes"
        )
        return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    options = _options(settings)
    if settings.redis_cluster:
        log.info("cache on Redis Cluster %s", _redact_url(url))
        return aioredis.RedisCluster.from_url(url, **options)
    if url.startswith("redis+sentinel://"):
        target = parse_sentinel_url(url)
        log.info("cache on Sentinel master %r via %s", target.master, target.sentinels)
        sentinel = Sentinel(target.sentinels, **options)  # type: ignore[no-untyped-call]
        return sentinel.master_for(target.master, db=target.db, password=target.password, **options)
    log.info("cache on Redis %s", _redact_url(url))
    # A burst of requests past the pool's size waits for a connection (at most the socket
    # timeout) instead of failing at once ("Too many connections") and going upstream; and this
    # pool connects outside its lock, so one slow connect (a hung Redis accepts the connection,
    # then never answers) does not hold up every other caller.
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=256, timeout=settings.redis_socket_timeout_s, **options
    )
    return aioredis.Redis.from_pool(pool)  # closing the client closes its pool


def create_subscriber(settings: Settings, cache: Any) -> Any:
    """A client for the change channel: the cache's own, or on a cluster one node of it (cluster
    pub/sub reaches every node; the async cluster client has no pub/sub of its own)."""
    if settings.redis_cluster:
        return aioredis.Redis.from_url(settings.redis_url, **_options(settings))
    return cache


async def close_redis(client: Any) -> None:
    """Close a client made here, and the Sentinel connections behind it if any."""
    pool = getattr(client, "connection_pool", None)
    manager = getattr(pool, "sentinel_manager", None)
    await client.aclose()
    if manager is not None:
        for sentinel in manager.sentinels:
            await sentinel.aclose()
