"""What the OpenAI Containers API accepts and how it refuses: bodies, queries, the error envelope.

Request bodies are decoded by typed msgspec decoders; a refusal is translated to OpenAI's 400
with ``param`` naming the offending field, as the real API does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any, Literal, Protocol, TypeVar

import msgspec

__all__ = [
    "BAD_JSON_MESSAGE",
    "KEY_HINT",
    "NO_KEY_MESSAGE",
    "ApiError",
    "CreateBody",
    "FileRef",
    "ListQuery",
    "NetworkPolicy",
    "Skill",
    "invalid_body",
    "list_page",
    "mask_key",
    "parse_create",
    "parse_file_ref",
    "parse_list_query",
    "parse_overrides",
    "parse_purpose",
    "render_network_policy",
]

_KEYS_URL = "https://platform.openai.com/account/api-keys"
NO_KEY_MESSAGE = (
    "You didn't provide an API key. You need to provide your API key in an Authorization header "
    "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with "
    "blank username) if you're accessing the API from your browser and are prompted for a "
    f"username and password. You can obtain an API key from {_KEYS_URL}."
)
KEY_HINT = f"You can find your API key at {_KEYS_URL}."
BAD_JSON_MESSAGE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
    "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was "
    "not valid JSON.)"
)


class ApiError(Exception):
    """An answer in OpenAI's error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def envelope(self) -> dict[str, Any]:
        """The body OpenAI sends: ``{"error": {message, type, param, code}}``."""
        error = {"message": self.message, "type": self.type, "param": self.param}
        return {"error": {**error, "code": self.code}}


def mask_key(key: str) -> str:
    """A key as OpenAI echoes it: enough to recognise, never the whole secret."""
    if len(key) < 12:
        return "*" * len(key)
    return f"{key[:3]}...{key[-4:]}"


_MINUTES = Annotated[int, msgspec.Meta(ge=1, le=1440)]


class _ExpiresAfter(msgspec.Struct, forbid_unknown_fields=True):
    anchor: Literal["last_active_at"]
    minutes: _MINUTES


class _Disabled(msgspec.Struct, forbid_unknown_fields=True, tag_field="type", tag="disabled"):
    pass


class _DomainSecret(msgspec.Struct, forbid_unknown_fields=True):
    domain: str
    name: str
    value: str


class _Allowlist(msgspec.Struct, forbid_unknown_fields=True, tag_field="type", tag="allowlist"):
    allowed_domains: list[str]
    domain_secrets: list[_DomainSecret] | None = None


NetworkPolicy = _Disabled | _Allowlist


def render_network_policy(policy: NetworkPolicy | None) -> dict[str, Any]:
    """A network policy as a container shows it: its secrets are never echoed."""
    if isinstance(policy, _Allowlist):
        return {"type": "allowlist", "allowed_domains": list(policy.allowed_domains)}
    return {"type": "disabled"}


class _SkillReference(
    msgspec.Struct, forbid_unknown_fields=True, tag_field="type", tag="skill_reference"
):
    skill_id: str
    version: str | None = None


class _InlineSource(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["base64"]
    media_type: Literal["application/zip"]
    data: str


class _InlineSkill(msgspec.Struct, forbid_unknown_fields=True, tag_field="type", tag="inline"):
    name: str
    description: str
    source: _InlineSource


Skill = _SkillReference | _InlineSkill


class CreateBody(msgspec.Struct, forbid_unknown_fields=True):
    """The body of ``POST /v1/containers``: OpenAI's fields, and ``metadata``."""

    name: str
    expires_after: _ExpiresAfter | None = None
    memory_limit: Literal["1g", "4g", "16g", "64g"] = "1g"
    # Not an OpenAI field: the gateway's create request has it, and tests use it.
    metadata: dict[str, str] | None = None
    file_ids: list[str] | None = None
    network_policy: NetworkPolicy | None = None
    skills: list[Skill] | None = None


class _Overrides(msgspec.Struct, forbid_unknown_fields=True):
    name: str | msgspec.UnsetType = msgspec.UNSET
    created_at: int | msgspec.UnsetType = msgspec.UNSET
    last_active_at: int | msgspec.UnsetType = msgspec.UNSET
    status: str | msgspec.UnsetType | None = msgspec.UNSET
    memory_limit: str | msgspec.UnsetType = msgspec.UNSET
    metadata: dict[str, str] | msgspec.UnsetType | None = msgspec.UNSET
    expires_after: _ExpiresAfter | msgspec.UnsetType = msgspec.UNSET
    network_policy: NetworkPolicy | msgspec.UnsetType = msgspec.UNSET


class ListQuery(msgspec.Struct, frozen=True):
    """The query of a list route: ``limit`` 1..100, ``after`` a cursor id, ``order``, and
    for containers ``name`` (only containers of that exact name)."""

    limit: int = 20
    after: str | None = None
    order: Literal["asc", "desc"] = "desc"
    name: str | None = None


class FileRef(msgspec.Struct, forbid_unknown_fields=True):
    """The JSON body of ``POST /v1/containers/{id}/files``: a file of the Files API."""

    file_id: str


_create_decoder = msgspec.json.Decoder(CreateBody)
_file_ref_decoder = msgspec.json.Decoder(FileRef)
_AT = re.compile(r" - at `\$\.?([^`]*)`$")
_FIELD = re.compile(r"field `([^`]+)`")


def invalid_body(exc: msgspec.DecodeError) -> ApiError:
    """OpenAI's 400 for a body msgspec refused, with ``param`` naming the field."""
    if not isinstance(exc, msgspec.ValidationError):
        return ApiError(400, BAD_JSON_MESSAGE)
    detail = str(exc)
    at = _AT.search(detail)
    path = at.group(1) if at else ""
    detail = detail[: at.start()] if at else detail
    field = _FIELD.search(detail)
    if field:
        path = f"{path}.{field.group(1)}" if path else field.group(1)
    if "missing required" in detail:
        message, code = f"Missing required parameter: '{path}'.", "missing_required_parameter"
    elif "unknown field" in detail:
        message, code = f"Unknown parameter: '{path}'.", "unknown_parameter"
    else:
        message, code = f"Invalid '{path or 'body'}': {detail}.", "invalid_value"
    return ApiError(400, message, param=path or None, code=code)


def parse_create(raw: bytes) -> CreateBody:
    """A create body, or the 400 OpenAI would answer."""
    try:
        return _create_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise invalid_body(exc) from None


def parse_file_ref(raw: bytes) -> FileRef:
    """A file reference body, or the 400 OpenAI would answer."""
    try:
        return _file_ref_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        raise invalid_body(exc) from None


def parse_list_query(query: Mapping[str, str]) -> ListQuery:
    """A list query, or the 400 OpenAI would answer."""
    limit = query.get("limit", "20")
    if not limit.isdigit() or not 1 <= int(limit) <= 100:
        message = f"Invalid 'limit': expected an integer between 1 and 100, got '{limit}'."
        raise ApiError(400, message, param="limit", code="invalid_value")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        message = f"Invalid value: '{order}'. Supported values are: 'asc' and 'desc'."
        raise ApiError(400, message, param="order", code="invalid_value")
    direction: Literal["asc", "desc"] = "asc" if order == "asc" else "desc"
    name = query.get("name")
    return ListQuery(int(limit), query.get("after") or None, direction, name)


_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")


def parse_purpose(purpose: str | None) -> str:
    """The ``purpose`` of a Files API upload, or the 400 OpenAI would answer."""
    if not purpose:
        message = "Missing required parameter: 'purpose'."
        raise ApiError(400, message, param="purpose", code="missing_required_parameter")
    if purpose not in _PURPOSES:
        supported = ", ".join(f"'{p}'" for p in _PURPOSES)
        message = f"Invalid value for 'purpose': '{purpose}'. Supported values are: {supported}."
        raise ApiError(400, message, param="purpose", code="invalid_value")
    return purpose


def parse_overrides(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Container attributes to overwrite, from the fields of the JSON object."""
    try:
        overrides = msgspec.convert(fields, _Overrides)
    except msgspec.ValidationError as exc:
        raise invalid_body(exc) from None
    out: dict[str, Any] = {}
    for name, value in msgspec.structs.asdict(overrides).items():
        if value is msgspec.UNSET:
            continue
        if name == "status":
            out["pinned_status"] = value
        elif name == "expires_after":
            out["expires_minutes"] = value.minutes
        elif name == "network_policy":
            out[name] = render_network_policy(value)
        else:
            out[name] = value
    return out


class _Listed(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def created_at(self) -> int: ...


_T = TypeVar("_T", bound=_Listed)


def list_page(
    items: Sequence[_T], query: ListQuery, kind: str, render: Callable[[_T], dict[str, Any]]
) -> dict[str, Any]:
    """OpenAI's list envelope for one page of ``items``, ordered by creation then cursor."""
    ordered = sorted(items, key=lambda item: (item.created_at, item.seq))
    if query.order == "desc":
        ordered.reverse()
    start = 0
    if query.after is not None:
        ids = [item.id for item in ordered]
        if query.after not in ids:
            message = f"Invalid 'after': no {kind} with id '{query.after}'."
            raise ApiError(400, message, param="after", code="invalid_value")
        start = ids.index(query.after) + 1
    data = [render(item) for item in ordered[start : start + query.limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": start + query.limit < len(ordered),
    }
