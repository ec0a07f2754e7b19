"""How an answer is shaped: OpenAI's objects under ``/v1``, the Bifrost gateway's elsewhere.

The gateway face follows the gateway's Go source: it checks the caller's virtual key (when keys
are required), looks the ``provider`` up among its configured providers (an unknown one is a 400
"failed to get config for provider ..."; one without a containers API is ``unsupported_operation``),
then answers the provider's object with ``extra_fields``: ``raw_response`` is the provider's own
JSON, because the gateway forces raw responses on for container requests, and the container
loses ``network_policy``, which the gateway's struct does not have. Errors come in its
``BifrostError`` shape.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from emulator.config import EmulatorConfig
from emulator.schema import ApiError

__all__ = [
    "ANSWER", "BODY", "INFERENCE", "Answer", "GatewayRefusal", "bearer", "body_of", "json_response",
]  # fmt: skip

_encoder = msgspec.json.Encoder()
_VK_REQUIRED = "virtual key is required. Provide a virtual key via the x-bf-vk header."

Result = dict[str, Any] | bytes | Path
# Request types of the inference routes: any configured provider serves them, and the gateway
# does not force raw responses on for them (no raw_request, no raw_response).
INFERENCE = frozenset({"list_models", "chat_completion", "responses", "transcription", "realtime"})
# The browser's way to send a key to the realtime websocket, as a subprotocol.
_KEY_PROTOCOL = "openai-insecure-api-key."


class GatewayRefusal(Exception):
    """An error the gateway answers itself, without calling the provider."""

    def __init__(
        self, status: int, message: str, *, type: str = "", code: str = "", in_body: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        # Whether the body says status_code: the core's errors leave it out (the transport
        # picks 400 or 500 from is_bifrost_error); the governance plugin's set it.
        self.in_body = in_body


class _ErrorField(msgspec.Struct, omit_defaults=True, gc=False):
    message: str
    type: str = ""
    code: str = ""
    param: str = ""


class _ErrorExtra(msgspec.Struct, omit_defaults=True, gc=False):
    provider: str = ""
    request_type: str = ""
    raw_response: dict[str, Any] | None = None


class _GatewayError(msgspec.Struct, kw_only=True, omit_defaults=True, gc=False):
    """The gateway's ``BifrostError``, fields omitted when empty as its Go struct does."""

    type: str = ""
    is_bifrost_error: bool
    status_code: int = 0
    error: _ErrorField
    extra_fields: _ErrorExtra


def json_response(payload: object, status: int = 200) -> web.Response:
    """A JSON answer encoded by msgspec."""
    return web.Response(
        body=_encoder.encode(payload), status=status, content_type="application/json"
    )


def bearer(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, else of an
    ``openai-insecure-api-key.<key>`` websocket subprotocol, if any."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        return token
    for protocol in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        if (protocol := protocol.strip()).startswith(_KEY_PROTOCOL) and len(protocol) > 16:
            return protocol.removeprefix(_KEY_PROTOCOL)
    return None


def _gateway_key(request: web.Request) -> str | None:
    """The credential the gateway reads: bearer, x-api-key, x-goog-api-key, then x-bf-vk."""
    key = bearer(request)
    for header in ("x-api-key", "x-goog-api-key", "x-bf-vk"):
        key = key or request.headers.get(header, "").strip() or None
    return key


class Answer:
    """How one API request is authenticated and answered: as OpenAI or as the gateway."""

    __slots__ = (
        "config", "gateway", "inference", "model", "native", "provider", "provider_given",
        "raw_request", "request_type", "started",
    )  # fmt: skip

    def __init__(
        self,
        request: web.Request,
        request_type: str,
        config: EmulatorConfig,
        *,
        gateway: bool,
        native: bool = False,
    ) -> None:
        self.started = time.perf_counter()
        self.config = config
        self.gateway = gateway
        self.request_type = request_type
        self.inference = request_type in INFERENCE
        # The gateway's own /v1 routes (not its OpenAI-compatible /openai ones).
        self.native = native
        self.provider_given = bool(request.query.get("provider"))
        self.provider = (request.query.get("provider") or "openai") if gateway else "openai"
        self.model = ""
        self.raw_request: dict[str, Any] | None = None

    def credential(self, request: web.Request) -> str | None:
        """The API key to call the provider with; on the gateway face, its checks first."""
        if not self.gateway:
            return bearer(request)
        key = _gateway_key(request)
        if key is None:
            if self.config.virtual_keys == "required":
                raise GatewayRefusal(401, _VK_REQUIRED, type="virtual_key_required", in_body=True)
            key = self.config.gateway_key  # optional virtual keys: the gateway's own key
        if self.native and not self.inference and not self.provider_given:
            raise GatewayRefusal(400, "provider query parameter is required")
        base = self.config.base_provider(self.provider)
        if base is None:
            # The gateway's core: getProviderQueue -> "failed to get config for provider".
            raise GatewayRefusal(
                400, f"failed to get config for provider {self.provider}: not found"
            )
        if not self.inference and base not in self.config.container_providers:
            status = 500 if self.config.gateway_version == "legacy" else 400
            message = f"{self.request_type} is not supported by {self.provider} provider"
            raise GatewayRefusal(status, message, code="unsupported_operation")
        return key

    def ok(self, result: Result) -> web.StreamResponse:
        if isinstance(result, Path):
            # Sent from disk: a large stored file is never read into memory.
            return web.FileResponse(result, headers={"Content-Type": "application/octet-stream"})
        if isinstance(result, bytes):
            return web.Response(body=result, content_type="application/octet-stream")
        if not self.gateway:
            return json_response(result)
        if self.inference:
            result["extra_fields"] = self.stream_fields(0)
            return json_response(result)
        raw_response = copy.deepcopy(result)
        # The gateway's container struct has no network_policy: it is lost on the way.
        for item in (result, *result.get("data", ())):
            item.pop("network_policy", None)
        result["extra_fields"] = self._extra_fields(raw_response)
        return json_response(result)

    def stream_fields(self, chunk_index: int) -> dict[str, Any]:
        """``extra_fields`` of an inference answer or of one event of its stream."""
        extra: dict[str, Any] = {"request_type": self.request_type, "provider": self.provider}
        if self.model:
            extra["model_requested"] = self.model
        extra["latency"] = int((time.perf_counter() - self.started) * 1000)
        extra["chunk_index"] = chunk_index
        return extra

    def _extra_fields(self, raw_response: dict[str, Any]) -> dict[str, Any]:
        """``extra_fields`` in the order of the gateway's Go struct."""
        latency_ms = int((time.perf_counter() - self.started) * 1000)
        current = self.config.gateway_version == "current"
        extra: dict[str, Any] = {"request_type": self.request_type}
        if current:
            extra["routing_info"] = {"provider": self.provider}
        extra["provider"] = self.provider
        extra["latency"] = latency_ms
        if current:
            extra["upstream_latency"] = latency_ms
        extra["chunk_index"] = 0
        if self.raw_request is not None:
            extra["raw_request"] = self.raw_request
        extra["raw_response"] = raw_response
        return extra

    def error(self, exc: ApiError) -> web.Response:
        """An error of the provider: OpenAI's envelope, or the gateway's copy of it."""
        if not self.gateway:
            return json_response(exc.envelope(), exc.status)
        field = _ErrorField(exc.message, exc.type, exc.code or "", exc.param or "")
        raw = None if self.inference else exc.envelope()
        extra = _ErrorExtra(self.provider, self.request_type, raw)
        body = _GatewayError(
            is_bifrost_error=False, status_code=exc.status, error=field, extra_fields=extra
        )
        return json_response(body, exc.status)

    def refuse(self, refusal: GatewayRefusal) -> web.Response:
        """An error the gateway makes itself."""
        body = _GatewayError(
            type=refusal.type,
            is_bifrost_error=False,
            status_code=refusal.status if refusal.in_body else 0,
            error=_ErrorField(refusal.message, code=refusal.code),
            extra_fields=_ErrorExtra(self.provider, self.request_type),
        )
        return json_response(body, refusal.status)


# The JSON body of a gateway request once the gateway took its own ``provider`` field out.
BODY = web.RequestKey("emulator_body", bytes)


async def body_of(request: web.Request) -> bytes:
    """The request's body as the provider receives it."""
    return request.get(BODY) or await request.read()


# The answer of the request at hand, for operations that stream (their events carry its fields).
ANSWER = web.RequestKey("emulator_answer", Answer)
