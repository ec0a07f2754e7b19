"""The rest of the container API, passed through to the upstream unchanged.

Create, list, delete and the container files routes are forwarded with the caller's method,
headers, query and streamed body, and answered with the upstream's status, headers and streamed
body. Three answers also feed the cache: a successful DELETE drops the entry at once
(RFC 9111 section 4.4), and a list or a create seeds the containers it returns, for that caller.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import quote

import aiohttp
import msgspec
from aiohttp import web
from multidict import CIMultiDict

from sidecar.credentials import Credential, check_forwardable, identity_header
from sidecar.errors import UpstreamTimeout, UpstreamUnavailable
from sidecar.middleware import OUTCOME, ROUTE_GROUP
from sidecar.settings import upstream_base
from sidecar.state import SERVICES
from sidecar.views import parse_container_id

__all__ = ["add_routes"]

# Hop-by-hop headers (RFC 9110 7.6.1) and what aiohttp recomputes for the relayed body.
_DROP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "host", "content-length", "content-encoding",
})  # fmt: skip
_SEEDING = {("GET", ""), ("POST", "")}  # list and create: small JSON bodies, read whole


def _relayed_headers(headers: Any) -> CIMultiDict[str]:
    """An upstream answer's headers, less hop-by-hop ones."""
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _DROP)


def _forward_headers(headers: Any, credential: Credential, kind: str) -> CIMultiDict[str]:
    """The caller's headers, less hop-by-hop ones, with its identity exactly as read: the
    upstream authenticates with what the cache keyed the answer by, nothing else."""
    forwarded = CIMultiDict(
        (k, check_forwardable(name, v))
        for k, v in headers.items()
        if (name := k.lower()) not in _DROP and not identity_header(kind, name)
    )
    forwarded.extend(credential.headers)
    return forwarded


def _target(request: web.Request, prefix: str, rest: str, kind: str) -> str:
    """The upstream URL: the same route on a gateway, ``/v1/...`` on an OpenAI-style API
    (without ``provider``, a parameter of the gateway's only)."""
    if kind == "bifrost":
        query = request.query_string
        return f"{prefix}/containers{rest}" + (f"?{query}" if query else "")
    params = [(k, v) for k, v in request.query.items() if k != "provider"]
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params)
    return f"/v1/containers{rest}" + (f"?{query}" if query else "")


async def forward(request: web.Request, prefix: str) -> web.StreamResponse:
    """Relay one container API call, feeding the cache where the answer allows."""
    request[ROUTE_GROUP] = "passthrough"
    services = request.app[SERVICES]
    settings = services.settings
    credential = services.credentials.read(request.headers.items())
    info = request.match_info
    rest = ""
    if "container_id" in info:
        rest = "/" + parse_container_id(info["container_id"])
        if "file_id" in info:
            rest += "/files/" + parse_container_id(info["file_id"], param="file_id")
        rest += info.get("tail", "")
    url = upstream_base(settings) + _target(request, prefix, rest, settings.upstream_kind)
    provider = request.query.get("provider", "openai")[:64]
    data = request.content.iter_chunked(65536) if request.body_exists else None
    headers = _forward_headers(request.headers, credential, settings.upstream_kind)
    if request.content_length is not None:
        headers["Content-Length"] = str(request.content_length)
    started = time.perf_counter()
    status: int | None = None
    try:
        async with services.upstream.session.request(
            request.method, url, headers=headers, data=data, allow_redirects=False,
            timeout=services.upstream.stream_timeout,
        ) as upstream:  # fmt: skip
            status = upstream.status
            response: web.StreamResponse
            if (request.method, rest) in _SEEDING:
                body = await upstream.read()
                response = web.Response(
                    body=body, status=status, headers=_relayed_headers(upstream.headers)
                )
                if status == 200:
                    await _seed(request, provider, credential, body, listed=request.method == "GET")
            else:
                response = web.StreamResponse(
                    status=status, headers=_relayed_headers(upstream.headers)
                )
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(65536):
                    await response.write(chunk)
                await response.write_eof()
    except TimeoutError as exc:
        raise UpstreamTimeout(
            f"the upstream did not answer within {settings.upstream_timeout_s:g}s"
        ) from exc
    except aiohttp.ClientError as exc:
        raise UpstreamUnavailable(f"the upstream is unreachable ({type(exc).__name__})") from exc
    finally:
        services.upstream.observe(provider, status, time.perf_counter() - started)
    if request.method == "DELETE" and "file_id" not in info and 200 <= status < 300:
        await services.service.forget(provider, info["container_id"])
    response[OUTCOME] = "bypass" if status < 400 else "error"
    return response


async def _seed(
    request: web.Request, provider: str, credential: Credential, body: bytes, *, listed: bool
) -> None:
    """Cache the containers a list or a create answered, with the provider's own JSON of each
    (a gateway's ``raw_response``; OpenAI's answer itself) for their retrieves' answers."""
    services = request.app[SERVICES]
    if provider not in services.settings.container_providers:
        return
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return
    if not isinstance(document, dict):
        return
    raw = (
        document.get("extra_fields", {}).get("raw_response") if "extra_fields" in document else None
    )
    if listed:
        containers = document.get("data", [])
        raws = {
            item.get("id"): item for item in (raw or {}).get("data", []) if isinstance(item, dict)
        }
    else:
        containers = [document]
        raws = {document.get("id"): raw} if isinstance(raw, dict) else {}
    for container in containers:
        if isinstance(container, dict):
            await services.service.seed(
                provider, credential, container, raws.get(container.get("id"))
            )


def add_routes(router: web.UrlDispatcher, prefix: str) -> None:
    """Register the pass-through routes under one prefix (``/openai/v1``, ``/openai``, ``/v1``)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        return await forward(request, prefix)

    base = f"{prefix}/containers"
    router.add_route("GET", base, handler)
    router.add_route("POST", base, handler)
    router.add_route("DELETE", base + "/{container_id}", handler)
    for method in ("GET", "POST"):
        router.add_route(method, base + "/{container_id}{tail:/files}", handler)
    for method in ("GET", "DELETE"):
        router.add_route(method, base + "/{container_id}/files/{file_id}", handler)
    router.add_route("GET", base + "/{container_id}/files/{file_id}{tail:/content}", handler)
