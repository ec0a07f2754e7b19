"""Redis clients from the settings: a server, a cluster, or the embedded in-process store."""

from __future__ import annotations

import logging
import re
from typing import Any

import redis.asyncio as aioredis

from sidecar.settings import Settings

__all__ = ["create_redis", "redact_url"]

log = logging.getLogger(__name__)


def redact_url(url: str) -> str:
    """``url`` with any password replaced, for log lines."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def create_redis(settings: Settings, *, embedded_server: Any = None) -> Any:
    """The cache's Redis client; with no ``SIDECAR_REDIS_URL``, an embedded fakeredis store."""
    if not settings.redis_url:
        import fakeredis  # the embedded default only

        log.warning(
            "no SIDECAR_REDIS_URL: using the embedded in-process store (fakeredis); "
            "the cache is not shared with other processes"
        )
        return fakeredis.FakeAsyncRedis(server=embedded_server or fakeredis.FakeServer())
    options: dict[str, Any] = {
        "socket_timeout": settings.redis_socket_timeout_s,
        "socket_connect_timeout": settings.redis_connect_timeout_s,
        # No periodic PING: every command has a timeout, and a dead connection fails fast.
        "health_check_interval": 0,
    }
    if settings.redis_cluster:
        log.info("cache on Redis Cluster %s", redact_url(settings.redis_url))
        return aioredis.RedisCluster.from_url(settings.redis_url, **options)
    log.info("cache on Redis %s", redact_url(settings.redis_url))
    return aioredis.Redis.from_url(settings.redis_url, max_connections=256, **options)
