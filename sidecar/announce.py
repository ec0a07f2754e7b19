"""Change announcements: whoever rewrites a record says so, and every process updates its copy.

A rewritten record travels on the channel itself (a refresh never turns other processes' hits
into misses); deletes and revoked grants by name. A first byte says which.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sidecar.keys import KeySpace, parse_member
from sidecar.local import LocalCache
from sidecar.logs import Outage
from sidecar.records import decode_record

__all__ = ["announce_delete", "announce_record", "announce_revoke", "listen_for_changes"]

log = logging.getLogger(__name__)

_RECORD, _DELETE, _REVOKE = b"r", b"d", b"g"


def announce_record(data: bytes) -> bytes:
    """The message for a rewritten record (its stored bytes)."""
    return _RECORD + data


def announce_delete(name: str) -> bytes:
    """The message for a forgotten container (``provider/container_id``)."""
    return _DELETE + name.encode()


def announce_revoke(name: str, fingerprint: str) -> bytes:
    """The message for a credential's revoked grant of a container."""
    return _REVOKE + f"{name}\n{fingerprint}".encode()


def apply(message: bytes, local: LocalCache) -> None:
    """Bring ``local`` up to date with one announcement."""
    kind, body = message[:1], message[1:]
    if kind == _RECORD:
        record = decode_record(body)
        if record is not None:
            local.update(record)
    elif kind == _DELETE:
        local.drop(*parse_member(body))
    elif kind == _REVOKE:
        name, _, fingerprint = body.decode().partition("\n")
        local.revoke(*parse_member(name), fingerprint)


async def listen_for_changes(
    redis: Any, keys: KeySpace, local: LocalCache, *, retry_s: float = 1.0
) -> None:
    """Apply announcements to ``local``. While the channel is lost copies only age out; what
    was announced meanwhile is unknown, so every copy is dropped once it is back."""
    outage = Outage(log, "change announcements", "copies only age out meanwhile")
    while True:
        try:
            async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(keys.changes)
                if outage.since is not None:
                    local.clear()
                    outage.recovered()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        apply(message["data"], local)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any Redis trouble: we may miss announcements
            outage.failed(exc)
            await asyncio.sleep(retry_s)
