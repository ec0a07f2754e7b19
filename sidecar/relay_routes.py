"""What a relayed request's path says: its route family (a metrics label), the upstream target,
and, on a container route, what a successful answer means for the cache: a list or a create
seeds it, a DELETE drops the entry at once (RFC 9111 section 4.4), any other change marks the
container for revalidation (every container operation moves its ``last_active_at``).
"""

from __future__ import annotations

import posixpath
from typing import NamedTuple
from urllib.parse import parse_qsl, unquote, unquote_plus

import msgspec

from sidecar.credentials import Credential
from sidecar.errors import InvalidParameter
from sidecar.service import ContainerService
from sidecar.settings import PROVIDER_NAME, Settings

__all__ = ["Call", "container_call", "family", "keep_cache_right", "target"]

_CONTAINER_PREFIXES = ("/openai/v1/containers", "/openai/containers", "/v1/containers")
_UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_FAMILY_PREFIXES = frozenset({"openai", "anthropic", "genai", "litellm", "langchain", "v1",
                              "v1beta"})  # fmt: skip
_FAMILIES = {"chat": "chat", "messages": "chat", "completions": "completions",
             "responses": "responses", "embeddings": "embeddings", "files": "files",
             "uploads": "files", "audio": "audio", "images": "images", "models": "models",
             "containers": "containers", "batches": "batches", "realtime": "realtime"}  # fmt: skip


def family(path: str) -> str:
    """The route family of a path, from a closed set (``metrics.RELAY_FAMILIES``)."""
    deployment = False
    for part in path.split("/", 8)[1:8]:
        found = _FAMILIES.get(part)
        if deployment:  # Azure's /openai/deployments/<name>/...: any name
            deployment = False
        elif found is not None:
            return found
        elif part == "deployments":
            deployment = True
        elif part not in _FAMILY_PREFIXES and not part.endswith("_passthrough"):
            break
    return "other"


class Call(NamedTuple):
    """A request on a container route."""

    container_id: str
    """The container, or ``""`` for the collection (list, create)."""
    whole: bool
    """On the container (or the collection) itself, not on its files."""


def container_call(path: str) -> Call | None:
    """The container a raw path is about, if any. Such a path must be written plainly (no
    escapes, dot or empty segments: the gateway would normalise them to a route the cache
    would not see), with plausible ids."""
    plain = path
    if "%" in path or "/." in path or "//" in path:
        plain = posixpath.normpath(unquote(path))
    prefix = next((p for p in _CONTAINER_PREFIXES if plain.startswith(p)), None)
    if prefix is None or plain[len(prefix) : len(prefix) + 1] not in ("", "/"):
        return None
    if plain != path or path.endswith("/"):
        raise InvalidParameter(
            "a container route must be written plainly: no escapes, dot or empty segments",
            param="path",
        )
    from sidecar.views import parse_container_id  # views imports the app's state

    parts = path[len(prefix) + 1 :].split("/") if len(path) > len(prefix) else []
    if not parts:
        return Call("", True)
    if len(parts) > 2 and parts[1] == "files":
        parse_container_id(parts[2], param="file_id")
    return Call(parse_container_id(parts[0]), len(parts) == 1)


def target(path: str, mark: str, query: str, call: Call | None, kind: str) -> str:
    """The upstream path and query: as sent to a gateway; straight against OpenAI every prefix
    is ``/v1`` (an app's ``/openai/v1`` base URL) and container routes lose ``provider``."""
    if kind != "openai":
        return path + mark + query
    for old in ("/openai/v1", "/openai"):
        if path == old or path.startswith(old + "/"):
            path = "/v1" + path[len(old) :]
            break
    if call is None:
        return path + mark + query
    kept = [p for p in query.split("&") if p and unquote_plus(p.partition("=")[0]) != "provider"]
    return path + ("?" + "&".join(kept) if kept else "")


async def keep_cache_right(
    service: ContainerService, settings: Settings, method: str, call: Call, query: str,
    credential: Credential, body: bytes | None,
) -> None:  # fmt: skip
    """Apply what a successful container call means for the cache (``body``: a small list's or
    create's answer)."""
    # The first value, decoded once, as the gateway (Go) reads it.
    fields = parse_qsl(query, keep_blank_values=True)
    asked = next((value for key, value in fields if key == "provider"), "") or "openai"
    if not PROVIDER_NAME.fullmatch(asked):
        return
    if call.container_id == "":
        if body is not None and asked in settings.container_providers:
            await _seed(service, asked, credential, body, listed=method == "GET")
        return
    if method not in _UNSAFE:
        return
    if method == "DELETE" and call.whole:
        await service.forget(asked, call.container_id)
    else:
        await service.revalidate(asked, call.container_id)


async def _seed(
    service: ContainerService, provider: str, credential: Credential, body: bytes, *, listed: bool
) -> None:
    """Cache the containers a list or a create answered, with the provider's own JSON of each
    (a gateway's ``raw_response``; OpenAI's answer itself) for their retrieves' answers."""
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return
    if not isinstance(document, dict):
        return
    extra = document.get("extra_fields")
    raw = extra.get("raw_response") if isinstance(extra, dict) else None
    if listed:
        containers = document.get("data", [])
        items = raw.get("data", []) if isinstance(raw, dict) else []
        raws = {item.get("id"): item for item in items if isinstance(item, dict)}
    else:
        containers = [document]
        raws = {document.get("id"): raw} if isinstance(raw, dict) else {}
    for container in containers if isinstance(containers, list) else ():
        if isinstance(container, dict):
            await service.seed(provider, credential, container, raws.get(container.get("id")))
