"""What the cache stores: one compact msgpack record per provider + container.

The record keeps the container exactly as the gateway would answer it (unknown upstream fields
included) as ready JSON bytes, so a hit splices ``extra_fields`` onto it without decoding the
container. ``array_like`` keeps records small; fields are only ever appended, with defaults, and
``v`` tags the layout so an old sidecar can skip a record it does not understand.
"""

from __future__ import annotations

import msgspec

__all__ = ["RECORD_VERSION", "TERMINAL_STATUSES", "Record", "decode_record", "encode_record"]

RECORD_VERSION = 2

#: Statuses OpenAI documents as final: a container in one never changes again. Anything else
#: (``running``, or a status this version does not know) may still change and is polled.
TERMINAL_STATUSES = frozenset({"expired", "deleted"})


class Record(msgspec.Struct, array_like=True, frozen=True, gc=False, kw_only=True):
    """A cached upstream answer for one container (a 200, or a 404 kept as a negative entry)."""

    v: int = RECORD_VERSION
    provider: str
    container_id: str
    status_code: int
    """200 for a container; 404 for a negative entry."""
    body: bytes
    """The container (or a negative entry's error) as the gateway's JSON, no extra_fields."""
    fetched_at_ms: int
    """When the upstream answered (unix ms)."""
    status: str = ""
    """The container's status (``running``, ``expired``...); empty for a negative entry."""
    last_active_at: int = 0
    expires_at: int = 0
    """Predicted expiry (unix s): ``last_active_at`` + ``expires_after.minutes``; 0 if unknown."""
    extra: bytes = b""
    """The upstream's own ``extra_fields`` members as JSON (``"raw_response":{...},...``, no
    braces), without ``latency`` and ``cache_debug``, which each answer sets; empty if none."""
    inline_refresh: bool = False
    """The service credential cannot see this container (another project): stale copies are
    revalidated with a caller's credential instead of by a worker."""

    @property
    def negative(self) -> bool:
        """True for a cached "not found"."""
        return self.status_code != 200

    @property
    def terminal(self) -> bool:
        """True for a container that will not change any more (a documented final status)."""
        return self.status_code == 200 and self.status in TERMINAL_STATUSES


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Record)


def encode_record(record: Record) -> bytes:
    """The record's stored bytes."""
    return _encoder.encode(record)


def decode_record(data: bytes) -> Record | None:
    """The record in ``data``, or None if it is of a layout this version does not read."""
    try:
        record = _decoder.decode(data)
    except msgspec.DecodeError:
        return None
    return record if record.v == RECORD_VERSION else None
