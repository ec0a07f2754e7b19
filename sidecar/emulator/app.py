"""The emulator's HTTP face: OpenAI's ``/v1`` routes, the gateway's ``/openai`` routes, controls.

Every API request is counted, delayed by the configured latency, possibly hit by an injected
fault, authenticated, then answered in the shape of the prefix it came in on: OpenAI's objects
and error envelope under ``/v1``, the Bifrost gateway's (``extra_fields``, ``BifrostError``) under
``/openai/v1`` and ``/openai``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import msgspec
from aiohttp import BodyPartReader, web
from aiohttp.typedefs import Handler

from sidecar.emulator import control, schema
from sidecar.emulator.schema import ApiError
from sidecar.emulator.state import EmulatorConfig, EmulatorState, Fault

__all__ = ["EMULATOR_STATE", "create_emulator_app"]

EMULATOR_STATE: web.AppKey[EmulatorState] = web.AppKey("emulator_state", EmulatorState)
# Set on shutdown so that hanging requests (timeout faults, latency) end at once.
_STOPPING = web.AppKey("emulator_stopping", asyncio.Event)

_GATEWAY_PROVIDERS = frozenset({"openai", "azure"})
_HANG_S = 3600.0
_encoder = msgspec.json.Encoder()

Result = dict[str, Any] | bytes
Operation = Callable[[EmulatorState, str, web.Request], Awaitable[Result]]


class _GatewayErrorField(msgspec.Struct, omit_defaults=True, gc=False):
    message: str
    type: str = ""
    code: str = ""
    param: str = ""


class _GatewayErrorExtra(msgspec.Struct, omit_defaults=True, gc=False):
    provider: str = ""
    request_type: str = ""
    raw_response: dict[str, Any] | None = None


class _GatewayError(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """The gateway's ``BifrostError``, fields omitted when empty as its Go struct does."""

    type: str = ""
    is_bifrost_error: bool
    status_code: int
    error: _GatewayErrorField
    extra_fields: _GatewayErrorExtra


def _json(payload: object, status: int = 200) -> web.Response:
    """A JSON answer encoded by msgspec."""
    return web.Response(
        body=_encoder.encode(payload), status=status, content_type="application/json"
    )


class _Answer:
    """How one API request is answered: in OpenAI's shape or in the gateway's."""

    __slots__ = ("gateway", "provider", "request_type", "started")

    def __init__(self, request: web.Request, request_type: str, gateway: bool) -> None:
        self.started = time.perf_counter()
        self.gateway = gateway
        self.request_type = request_type
        self.provider = (request.query.get("provider") or "openai") if gateway else "openai"

    def ok(self, result: Result) -> web.Response:
        if isinstance(result, bytes):
            return web.Response(body=result, content_type="application/octet-stream")
        if self.gateway:
            # The gateway's container struct has no network_policy: it is lost on the way.
            for item in (result, *result.get("data", ())):
                item.pop("network_policy", None)
            result["extra_fields"] = {
                "request_type": self.request_type,
                "provider": self.provider,
                "latency": int((time.perf_counter() - self.started) * 1000),
                "chunk_index": 0,
            }
        return _json(result)

    def error(self, exc: ApiError) -> web.Response:
        if not self.gateway:
            return _json(exc.envelope(), exc.status)
        field = _GatewayErrorField(exc.message, exc.type, exc.code or "", exc.param or "")
        extra = _GatewayErrorExtra(self.provider, self.request_type, exc.envelope())
        body = _GatewayError(
            is_bifrost_error=False, status_code=exc.status, error=field, extra_fields=extra
        )
        return _json(body, exc.status)

    def gateway_error(
        self, status: int, message: str, *, type: str = "", code: str = ""
    ) -> web.Response:
        """An error the gateway makes itself, without asking the provider."""
        body = _GatewayError(
            type=type,
            is_bifrost_error=False,
            status_code=status,
            error=_GatewayErrorField(message, code=code),
            extra_fields=_GatewayErrorExtra(self.provider, self.request_type),
        )
        return _json(body, status)


def _bearer(request: web.Request) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _gateway_key(request: web.Request) -> str | None:
    """The credential the gateway would use: bearer, x-api-key, x-goog-api-key, then x-bf-vk."""
    key = _bearer(request)
    for header in ("x-api-key", "x-goog-api-key", "x-bf-vk"):
        key = key or request.headers.get(header, "").strip() or None
    return key


async def _pause(request: web.Request, seconds: float) -> bool:
    """Sleep, cut short when the server stops; True if it was cut short."""
    try:
        async with asyncio.timeout(seconds):
            await request.app[_STOPPING].wait()
    except TimeoutError:
        return False
    return True


def _hang_up(request: web.Request) -> web.Response:
    """Close the connection without an answer; aiohttp then drops the response quietly."""
    if request.transport is not None:
        request.transport.close()
    return web.Response()


async def _cut_short(request: web.Request) -> web.StreamResponse:
    """Drop the connection mid-answer: headers and a fragment of the body, then nothing.

    Unlike a hang-up before any answer, which HTTP clients may retry by themselves (aiohttp does,
    once, for idempotent requests), every client sees this one fail.
    """
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = 1024
    await response.prepare(request)
    await response.write(b'{"id": "cntr_')
    _hang_up(request)
    return response


_FAULT_ERRORS: dict[int, tuple[str, str, str | None]] = {
    429: (
        "Rate limit reached for requests per min (RPM): Limit 100, Used 100, Requested 1. "
        "Please try again later.",
        "requests",
        "rate_limit_exceeded",
    ),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
    503: ("The server is overloaded or not ready yet.", "server_error", None),
}


async def _inject(request: web.Request, fault: Fault, answer: _Answer) -> web.StreamResponse:
    if fault.kind == "status":
        kind = "server_error" if fault.status >= 500 else "invalid_request_error"
        fallback = (f"The server answered HTTP {fault.status} (injected fault).", kind, None)
        message, kind, code = _FAULT_ERRORS.get(fault.status, fallback)
        response = answer.error(ApiError(fault.status, message, type=kind, code=code))
        if fault.retry_after_s is not None:
            # Retry-After takes whole seconds; OpenAI adds the precise value in milliseconds.
            response.headers["Retry-After"] = str(math.ceil(fault.retry_after_s))
            response.headers["retry-after-ms"] = str(int(fault.retry_after_s * 1000))
        return response
    if fault.kind == "malformed":
        return web.Response(body=b'{"id": "cntr_', content_type="application/json")
    if fault.kind == "reset":
        return await _cut_short(request)
    if fault.kind == "timeout":
        await _pause(request, _HANG_S)
    return _hang_up(request)


def _endpoint(name: str, operation: Operation, *, gateway: bool) -> Handler:
    request_type = "container_" + name

    async def handle(request: web.Request) -> web.StreamResponse:
        answer = _Answer(request, request_type, gateway)
        state = request.app[EMULATOR_STATE]
        container_id = request.match_info.get("container_id")
        state.count(name, container_id)
        if state.latency_ms > 0 and await _pause(request, state.latency_ms / 1000):
            return _hang_up(request)
        fault = state.take_fault(name, container_id)
        if fault is not None:
            return await _inject(request, fault, answer)
        key = _gateway_key(request) if gateway else _bearer(request)
        if gateway and key is None:
            message = "virtual key is required. Provide a virtual key via the x-bf-vk header."
            return answer.gateway_error(401, message, type="virtual_key_required")
        if gateway and answer.provider not in _GATEWAY_PROVIDERS:
            message = f"{request_type} is not supported by {answer.provider} provider"
            return answer.gateway_error(500, message, code="unsupported_operation")
        try:
            return answer.ok(await operation(state, state.authenticate(key), request))
        except ApiError as exc:
            return answer.error(exc)

    return handle


async def _read_upload(request: web.Request) -> tuple[str, bytes]:
    """The uploaded file's name and bytes: a multipart ``file`` part, or a JSON file_id."""
    if not request.content_type.startswith("multipart/"):
        ref = schema.parse_file_ref(await request.read())
        return ref.file_id, b""  # no Files API here: a referenced file is empty
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if isinstance(part, BodyPartReader) and part.name == "file":
                # aiohttp's own client percent-encodes filenames; curl and httpx send them raw.
                return unquote(part.filename or "upload"), bytes(await part.read())
    except ValueError as exc:
        raise ApiError(400, f"Could not parse the multipart body: {exc}") from None
    message = "Missing required parameter: 'file'."
    raise ApiError(400, message, param="file", code="missing_required_parameter")


async def _create(state: EmulatorState, project: str, request: web.Request) -> Result:
    return state.create_container(project, schema.parse_create(await request.read()))


async def _list(state: EmulatorState, project: str, request: web.Request) -> Result:
    return state.list_containers(project, schema.parse_list_query(request.query))


async def _retrieve(state: EmulatorState, project: str, request: web.Request) -> Result:
    return state.get_container(project, request.match_info["container_id"])


async def _delete(state: EmulatorState, project: str, request: web.Request) -> Result:
    return state.delete_container(project, request.match_info["container_id"])


async def _file_create(state: EmulatorState, project: str, request: web.Request) -> Result:
    filename, content = await _read_upload(request)
    return state.create_file(project, request.match_info["container_id"], filename, content)


async def _file_list(state: EmulatorState, project: str, request: web.Request) -> Result:
    query = schema.parse_list_query(request.query)
    return state.list_files(project, request.match_info["container_id"], query)


async def _file_retrieve(state: EmulatorState, project: str, request: web.Request) -> Result:
    ids = request.match_info
    return state.get_file(project, ids["container_id"], ids["file_id"])


async def _file_content(state: EmulatorState, project: str, request: web.Request) -> Result:
    ids = request.match_info
    return state.file_content(project, ids["container_id"], ids["file_id"])


async def _file_delete(state: EmulatorState, project: str, request: web.Request) -> Result:
    ids = request.match_info
    return state.delete_file(project, ids["container_id"], ids["file_id"])


_ROUTES: tuple[tuple[str, str, str, Operation], ...] = (
    ("POST", "/containers", "create", _create),
    ("GET", "/containers", "list", _list),
    ("GET", "/containers/{container_id}", "retrieve", _retrieve),
    ("DELETE", "/containers/{container_id}", "delete", _delete),
    ("POST", "/containers/{container_id}/files", "file_create", _file_create),
    ("GET", "/containers/{container_id}/files", "file_list", _file_list),
    ("GET", "/containers/{container_id}/files/{file_id}", "file_retrieve", _file_retrieve),
    ("GET", "/containers/{container_id}/files/{file_id}/content", "file_content", _file_content),
    ("DELETE", "/containers/{container_id}/files/{file_id}", "file_delete", _file_delete),
)
# (prefix, answers in the gateway's shape)
_PREFIXES = (("/v1", False), ("/openai/v1", True), ("/openai", True))


async def _wake_sleepers(app: web.Application) -> None:
    app[_STOPPING].set()


def create_emulator_app(config: EmulatorConfig) -> web.Application:
    """The emulator: OpenAI's container routes, the gateway's, and the ``/_emulator`` controls."""
    app = web.Application()
    state = app[EMULATOR_STATE] = EmulatorState(config)
    app[_STOPPING] = asyncio.Event()
    app.on_shutdown.append(_wake_sleepers)
    for prefix, gateway in _PREFIXES:
        for method, path, name, operation in _ROUTES:
            app.router.add_route(method, prefix + path, _endpoint(name, operation, gateway=gateway))
    app.router.add_routes(control.routes(state))
    return app
