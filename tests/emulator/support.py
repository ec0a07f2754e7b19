"""Keys and small helpers shared by the emulator's tests."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from emulator import EMULATOR_STATE, EmulatorState

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]

KEY = "sk-team-a-0001"
TEAMMATE = "sk-team-a-0002"
STRANGER = "sk-stranger-0003"
REVOKED = "sk-revoked-secret-xyz9"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def state_of(client: Client) -> EmulatorState:
    return client.app[EMULATOR_STATE]


async def create(client: Client, key: str = KEY, **body: Any) -> dict[str, Any]:
    response = await client.post(
        "/v1/containers", json={"name": "box", **body}, headers=bearer(key)
    )
    assert response.status == 200, await response.text()
    document: dict[str, Any] = await response.json()
    return document


async def get(client: Client, path: str, key: str = KEY) -> tuple[int, Any]:
    response = await client.get(path, headers=bearer(key))
    return response.status, await response.json()


async def upload(
    client: Client, content: bytes, filename: str, key: str = KEY, purpose: str = "user_data"
) -> dict[str, Any]:
    """A file stored with the Files API, as ``file_ids`` and ``file_id`` reference it."""
    form = aiohttp.FormData()
    form.add_field("purpose", purpose)
    form.add_field("file", content, filename=filename)
    response = await client.post("/v1/files", data=form, headers=bearer(key))
    assert response.status == 200, await response.text()
    document: dict[str, Any] = await response.json()
    return document


def not_found(container_id: str) -> dict[str, Any]:
    message = f"Container with id '{container_id}' not found."
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    }
