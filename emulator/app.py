"""The emulator's HTTP face: OpenAI's ``/v1`` routes, the gateway's ``/openai`` routes, controls.

The routes: containers and their files, the Files API, and the inference routes of
:mod:`emulator.inference` and :mod:`emulator.realtime`, under each prefix.

Every API request is counted and recorded, delayed by the configured latency, possibly hit by
an injected fault, authenticated, then answered in the shape of the prefix it came in on:
OpenAI's objects and error envelope under ``/v1``, the Bifrost gateway's (``extra_fields``,
``BifrostError``) under ``/openai/v1`` and ``/openai`` (see :mod:`emulator.gateway`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from emulator import control, inference, schema
from emulator.bodies import missing_file, read_form, receive_form
from emulator.config import EmulatorConfig
from emulator.faults import STOPPING, hang_up, inject, pause
from emulator.gateway import ANSWER, BODY, Answer, GatewayRefusal, Result, body_of
from emulator.realtime import realtime
from emulator.schema import ApiError
from emulator.state import EmulatorState

__all__ = ["EMULATOR_STATE", "create_emulator_app"]

EMULATOR_STATE: web.AppKey[EmulatorState] = web.AppKey("emulator_state", EmulatorState)
_encoder = msgspec.json.Encoder()

Operation = Callable[[EmulatorState, str, web.Request], Awaitable[Result | web.StreamResponse]]


async def _take_gateway_fields(request: web.Request, answer: Answer) -> None:
    """A JSON body sent to the gateway: its ``provider`` is the gateway's, the rest the
    provider's (and the gateway echoes it as ``raw_request``)."""
    raw = await request.read()
    try:
        document = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return  # the provider will say what is wrong with it
    if isinstance(document, dict):
        provider = document.pop("provider", None)
        if isinstance(provider, str) and provider:
            answer.provider = provider
            answer.provider_given = True
        answer.raw_request = document
        request[BODY] = _encoder.encode(document)


def _endpoint(
    name: str, request_type: str, operation: Operation, *, gateway: bool, native: bool
) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[EMULATOR_STATE]
        config = state.config
        answer = Answer(request, request_type, config, gateway=gateway, native=native)
        request[ANSWER] = answer
        container_id = request.match_info.get("container_id")
        state.count(name, container_id)
        state.record_request(name, request.method, request.path_qs, request.headers)
        if state.latency_ms > 0 and await pause(request, state.latency_ms / 1000):
            return hang_up(request)
        fault = state.take_fault(name, container_id)
        if fault is not None:
            return await inject(request, fault, answer)
        if gateway and request.method == "POST" and request.content_type == "application/json":
            await _take_gateway_fields(request, answer)
        try:
            project = state.authenticate(answer.credential(request))
            result = await operation(state, project, request)
        except GatewayRefusal as refusal:
            return answer.refuse(refusal)
        except ApiError as exc:
            return answer.error(exc)
        # Streams and websockets answer as they go; the rest answers here.
        return result if isinstance(result, web.StreamResponse) else answer.ok(result)

    return handle


async def _create(state: EmulatorState, project: str, request: web.Request) -> Result:
    return state.create_container(project, schema.parse_create(await body_of(request)))


async def _list(state: EmulatorState, project: str, request: web.Request) -> Result:
    return state.list_containers(project, schema.parse_list_query(request.query))


async def _retrieve(state: EmulatorState, project: str, request: web.Request) -> Result:
    return state.get_container(project, request.match_info["container_id"])


async def _delete(state: EmulatorState, project: str, request: web.Request) -> Result:
    return state.delete_container(project, request.match_info["container_id"])


async def _file_create(state: EmulatorState, project: str, request: web.Request) -> Result:
    """A multipart ``file`` upload, or a JSON ``file_id`` of the Files API to copy."""
    container_id = request.match_info["container_id"]
    if not request.content_type.startswith("multipart/"):
        ref = schema.parse_file_ref(await body_of(request))
        return state.copy_file(project, container_id, ref.file_id)
    fields, upload = await read_form(request)
    if upload is not None:
        return state.create_file(project, container_id, *upload)
    if fields.get("file_id"):
        return state.copy_file(project, container_id, fields["file_id"])
    raise missing_file()


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


async def _upload(state: EmulatorState, project: str, request: web.Request) -> Result:
    """A multipart upload streamed to disk, counted and hashed on the way."""
    path = state.blob_path()
    try:
        with path.open("wb") as sink:
            fields, received = await receive_form(request, sink)
        purpose = schema.parse_purpose(fields.get("purpose"))
        if received is None:
            raise missing_file()
        return state.store_upload(project, received, path, purpose)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


async def _upload_list(state: EmulatorState, project: str, request: web.Request) -> Result:
    return state.list_uploads(project, schema.parse_list_query(request.query))


async def _upload_retrieve(state: EmulatorState, project: str, request: web.Request) -> Result:
    return state.get_upload(project, request.match_info["file_id"])


async def _upload_content(state: EmulatorState, project: str, request: web.Request) -> Result:
    return state.upload_content(project, request.match_info["file_id"])


async def _upload_delete(state: EmulatorState, project: str, request: web.Request) -> Result:
    return state.delete_upload(project, request.match_info["file_id"])


_CONTAINER = "/containers/{container_id}"
_FILE = _CONTAINER + "/files/{file_id}"
# (method, path, route name, the gateway's request_type, operation)
_ROUTES: tuple[tuple[str, str, str, str, Operation], ...] = (
    ("POST", "/containers", "create", "container_create", _create),
    ("GET", "/containers", "list", "container_list", _list),
    ("GET", _CONTAINER, "retrieve", "container_retrieve", _retrieve),
    ("DELETE", _CONTAINER, "delete", "container_delete", _delete),
    ("POST", _CONTAINER + "/files", "file_create", "container_file_create", _file_create),
    ("GET", _CONTAINER + "/files", "file_list", "container_file_list", _file_list),
    ("GET", _FILE, "file_retrieve", "container_file_retrieve", _file_retrieve),
    ("GET", _FILE + "/content", "file_content", "container_file_content", _file_content),
    ("DELETE", _FILE, "file_delete", "container_file_delete", _file_delete),
    ("POST", "/files", "upload", "file_upload", _upload),
    ("GET", "/files", "upload_list", "file_list", _upload_list),
    ("GET", "/files/{file_id}", "upload_retrieve", "file_retrieve", _upload_retrieve),
    ("GET", "/files/{file_id}/content", "upload_content", "file_content", _upload_content),
    ("DELETE", "/files/{file_id}", "upload_delete", "file_delete", _upload_delete),
)
_ROUTES += (*inference.ROUTES, ("GET", "/realtime", "realtime", "realtime", realtime))
_GATEWAY_PREFIXES = ("/openai/v1", "/openai")


@web.middleware
async def _unknown_urls(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A URL (or method) no route serves, answered in JSON as OpenAI does ("Invalid URL
    (GET /v1/x)"): in OpenAI's shape under ``/v1``, elsewhere in the gateway's (which serves
    every other prefix); a proxy relays it as is."""
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed) as exc:
        config = request.app[EMULATOR_STATE].config
        openai = config.v1_face == "openai" and (request.path + "/").startswith("/v1/")
        answer = Answer(request, "", config, gateway=not openai)
        return answer.error(ApiError(exc.status, f"Invalid URL ({request.method} {request.path})"))


async def _wake_sleepers(app: web.Application) -> None:
    app[STOPPING].set()
    app[EMULATOR_STATE].streams.changed()


async def _remove_files(app: web.Application) -> None:
    app[EMULATOR_STATE].close()


def create_emulator_app(config: EmulatorConfig) -> web.Application:
    """The emulator: OpenAI's container and file routes, the gateway's, and the controls."""
    app = web.Application(middlewares=[_unknown_urls])
    state = app[EMULATOR_STATE] = EmulatorState(config)
    app[STOPPING] = asyncio.Event()
    app.on_shutdown.append(_wake_sleepers)
    app.on_cleanup.append(_remove_files)
    native = config.v1_face == "gateway"
    faces = [("/v1", native, native)] + [(prefix, True, False) for prefix in _GATEWAY_PREFIXES]
    for prefix, gateway, native in faces:
        for method, path, name, request_type, operation in _ROUTES:
            handler = _endpoint(name, request_type, operation, gateway=gateway, native=native)
            app.router.add_route(method, prefix + path, handler)
    app.router.add_routes(control.routes(state))
    return app
