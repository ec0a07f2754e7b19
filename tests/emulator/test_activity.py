"""Activity and expiry as on OpenAI: every container operation refreshes ``last_active_at``."""

from __future__ import annotations

import aiohttp

from tests.emulator.support import KEY, Client, bearer, create, get, state_of


async def test_retrieve_and_every_file_operation_refresh_last_active_at(client: Client) -> None:
    state = state_of(client)
    state.freeze_clock()
    container = await create(client)
    base = f"/v1/containers/{container['id']}"
    born = container["last_active_at"]

    state.advance_clock(60)
    _, seen = await get(client, base)
    assert seen["last_active_at"] == born + 60  # retrieving is activity, and shows it
    assert seen["created_at"] == born

    state.advance_clock(10)
    form = aiohttp.FormData()
    form.add_field("file", b"hello", filename="a.txt")
    file = await (await client.post(f"{base}/files", data=form, headers=bearer(KEY))).json()
    assert file["created_at"] == born + 70
    operations = [
        ("GET", f"{base}/files"),
        ("GET", f"{base}/files/{file['id']}"),
        ("GET", f"{base}/files/{file['id']}/content"),
        ("DELETE", f"{base}/files/{file['id']}"),
    ]
    for offset, (method, path) in enumerate(operations, start=1):
        state.advance_clock(10)
        response = await client.request(method, path, headers=bearer(KEY))
        assert response.status == 200, path
        assert state.peek_container(container["id"])["last_active_at"] == born + 70 + 10 * offset

    # Listing containers is not an operation on one of them.
    state.advance_clock(10)
    assert (await get(client, "/v1/containers"))[0] == 200
    assert state.peek_container(container["id"])["last_active_at"] == born + 110


async def test_a_polled_container_stays_alive_an_idle_one_expires(client: Client) -> None:
    state = state_of(client)
    state.freeze_clock()
    polled = await create(client, expires_after={"anchor": "last_active_at", "minutes": 1})
    idle = await create(client, expires_after={"anchor": "last_active_at", "minutes": 1})

    for _ in range(3):
        state.advance_clock(50)
        assert (await get(client, f"/v1/containers/{polled['id']}"))[1]["status"] == "running"
    _, expired = await get(client, f"/v1/containers/{idle['id']}")
    # An expired container still answers 200, with its last activity unchanged.
    assert (expired["status"], expired["last_active_at"]) == ("expired", idle["last_active_at"])


async def test_an_expired_container_stays_expired_and_its_files_are_gone(client: Client) -> None:
    state = state_of(client)
    state.freeze_clock()
    container = await create(client)  # the default: 20 minutes
    base = f"/v1/containers/{container['id']}"

    state.advance_clock(20 * 60 - 1)
    state.advance_clock(1)
    for _ in range(2):  # retrieving an expired container does not revive it
        status, body = await get(client, base)
        assert (status, body["status"]) == (200, "expired")
        assert body["last_active_at"] == container["last_active_at"]
    status, body = await get(client, f"{base}/files")
    assert status == 400
    assert body["error"]["code"] == "container_expired"
    assert "expired" in body["error"]["message"]
    assert container["id"] in [c["id"] for c in (await get(client, "/v1/containers"))[1]["data"]]


async def test_operator_overrides(client: Client) -> None:
    state = state_of(client)
    state.freeze_clock()
    container = await create(client, expires_after={"anchor": "last_active_at", "minutes": 1})
    base = f"/v1/containers/{container['id']}"
    state.advance_clock(60)
    assert (await get(client, base))[1]["status"] == "expired"

    response = await client.post(f"/_emulator/containers/{container['id']}/touch")
    assert (await response.json())["status"] == "running"
    assert (await get(client, f"{base}/files"))[0] == 200

    await client.patch(f"/_emulator/containers/{container['id']}", json={"status": "deleted"})
    state.touch(container["id"])
    assert (await get(client, base))[1]["status"] == "deleted"
    state.update_container(container["id"], status=None, last_active_at=123)
    assert (await get(client, base))[1] == {**container, "status": "expired", "last_active_at": 123}
    # A last_active_at set ahead of the clock is never moved back by activity.
    ahead = state.now() + 42
    state.update_container(container["id"], last_active_at=ahead)
    assert (await get(client, base))[1]["last_active_at"] == ahead
    response = await client.patch("/_emulator/containers/cntr_missing", json={"status": "x"})
    assert response.status == 404


async def test_the_clock_can_be_frozen_advanced_and_released(client: Client) -> None:
    state = state_of(client)
    response = await client.post("/_emulator/clock", json={"frozen": True})
    frozen = await response.json()
    assert frozen["frozen"] is True
    assert state.now() == frozen["now"]
    response = await client.post("/_emulator/clock", json={"advance_s": 90})
    assert await response.json() == {"now": frozen["now"] + 90, "frozen": True}

    response = await client.post("/_emulator/clock", json={"frozen": False})
    released = await response.json()
    assert released["frozen"] is False
    assert state.now() >= frozen["now"] + 90  # it runs on from where it stood
    for body in ({"advance_s": -1}, {"advance": 1}, {"frozen": "yes"}):
        assert (await client.post("/_emulator/clock", json=body)).status == 400
