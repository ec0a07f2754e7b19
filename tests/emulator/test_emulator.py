"""The emulator as its users see it: a real aiohttp server on port 0, driven over HTTP."""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from sidecar.emulator import EMULATOR_STATE, EmulatorConfig, EmulatorState, create_emulator_app
from sidecar.emulator.cli import add_arguments, config_from_args

Client = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Awaitable[Client]]

KEY = "sk-team-a-0001"
TEAMMATE = "sk-team-a-0002"
STRANGER = "sk-stranger-0003"
REVOKED = "sk-revoked-secret-xyz9"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def make_client() -> AsyncIterator[MakeClient]:
    """Start emulators with ``EmulatorConfig`` overrides; all are closed after the test."""
    clients: list[Client] = []

    async def make(config: EmulatorConfig | None = None, **overrides: Any) -> Client:
        config = config or EmulatorConfig(
            projects=((KEY, TEAMMATE),), revoked_keys=frozenset({REVOKED}), **overrides
        )
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


def not_found(container_id: str) -> dict[str, Any]:
    message = f"Container with id '{container_id}' not found."
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}
    }


async def test_container_lifecycle(client: Client) -> None:
    created = await create(client, metadata={"team": "a"})
    assert re.fullmatch(r"cntr_[0-9a-f]{32}", created["id"])
    assert created["object"] == "container"
    assert created["status"] == "running"
    assert created["expires_after"] == {"anchor": "last_active_at", "minutes": 20}
    assert created["memory_limit"] == "1g"
    assert created["network_policy"] == {"type": "disabled"}
    assert created["metadata"] == {"team": "a"}
    assert created["created_at"] == created["last_active_at"]
    assert await get(client, f"/v1/containers/{created['id']}") == (200, created)

    response = await client.delete(f"/v1/containers/{created['id']}", headers=bearer(KEY))
    assert await response.json() == {
        "id": created["id"],
        "object": "container.deleted",
        "deleted": True,
    }
    assert await get(client, f"/v1/containers/{created['id']}") == (404, not_found(created["id"]))


async def test_create_options_and_validation(client: Client) -> None:
    created = await create(
        client,
        expires_after={"anchor": "last_active_at", "minutes": 5},
        memory_limit="4g",
        network_policy={"type": "allowlist", "allowed_domains": ["pypi.org"]},
    )
    assert created["expires_after"]["minutes"] == 5
    assert created["memory_limit"] == "4g"
    assert created["network_policy"] == {"type": "allowlist", "allowed_domains": ["pypi.org"]}
    assert "metadata" not in created

    bad_bodies = [
        ({}, "name", "missing_required_parameter"),
        ({"name": 3}, "name", "invalid_value"),
        ({"name": "b", "memory_limit": "2g"}, "memory_limit", "invalid_value"),
        ({"name": "b", "expires_after": {"anchor": "last_active_at", "minutes": 0}},
         "expires_after.minutes", "invalid_value"),
        ({"name": "b", "colour": "red"}, "colour", "unknown_parameter"),
    ]  # fmt: skip
    for body, param, code in bad_bodies:
        response = await client.post("/v1/containers", json=body, headers=bearer(KEY))
        error = (await response.json())["error"]
        assert (response.status, error["param"], error["code"]) == (400, param, code), body
    response = await client.post("/v1/containers", data=b"{nope", headers=bearer(KEY))
    assert response.status == 400
    assert "could not parse the JSON body" in (await response.json())["error"]["message"]


async def test_list_paginates_by_creation_order(client: Client) -> None:
    ids = [(await create(client, name=f"box-{i}"))["id"] for i in range(5)]

    status, page = await get(client, "/v1/containers?limit=2")
    assert status == 200
    assert [c["id"] for c in page["data"]] == ids[:-3:-1]
    assert (page["object"], page["first_id"], page["last_id"]) == ("list", ids[4], ids[3])
    assert page["has_more"] is True
    _, page = await get(client, f"/v1/containers?limit=2&after={page['last_id']}")
    assert [c["id"] for c in page["data"]] == [ids[2], ids[1]]
    _, page = await get(client, f"/v1/containers?limit=2&after={page['last_id']}")
    assert [c["id"] for c in page["data"]] == [ids[0]]
    assert page["has_more"] is False

    _, page = await get(client, f"/v1/containers?order=asc&after={ids[1]}")
    assert [c["id"] for c in page["data"]] == ids[2:]
    assert page["has_more"] is False
    for query, param in (("limit=0", "limit"), ("limit=101", "limit"), ("order=up", "order")):
        status, body = await get(client, f"/v1/containers?{query}")
        assert (status, body["error"]["param"]) == (400, param)


async def test_containers_are_scoped_to_the_project(client: Client) -> None:
    mine = await create(client)

    assert await get(client, f"/v1/containers/{mine['id']}", STRANGER) == (
        404,
        not_found(mine["id"]),
    )
    assert (await get(client, "/v1/containers", STRANGER))[1]["data"] == []
    assert (await get(client, f"/v1/containers/{mine['id']}", TEAMMATE))[1] == mine
    response = await client.delete(f"/v1/containers/{mine['id']}", headers=bearer(STRANGER))
    assert response.status == 404
    assert (await get(client, f"/v1/containers/{mine['id']}"))[0] == 200


async def test_missing_and_revoked_keys_get_openai_401(client: Client) -> None:
    response = await client.get("/v1/containers")
    assert response.status == 401
    error = (await response.json())["error"]
    assert error["message"].startswith("You didn't provide an API key.")
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, None)

    response = await client.get("/v1/containers", headers=bearer(REVOKED))
    assert response.status == 401
    text = await response.text()
    error = msgspec.json.decode(text)["error"]
    assert error["code"] == "invalid_api_key"
    assert error["message"].startswith("Incorrect API key provided: sk-...xyz9.")
    assert REVOKED not in text

    assert (await get(client, "/v1/containers", TEAMMATE))[0] == 200
    state_of(client).revoke_key(TEAMMATE)
    assert (await get(client, "/v1/containers", TEAMMATE))[0] == 401


async def test_cli_flags_configure_projects_keys_and_expiry(make_client: MakeClient) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    ns = parser.parse_args(
        ["--project", "k-1, k-2", "--project", "k-3", "--revoked-key", "k-gone-123456",
         "--default-expires-minutes", "3", "--latency-ms", "1.5"]
    )  # fmt: skip
    assert (ns.host, ns.port) == ("127.0.0.1", 8090)
    config = config_from_args(ns)
    assert config.latency_ms == 1.5
    assert "k-gone" not in repr(config)
    client = await make_client(config)

    shared = await create(client, "k-1")
    assert shared["expires_after"]["minutes"] == 3
    assert (await get(client, f"/v1/containers/{shared['id']}", "k-2"))[0] == 200
    assert (await get(client, f"/v1/containers/{shared['id']}", "k-3"))[0] == 404
    assert (await get(client, "/v1/containers", "k-gone-123456"))[0] == 401
    with pytest.raises(SystemExit):
        parser.parse_args(["--default-expires-minutes", "0"])


async def test_file_operations_keep_a_container_alive_and_retrieve_does_not(client: Client) -> None:
    container = await create(client)
    base = f"/v1/containers/{container['id']}"
    await client.post("/_emulator/clock", json={"advance_s": 60})
    assert (await get(client, base))[1]["last_active_at"] == container["last_active_at"]

    form = aiohttp.FormData()
    form.add_field("file", b"hello, world", filename="reports/notes.txt")
    response = await client.post(f"{base}/files", data=form, headers=bearer(KEY))
    file = await response.json()
    assert re.fullmatch(r"cfile_[0-9a-f]+", file["id"])
    assert file == {
        "id": file["id"],
        "object": "container.file",
        "created_at": container["created_at"] + 60,
        "bytes": 12,
        "container_id": container["id"],
        "path": "/mnt/data/notes.txt",
        "source": "user",
    }
    assert (await get(client, base))[1]["last_active_at"] == container["last_active_at"] + 60

    await client.post("/_emulator/clock", json={"advance_s": 30})
    response = await client.get(f"{base}/files/{file['id']}/content", headers=bearer(KEY))
    assert response.content_type == "application/octet-stream"
    assert await response.read() == b"hello, world"
    assert (await get(client, base))[1]["last_active_at"] == container["last_active_at"] + 90

    referenced = await client.post(
        f"{base}/files", json={"file_id": "file-abc"}, headers=bearer(KEY)
    )
    assert (await referenced.json())["path"] == "/mnt/data/file-abc"
    _, listing = await get(client, f"{base}/files?order=asc")
    assert [f["path"] for f in listing["data"]] == ["/mnt/data/notes.txt", "/mnt/data/file-abc"]
    assert await get(client, f"{base}/files/{file['id']}") == (200, file)
    response = await client.delete(f"{base}/files/{file['id']}", headers=bearer(KEY))
    assert await response.json() == {
        "id": file["id"],
        "object": "container.file.deleted",
        "deleted": True,
    }
    assert (await get(client, f"{base}/files/{file['id']}"))[0] == 404


async def test_idle_containers_expire_on_the_emulator_clock(client: Client) -> None:
    container = await create(client, expires_after={"anchor": "last_active_at", "minutes": 1})
    base = f"/v1/containers/{container['id']}"
    state = state_of(client)

    state.advance_clock(59)
    assert (await get(client, base))[1]["status"] == "running"
    state.advance_clock(1)
    assert (await get(client, base))[1]["status"] == "expired"
    status, body = await get(client, f"{base}/files")
    assert status == 400
    assert body["error"]["code"] == "container_expired"
    assert "expired" in body["error"]["message"]

    response = await client.post(f"/_emulator/containers/{container['id']}/touch")
    assert (await response.json())["status"] == "running"
    assert (await get(client, f"{base}/files"))[0] == 200

    await client.patch(f"/_emulator/containers/{container['id']}", json={"status": "deleted"})
    state.touch(container["id"])
    assert (await get(client, base))[1]["status"] == "deleted"
    state.update_container(container["id"], status=None, last_active_at=123)
    assert (await get(client, base))[1] == {**container, "status": "expired", "last_active_at": 123}
    response = await client.patch("/_emulator/containers/cntr_missing", json={"status": "x"})
    assert response.status == 404


async def test_status_fault_hits_count_requests_then_is_gone(client: Client) -> None:
    container = await create(client)
    path = f"/v1/containers/{container['id']}"
    await client.post("/_emulator/faults", json={"kind": "status", "status": 503, "count": 2})

    for _ in range(2):
        status, body = await get(client, path)
        assert (status, body["error"]["type"]) == (503, "server_error")
    assert await get(client, path) == (200, container)


async def test_status_fault_429_sends_retry_after(client: Client) -> None:
    container = await create(client)
    fault = {"kind": "status", "status": 429, "retry_after_s": 1.5, "route": "retrieve"}
    await client.post("/_emulator/faults", json=fault)

    response = await client.get(f"/v1/containers/{container['id']}", headers=bearer(KEY))
    assert response.status == 429
    assert (response.headers["Retry-After"], response.headers["retry-after-ms"]) == ("2", "1500")
    assert (await response.json())["error"]["code"] == "rate_limit_exceeded"
    assert (await get(client, "/v1/containers"))[0] == 200  # other routes are spared


async def test_faults_can_target_one_container(client: Client) -> None:
    sick, healthy = await create(client), await create(client)
    state_of(client).add_fault("status", status=500, container_id=sick["id"])

    assert (await get(client, f"/v1/containers/{sick['id']}"))[0] == 500
    assert (await get(client, f"/v1/containers/{healthy['id']}"))[0] == 200
    response = await client.delete("/_emulator/faults")
    assert await response.json() == {"cleared": 1}
    assert (await get(client, f"/v1/containers/{sick['id']}"))[0] == 200


async def test_malformed_fault_answers_200_with_broken_json(client: Client) -> None:
    container = await create(client)
    await client.post("/_emulator/faults", json={"kind": "malformed", "count": 1})

    response = await client.get(f"/v1/containers/{container['id']}", headers=bearer(KEY))
    assert response.status == 200
    with pytest.raises(msgspec.DecodeError):
        msgspec.json.decode(await response.read())


async def test_timeout_fault_outlasts_the_client_timeout(client: Client) -> None:
    container = await create(client)
    await client.post("/_emulator/faults", json={"kind": "timeout", "route": "retrieve"})

    started = time.perf_counter()
    with pytest.raises(asyncio.TimeoutError):
        await client.get(
            f"/v1/containers/{container['id']}",
            headers=bearer(KEY),
            timeout=aiohttp.ClientTimeout(total=0.2),
        )
    assert time.perf_counter() - started < 1


async def test_reset_fault_drops_the_connection_mid_answer(client: Client) -> None:
    container = await create(client)
    await client.post("/_emulator/faults", json={"kind": "reset", "count": 1})

    with pytest.raises(aiohttp.ClientPayloadError):
        await get(client, f"/v1/containers/{container['id']}")
    assert await get(client, f"/v1/containers/{container['id']}") == (200, container)


async def test_hangup_fault_closes_the_connection_before_any_answer(client: Client) -> None:
    container = await create(client)
    path = f"/v1/containers/{container['id']}"
    state_of(client).add_fault("hangup", count=1)

    with pytest.raises(aiohttp.ServerDisconnectedError):
        await get(client, path)  # aiohttp's TestClient turns its retry off
    state_of(client).add_fault("hangup", count=1)
    # A plain aiohttp session retries an idempotent request once after a hang-up.
    async with (
        aiohttp.ClientSession() as session,
        session.get(client.make_url(path), headers=bearer(KEY)) as response,
    ):
        assert (response.status, await response.json()) == (200, container)
    assert state_of(client).stats()["retrieve_by_container"] == {container["id"]: 3}


async def test_server_stops_promptly_with_a_request_hanging() -> None:
    app = create_emulator_app(EmulatorConfig())
    app[EMULATOR_STATE].add_fault("timeout")
    runner = web.AppRunner(app)  # like web.run_app: handlers are not cancelled on disconnect
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        hanging = asyncio.ensure_future(
            session.get(f"http://127.0.0.1:{port}/v1/containers", headers=bearer(KEY))
        )
        # The state has no event to wait on: poll until the request has arrived.
        while not app[EMULATOR_STATE].stats()["total"]:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        started = time.perf_counter()
        async with asyncio.timeout(5):
            await runner.cleanup()
        assert time.perf_counter() - started < 1
        with pytest.raises(aiohttp.ClientConnectionError):
            await hanging


async def test_latency_delays_every_answer(client: Client) -> None:
    await client.post("/_emulator/latency", json={"ms": 60})
    started = time.perf_counter()
    assert (await get(client, "/v1/containers"))[0] == 200
    assert time.perf_counter() - started >= 0.06


async def test_stats_count_every_request_as_it_arrives(client: Client) -> None:
    container = await create(client)
    await get(client, f"/v1/containers/{container['id']}")
    await get(client, f"/openai/v1/containers/{container['id']}", STRANGER)  # 404
    await client.get("/v1/containers")  # 401
    state_of(client).add_fault("status", status=500, count=1)
    await get(client, f"/openai/containers/{container['id']}")

    response = await client.get("/_emulator/stats")
    assert await response.json() == {
        "total": 5,
        "calls": {"create": 1, "retrieve": 3, "list": 1},
        "retrieve_by_container": {container["id"]: 3},
    }
    await client.post("/_emulator/stats/reset")
    assert state_of(client).stats() == {"total": 0, "calls": {}, "retrieve_by_container": {}}
    assert (await client.get("/_emulator/healthz")).status == 200


async def test_gateway_shape_adds_extra_fields_and_drops_network_policy(client: Client) -> None:
    container = await create(client)

    for prefix in ("/openai/v1", "/openai"):
        headers = {"x-bf-vk": KEY}
        response = await client.get(f"{prefix}/containers/{container['id']}", headers=headers)
        body = await response.json()
        assert response.status == 200
        extra = body.pop("extra_fields")
        assert extra == {
            "request_type": "container_retrieve",
            "provider": "openai",
            "latency": extra["latency"],
            "chunk_index": 0,
        }
        assert isinstance(extra["latency"], int)
        assert "network_policy" not in body
        expected = {k: v for k, v in container.items() if k != "network_policy"}
        assert body == expected

    response = await client.get("/openai/containers?provider=azure", headers={"x-api-key": KEY})
    listing = await response.json()
    assert listing["extra_fields"]["request_type"] == "container_list"
    assert "network_policy" not in listing["data"][0]


async def test_gateway_errors(client: Client) -> None:
    container = await create(client)
    path = f"/openai/v1/containers/{container['id']}"

    response = await client.get(f"{path}?provider=anthropic", headers={"x-bf-vk": KEY})
    assert response.status == 500
    body = await response.json()
    assert body["error"] == {
        "message": "container_retrieve is not supported by anthropic provider",
        "code": "unsupported_operation",
    }
    assert body["extra_fields"] == {"provider": "anthropic", "request_type": "container_retrieve"}

    response = await client.get(path)
    assert response.status == 401
    assert (await response.json())["type"] == "virtual_key_required"

    response = await client.get(path, headers={"x-goog-api-key": STRANGER})
    body = await response.json()
    assert response.status == 404
    assert body["is_bifrost_error"] is False
    assert body["status_code"] == 404
    assert body["error"]["message"] == f"Container with id '{container['id']}' not found."
    assert "code" not in body["error"]
    assert body["extra_fields"]["raw_response"] == not_found(container["id"])

    delete = await client.delete(
        f"/openai/containers/{container['id']}?provider=bedrock", headers=bearer(KEY)
    )
    assert (await delete.json())["error"][
        "message"
    ] == "container_delete is not supported by bedrock provider"
