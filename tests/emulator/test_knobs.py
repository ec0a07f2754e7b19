"""The control API's knobs: faults, latency, stats and the request log; a prompt shutdown."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import msgspec
import pytest
from aiohttp import web

from emulator import EMULATOR_STATE, EmulatorConfig, create_emulator_app
from tests.emulator.support import KEY, STRANGER, Client, bearer, create, get, state_of


async def test_status_fault_hits_count_requests_then_is_gone(client: Client) -> None:
    state_of(client).freeze_clock()
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


async def test_faults_can_target_one_container_or_a_files_api_route(client: Client) -> None:
    sick, healthy = await create(client), await create(client)
    state_of(client).add_fault("status", status=500, container_id=sick["id"])

    assert (await get(client, f"/v1/containers/{sick['id']}"))[0] == 500
    assert (await get(client, f"/v1/containers/{healthy['id']}"))[0] == 200
    response = await client.delete("/_emulator/faults")
    assert await response.json() == {"cleared": 1}
    assert (await get(client, f"/v1/containers/{sick['id']}"))[0] == 200

    state_of(client).add_fault("status", status=503, route="upload_list", count=1)
    assert (await get(client, "/v1/files"))[0] == 503
    response = await client.post("/_emulator/faults", json={"kind": "status", "route": "nope"})
    assert response.status == 400


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
    state_of(client).freeze_clock()
    container = await create(client)
    await client.post("/_emulator/faults", json={"kind": "reset", "count": 1})

    with pytest.raises(aiohttp.ClientPayloadError):
        await get(client, f"/v1/containers/{container['id']}")
    assert await get(client, f"/v1/containers/{container['id']}") == (200, container)


async def test_hangup_fault_closes_the_connection_before_any_answer(client: Client) -> None:
    state_of(client).freeze_clock()
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
    await get(client, "/v1/files")

    response = await client.get("/_emulator/stats")
    assert await response.json() == {
        "total": 6,
        "calls": {"create": 1, "retrieve": 3, "list": 1, "upload_list": 1},
        "retrieve_by_container": {container["id"]: 3},
    }
    await client.post("/_emulator/stats/reset")
    assert state_of(client).stats() == {"total": 0, "calls": {}, "retrieve_by_container": {}}
    assert (await client.get("/_emulator/healthz")).status == 200


async def test_the_request_log_shows_what_arrived_with_credentials_masked(client: Client) -> None:
    headers = {
        "Authorization": "Bearer sk-very-secret-0001",
        "x-bf-vk": "sk-bf-another-secret-42",
        "x-bf-eh-team": "a",
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    }
    await client.get("/openai/v1/containers/cntr_x?provider=openai", headers=headers)

    response = await client.get("/_emulator/requests")
    (logged,) = (await response.json())["data"]
    assert (logged["route"], logged["method"]) == ("retrieve", "GET")
    assert logged["path"] == "/openai/v1/containers/cntr_x?provider=openai"
    assert logged["headers"]["authorization"] == "Bearer sk-...0001"
    assert logged["headers"]["x-bf-vk"] == "sk-...t-42"
    assert logged["headers"]["x-bf-eh-team"] == "a"
    assert logged["headers"]["traceparent"] == headers["traceparent"]
    assert "secret" not in (await response.text())
    await client.post("/_emulator/stats/reset")
    assert state_of(client).requests() == []


async def test_an_unknown_url_is_answered_in_json_in_the_shape_of_its_face(client: Client) -> None:
    response = await client.get("/v1/nowhere", headers=bearer(KEY))
    assert (response.status, await response.json()) == (404, {"error": {
        "message": "Invalid URL (GET /v1/nowhere)", "type": "invalid_request_error",
        "param": None, "code": None,
    }})  # fmt: skip
    response = await client.request("PROPFIND", "/openai/v1/containers", headers=bearer(KEY))
    document = await response.json()
    assert (response.status, document["is_bifrost_error"]) == (405, False)
    assert document["error"]["message"] == "Invalid URL (PROPFIND /openai/v1/containers)"
