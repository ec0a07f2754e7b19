"""Emulators on port 0, driven over HTTP with aiohttp's test client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from emulator import EmulatorConfig, create_emulator_app
from tests.emulator.support import KEY, REVOKED, TEAMMATE, Client, MakeClient


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    """Start emulators with ``EmulatorConfig`` overrides; all are closed after the test."""
    clients: list[Client] = []

    async def make(config: EmulatorConfig | None = None, **overrides: Any) -> Client:
        defaults: dict[str, Any] = {
            "projects": ((KEY, TEAMMATE),),
            "revoked_keys": frozenset({REVOKED}),
        }
        config = config or EmulatorConfig(**(defaults | overrides))
        client: Client = TestClient(TestServer(create_emulator_app(config)))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def client(make_client: MakeClient) -> Client:
    return await make_client()
