"""Change announcements: whoever rewrites a record says so, and every process drops its copy."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sidecar.keys import KeySpace
from sidecar.local import LocalCache

__all__ = ["listen_for_changes"]

log = logging.getLogger(__name__)


async def listen_for_changes(
    redis: Any, keys: KeySpace, local: LocalCache, *, retry_s: float = 1.0
) -> None:
    """Drop local copies as changes are announced; forget them all when the channel is lost.

    Copies are forgotten once when the channel is lost and once when it is back (what was
    announced in between is unknown); in between, copies made from upstream answers serve.
    """
    connected = True
    while True:
        try:
            async with redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(keys.changes)
                if not connected:
                    local.clear()
                    connected = True
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None:
                        provider, _, container_id = message["data"].decode().partition("/")
                        local.drop(provider, container_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any Redis trouble: we may have missed announcements
            if connected:
                local.clear()
                connected = False
            log.debug("change announcements lost (%s); retrying in %.1fs", exc, retry_s)
            await asyncio.sleep(retry_s)
