"""Every Redis key the sidecar and the workers use, built in one place.

A container's keys are tagged with its public cache id (``{<cache_id>}``, its first 96 bits in
16 characters: a Redis Cluster hash tag), so the record, its grants, its lock and its failure
marker share one slot (a hit is one ``MGET``), and a purge by ``cache_id`` finds them without an
index. Key names are short: every byte is paid once per cached container.
"""

from __future__ import annotations

import base64
import functools
import uuid

__all__ = ["KeySpace", "cache_id_for", "compact_id", "member", "parse_member"]

_CACHE_ID_NAMESPACE = uuid.UUID("5f0d3c6e-8a51-4c43-9a39-0c1f3b1f6a10")


@functools.lru_cache(maxsize=16_384)
def cache_id_for(provider: str, container_id: str) -> str:
    """The stable public id of a cache entry (a UUIDv5; reveals nothing about the key)."""
    return str(uuid.uuid5(_CACHE_ID_NAMESPACE, f"{provider}/{container_id}"))


def compact_id(cache_id: str) -> str:
    """A cache id in keys: base64url of its first 96 bits (16 characters allocate less than 22)."""
    return base64.urlsafe_b64encode(uuid.UUID(cache_id).bytes[:12]).decode()


@functools.lru_cache(maxsize=16_384)
def _tag_of(provider: str, container_id: str) -> str:
    return compact_id(cache_id_for(provider, container_id))


class KeySpace:
    """Builds keys under one prefix (``SIDECAR_KEY_PREFIX``)."""

    __slots__ = ("changes", "due", "prefix", "records", "retired", "stats")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.changes = f"{prefix}:changes"
        """The channel on which record changes are announced (``sidecar.announce``)."""
        self.records = f"{prefix}:{{*}}:r"
        """The ``SCAN`` pattern matching every record."""
        self.stats = f"{prefix}:stats"
        """Hash of fleet-wide counts (``GET /api/cache/stats``)."""
        self.due = f"{prefix}:due"
        """Sorted set: ``provider/container_id`` scored by when it stops being fresh and when it
        was last read, packed in one number (``store.DUE_MARKS``)."""
        self.retired = (f"{prefix}:hot",)
        """Keys earlier versions kept and a worker removes at start (the read set, now in due)."""

    def record_of(self, cache_id: str) -> str:
        """The record of the container behind a public cache id."""
        return f"{self.prefix}:{{{compact_id(cache_id)}}}:r"

    def _tag(self, provider: str, container_id: str) -> str:
        return f"{self.prefix}:{{{_tag_of(provider, container_id)}}}"

    def record(self, provider: str, container_id: str) -> str:
        """The cached record."""
        return self._tag(provider, container_id) + ":r"

    def grant(self, provider: str, container_id: str, fingerprint: str) -> str:
        """Proof that the upstream answered this credential for this container."""
        return f"{self._tag(provider, container_id)}:g:{fingerprint}"

    def negative(self, provider: str, container_id: str, fingerprint: str) -> str:
        """A cached 404 for one credential (another project may well see the container)."""
        return f"{self._tag(provider, container_id)}:n:{fingerprint}"

    def lock(self, provider: str, container_id: str, fingerprint: str) -> str:
        """The cross-replica fetch lock of one credential for one container."""
        return f"{self._tag(provider, container_id)}:l:{fingerprint}"

    def gone(self, provider: str, container_id: str) -> str:
        """Set for a while after the container was deleted: no fill lands meanwhile."""
        return self._tag(provider, container_id) + ":x"

    def failing(self, provider: str, container_id: str) -> str:
        """Set while the upstream fails for this container: its last error and back-off."""
        return self._tag(provider, container_id) + ":f"

    def backoff(self, provider: str) -> str:
        """Set while a provider's 429 Retry-After runs; nobody refreshes from it until then."""
        return f"{self.prefix}:backoff:{provider}"

    def semaphore(self, provider: str) -> str:
        """Sorted set of the upstream calls in flight to a provider (the concurrency cap)."""
        return f"{self.prefix}:sem:{provider}"


def member(provider: str, container_id: str) -> str:
    """How a container is named inside the due set and on the change channel."""
    return f"{provider}/{container_id}"


def parse_member(value: str | bytes) -> tuple[str, str]:
    """``(provider, container_id)`` of a member."""
    text = value.decode() if isinstance(value, bytes) else value
    provider, _, container_id = text.partition("/")
    return provider, container_id
