"""What the cache stores: one compact msgpack record per provider + container.

The record keeps the container exactly as the gateway would answer it (unknown upstream fields
included) as ready JSON bytes, so a hit splices ``extra_fields`` onto it without decoding the
container. ``array_like`` keeps records small; fields are only ever appended, with defaults, and
``v`` tags the layout so an old sidecar can skip a record it does not understand.
"""

from __future__ import annotations

import zlib

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

# Stored records are deflated with a preset dictionary of what container JSON is made of: a
# 600-byte record (container, raw_response, gateway fields) keeps about a third of its size. The
# dictionary is part of the stored format: never change it, add another under a new marker.
_ZLIB_V1 = b"\x01"
_DICTIONARY_V1 = (
    b'"network_policy":{"type":"allowlist","allowed_domains":[]},{"type":"disabled"},'
    b'"routing_info":{},"upstream_latency":,"model_requested":"","chunk_index":0,'
    b'"request_type":"container_retrieve","provider":"openai","raw_response":{'
    b'"skills":[],"file_ids":[],"metadata":{},"memory_limit":"1g","memory_limit":"4g",'
    b'"expires_after":{"anchor":"last_active_at","minutes":20},"last_active_at":17'
    b'"status":"expired","status":"running","created_at":17'
    b'{"id":"cntr_","object":"container","name":"'
)


def encode_record(record: Record) -> bytes:
    """The record's stored bytes: msgpack, deflated when that is smaller."""
    packed = _encoder.encode(record)
    # A 2 KiB window and the smallest hash table: records are small, and a fresh compressor of
    # the default size costs a hundred microseconds to set up.
    deflate = zlib.compressobj(6, zlib.DEFLATED, -11, 1, zlib.Z_DEFAULT_STRATEGY, _DICTIONARY_V1)
    small = deflate.compress(packed) + deflate.flush()
    return _ZLIB_V1 + small if len(small) + 1 < len(packed) else packed


def decode_record(data: bytes) -> Record | None:
    """The record in ``data``, or None if it is of a layout this version does not read."""
    try:
        if data[:1] == _ZLIB_V1:
            inflate = zlib.decompressobj(-15, zdict=_DICTIONARY_V1)
            data = inflate.decompress(data[1:], 1 << 20)
        record = _decoder.decode(data)
    except (msgspec.DecodeError, zlib.error):
        return None
    return record if record.v == RECORD_VERSION else None
