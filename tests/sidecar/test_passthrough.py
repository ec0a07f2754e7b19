"""The rest of the container API passes through, and feeds the cache where it can."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.conftest import Emulator, Running
from tests.support import AUTH_A, KEY_B, get

PREFIXES = ["/openai/v1", "/openai", "/v1"]


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_every_container_route_passes_through(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession, prefix: str
) -> None:
    base = f"{sidecar.url}{prefix}/containers"
    query = "?provider=openai" if prefix == "/v1" else ""
    async with http.post(base + query, json={"name": "through"}, headers=AUTH_A) as response:
        assert response.status == 200
        cid = (await response.json())["id"]
    async with http.get(base + query, headers=AUTH_A) as response:
        assert response.status == 200
        assert [c["id"] for c in (await response.json())["data"]] == [cid]

    form = aiohttp.FormData()
    form.add_field("file", b"x" * 200_000, filename="data.csv")
    async with http.post(f"{base}/{cid}/files{query}", data=form, headers=AUTH_A) as response:
        assert response.status == 200, await response.text()
        file_id = (await response.json())["id"]
    async with http.get(f"{base}/{cid}/files{query}", headers=AUTH_A) as response:
        assert [f["id"] for f in (await response.json())["data"]] == [file_id]
    async with http.get(f"{base}/{cid}/files/{file_id}{query}", headers=AUTH_A) as response:
        assert (await response.json())["bytes"] == 200_000
    async with http.get(f"{base}/{cid}/files/{file_id}/content{query}",
                        headers=AUTH_A) as response:  # fmt: skip
        assert response.status == 200
        assert await response.read() == b"x" * 200_000
    async with http.delete(f"{base}/{cid}/files/{file_id}{query}", headers=AUTH_A) as response:
        assert (await response.json())["deleted"] is True
    async with http.delete(f"{base}/{cid}{query}", headers=AUTH_A) as response:
        assert (await response.json())["deleted"] is True
    stats = emulator.state.stats()["calls"]
    for route in ("create", "list", "file_create", "file_list", "file_retrieve", "file_content",
                  "file_delete", "delete"):  # fmt: skip
        assert stats[route] == 1, route


async def test_upstream_errors_pass_through_unchanged(
    sidecar: Running, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{sidecar.url}/openai/v1/containers", json={}, headers=AUTH_A) as r:
        assert r.status == 400
        body = await r.json()
    assert body["error"]["param"] == "name"
    async with http.get(f"{sidecar.url}/openai/v1/containers") as r:
        assert r.status == 401


async def test_create_and_list_seed_the_cache_for_that_caller_only(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    async with http.post(f"{sidecar.url}/openai/v1/containers", json={"name": "a"},
                         headers=AUTH_A) as response:  # fmt: skip
        created = (await response.json())["id"]
    listed = (await emulator.create("sk-bf-team-a"))["id"]
    async with http.get(f"{sidecar.url}/openai/v1/containers", headers=AUTH_A) as response:
        assert response.status == 200
    for cid in (created, listed):
        _, body, _ = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
        assert body["extra_fields"]["cache_debug"]["cache_hit"] is True
        assert emulator.retrieves(cid) == 0
    status, _, _ = await get(http, f"{sidecar.url}/openai/v1/containers/{created}",
                             {"Authorization": f"Bearer {KEY_B}"})  # fmt: skip
    assert status == 404  # the seed was for the caller that listed, not for everyone


async def test_a_delete_through_the_sidecar_drops_the_entry_at_once(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = (await emulator.create("sk-bf-team-a"))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    assert (await get(http, url))[0] == 200
    async with http.delete(url, headers=AUTH_A) as response:
        assert response.status == 200
    status, body, _ = await get(http, url)
    assert status == 404
    assert body["error"]["message"] == f"Container with id '{cid}' not found."


@pytest.mark.parametrize(
    "path",
    ["/openai/v1/containers/bad%20id/files", "/openai/v1/containers/cntr_1/files/..%2F..",
     "/openai/v1/containers/cntr_1/files/a%2Fb/content"],
)  # fmt: skip
async def test_bad_ids_in_pass_through_routes_never_reach_the_upstream(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession, path: str
) -> None:
    async with http.get(sidecar.url + path, headers=AUTH_A) as response:
        assert response.status in (400, 404)
        assert (await response.json())["is_bifrost_error"] is False
    assert emulator.state.stats()["total"] == 0


async def test_openai_kind_maps_every_prefix_to_v1(
    start_sidecar: Any, make_settings: Any, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    sidecar = await start_sidecar(make_settings(upstream_kind="openai"))
    async with http.post(f"{sidecar.url}/openai/containers", json={"name": "x"},
                         headers=AUTH_A) as response:  # fmt: skip
        body = await response.json()
    assert "extra_fields" not in body  # the OpenAI shape: it went to /v1/containers
    assert body["network_policy"] == {"type": "disabled"}
