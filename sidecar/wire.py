"""The gateway's JSON shapes: containers, ``extra_fields``, ``cache_debug`` and errors.

Field order and omission follow the gateway's Go structs (``omitempty``): see
``../shared/reference/bifrost-containers.md``. Containers are kept as JSON bytes so that unknown
upstream fields survive and a hit never re-encodes the container.
"""

from __future__ import annotations

from typing import Any

import msgspec

from sidecar.errors import SidecarError, UpstreamMalformed

__all__ = [
    "REQUEST_TYPE",
    "CacheDebug",
    "Container",
    "default_extra",
    "error_body",
    "gateway_error_from_openai",
    "normalize_container",
    "openai_answer",
    "render_container",
    "split_gateway_answer",
    "with_cache_debug",
]

REQUEST_TYPE = "container_retrieve"


class CacheDebug(msgspec.Struct, omit_defaults=True, gc=False):
    """``extra_fields.cache_debug``: what the cache did for this answer (the gateway's fields
    about models and tokens never apply to a container)."""

    cache_hit: bool
    cache_id: str | None = None
    hit_type: str | None = None
    requested_provider: str | None = None
    provider_used: str | None = None
    threshold: float | None = None
    similarity: float | None = None


class _ErrorField(msgspec.Struct, omit_defaults=True, gc=False):
    message: str
    type: str = ""
    code: str = ""
    param: str = ""


class _ErrorExtraFields(msgspec.Struct, omit_defaults=True, gc=False):
    provider: str = ""
    request_type: str = ""
    raw_response: msgspec.Raw | None = None


class _BifrostError(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    type: str = ""
    is_bifrost_error: bool
    status_code: int
    error: _ErrorField
    extra_fields: _ErrorExtraFields


class ExpiresAfter(msgspec.Struct, gc=False):
    anchor: str = ""
    minutes: int = 0


class Container(msgspec.Struct, gc=False):
    """The known fields of a container, for type checks; unknown fields are kept aside."""

    id: str
    name: str = ""
    created_at: int = 0
    object: str = ""
    status: str = ""
    expires_after: ExpiresAfter | None = None
    last_active_at: int = 0
    memory_limit: str = ""
    metadata: dict[str, str] | None = None


_encoder = msgspec.json.Encoder()
_ALWAYS = {"id": "", "name": "", "created_at": 0}  # sent even when empty; the rest is omitempty
_ORDER = (
    "id", "object", "name", "created_at", "status", "expires_after",
    "last_active_at", "memory_limit", "metadata",
)  # fmt: skip


def normalize_container(payload: Any, *, keep_unknown: bool = True) -> tuple[bytes, Container]:
    """The container's gateway JSON (omitempty applied; unknown fields kept unless
    ``keep_unknown`` is false) and typed fields."""
    if not isinstance(payload, dict):
        raise UpstreamMalformed("upstream answered 200 with a body that is not a container")
    try:
        container = msgspec.convert(payload, Container)
    except msgspec.ValidationError as exc:
        raise UpstreamMalformed(f"upstream container is malformed: {exc}") from None
    if not container.id:
        raise UpstreamMalformed("upstream container has no id")
    out: dict[str, Any] = {}
    for name in _ORDER:
        value = payload.get(name)
        if name in _ALWAYS:
            out[name] = _ALWAYS[name] if value is None else value
        elif value not in (None, "", 0, {}, []) or value is False:
            out[name] = value
    if keep_unknown:
        out.update((k, v) for k, v in payload.items() if k not in _ORDER and k != "extra_fields")
    return _encoder.encode(out), container


def predicted_expiry(container: Container) -> int:
    """When the container will expire if nobody touches it (unix s), or 0 if unknown."""
    after = container.expires_after
    if after is None or after.minutes <= 0 or not container.last_active_at:
        return 0
    if after.anchor not in ("", "last_active_at"):
        return 0
    return container.last_active_at + after.minutes * 60


_raw_members = msgspec.json.Decoder(dict[str, msgspec.Raw])
_LATENCY = b"\x00"
"""Where ``latency`` stands among stored ``extra_fields`` members (NUL is never in JSON text)."""


def split_gateway_answer(raw: bytes) -> tuple[bytes, bytes, Container]:
    """A gateway's container answer: the container's JSON, its ``extra_fields`` members
    (``latency`` marked, ``cache_debug`` dropped: each answer sets its own), the typed fields."""
    try:
        members = _raw_members.decode(raw)
        extra = _raw_members.decode(members.pop("extra_fields", msgspec.Raw(b"{}")))
    except msgspec.DecodeError:  # a ValidationError too
        raise UpstreamMalformed(
            "upstream answered 200 with a body that is not a container"
        ) from None
    body = b"{" + b",".join(_encoder.encode(k) + b":" + bytes(v) for k, v in members.items()) + b"}"
    try:
        container = msgspec.json.decode(body, type=Container)
    except msgspec.DecodeError as exc:
        raise UpstreamMalformed(f"upstream container is malformed: {exc}") from None
    if not container.id:
        raise UpstreamMalformed("upstream container has no id")
    extra.pop("cache_debug", None)
    if "latency" not in extra:
        extra["latency"] = msgspec.Raw(b"0")
    parts = [_LATENCY if name == "latency" else _encoder.encode(name) + b":" + bytes(value)
             for name, value in extra.items()]  # fmt: skip
    return body, b",".join(parts), container


def openai_answer(raw: bytes, provider: str) -> tuple[bytes, bytes, Container]:
    """An OpenAI-style container answer as the gateway relays it: the known fields, and the
    provider's JSON in ``extra_fields.raw_response`` (``network_policy`` and such live there)."""
    try:
        payload = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise UpstreamMalformed("upstream answered 200 with a body that is not JSON") from None
    body, container = normalize_container(payload, keep_unknown=False)
    return body, default_extra(provider) + b',"raw_response":' + raw.strip(), container


def default_extra(provider: str) -> bytes:
    """The ``extra_fields`` members the gateway adds to a provider's container (and a record
    stored without any gets)."""
    return b",".join(
        (
            b'"request_type":' + _encoder.encode(REQUEST_TYPE),
            b'"provider":' + _encoder.encode(provider),
            _LATENCY,
            b'"chunk_index":0',
        )
    )


def render_container(body: bytes, extra: bytes, latency_ms: int, debug: CacheDebug) -> bytes:
    """A retrieve's answer: the stored container, its ``extra_fields`` and this ``cache_debug``."""
    head, _, tail = extra.partition(_LATENCY)
    return b"".join(
        (body[:-1], b',"extra_fields":{', head, b'"latency":', str(latency_ms).encode(), tail,
         b',"cache_debug":', _encoder.encode(debug), b"}}")
    )  # fmt: skip


def error_body(exc: SidecarError, provider: str, request_type: str = REQUEST_TYPE) -> bytes:
    """A sidecar error in the gateway's ``BifrostError`` shape."""
    return _encoder.encode(
        _BifrostError(
            is_bifrost_error=exc.is_bifrost_error,
            status_code=exc.status,
            type=exc.type,
            error=_ErrorField(message=exc.message, type=exc.type, code=exc.code, param=exc.param),
            extra_fields=_ErrorExtraFields(provider=provider, request_type=request_type),
        )
    )


class _OpenAIError(msgspec.Struct, gc=False):
    message: str = ""
    type: str | None = None
    code: str | int | None = None
    param: str | None = None


class _OpenAIEnvelope(msgspec.Struct, gc=False):
    error: _OpenAIError


def gateway_error_from_openai(status: int, raw: bytes, provider: str) -> bytes:
    """Map an OpenAI-style error answer to the gateway's shape, keeping the body as raw_response."""
    try:
        upstream = msgspec.json.decode(raw, type=_OpenAIEnvelope).error
        raw_response: msgspec.Raw | None = msgspec.Raw(raw)
    except msgspec.DecodeError:
        upstream = _OpenAIError()
        raw_response = None
    return _encoder.encode(
        _BifrostError(
            is_bifrost_error=False,
            status_code=status,
            error=_ErrorField(
                message=upstream.message or f"upstream answered HTTP {status}",
                type=upstream.type or "",
                code=str(upstream.code) if upstream.code is not None else "",
                param=upstream.param or "",
            ),
            extra_fields=_ErrorExtraFields(
                provider=provider, request_type=REQUEST_TYPE, raw_response=raw_response
            ),
        )
    )


def with_cache_debug(error_json: bytes, debug: CacheDebug) -> bytes:
    """A stored error answer with this request's ``cache_debug`` added to its extra_fields."""
    document = msgspec.json.decode(error_json)
    extra = document.setdefault("extra_fields", {})
    extra["cache_debug"] = msgspec.to_builtins(debug)
    return _encoder.encode(document)
