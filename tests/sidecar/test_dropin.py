"""A true drop-in: what works against the gateway works through the sidecar, unchanged."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from emulator import EmulatorConfig, create_emulator_app
from tests.conftest import Emulator, Running, start_app
from tests.support import AUTH_A, KEY_A, backdate, get


@pytest.fixture
async def open_gateway() -> AsyncIterator[Emulator]:
    """An emulated gateway whose virtual keys are optional, with a custom provider."""
    config = EmulatorConfig(
        projects=(("sk-bf-team-a", "sk-bf-team-a2"),),
        virtual_keys="optional",
        custom_providers=(("my-openai-eu", "openai"),),
    )
    running = await start_app(create_emulator_app(config))
    yield Emulator(running.url, running.app, running.runner)
    await running.runner.cleanup()


async def test_without_a_credential_the_gateway_decides_and_anonymous_callers_share_only_theirs(
    start_sidecar: Any, make_settings: Any, open_gateway: Emulator, http: aiohttp.ClientSession
) -> None:
    sidecar = await start_sidecar(make_settings(upstream_url=open_gateway.url))
    # A container of the gateway's own key's project (what anonymous callers see).
    cid = (await open_gateway.create("sk-emulator-gateway-key"))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    hits = []
    for _ in range(3):
        status, body, _ = await get(http, url, {})
        assert status == 200
        hits.append(body["extra_fields"]["cache_debug"]["cache_hit"])
    assert hits == [False, True, True]
    # A caller with a key is another identity: the upstream answers it (its project: 404).
    status, _, _ = await get(http, url, AUTH_A)
    assert status == 404
    assert open_gateway.retrieves(cid) == 2


async def test_the_gateways_401_for_a_missing_key_is_relayed_and_not_cached(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    for _ in range(2):
        status, body, _ = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}", {})
        assert status == 401
        assert body["type"] == "virtual_key_required" or body["error"].get("type")
    assert emulator.retrieves() == 2


async def test_custom_providers_are_configured_and_cached(
    start_sidecar: Any, make_settings: Any, open_gateway: Emulator, http: aiohttp.ClientSession
) -> None:
    sidecar = await start_sidecar(
        make_settings(
            upstream_url=open_gateway.url,
            container_providers=frozenset({"openai", "my-openai-eu"}),
        )
    )
    cid = (await open_gateway.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}?provider=my-openai-eu"
    for expect_hit in (False, True):
        status, body, _ = await get(http, url)
        assert status == 200, body
        debug = body["extra_fields"]["cache_debug"]
        assert debug["cache_hit"] is expect_hit
        assert debug["requested_provider"] == "my-openai-eu"
    async with http.get(f"{sidecar.url}/metrics") as response:
        text = await response.text()
    assert 'provider="my-openai-eu"' in text


@pytest.mark.parametrize(("status", "polled"), [("running", True), ("paused", True),
                                                ("expired", False)])  # fmt: skip
async def test_only_documented_final_statuses_are_frozen(
    start_sidecar: Any,
    make_settings: Any,
    emulator: Emulator,
    http: aiohttp.ClientSession,
    status: str,
    polled: bool,
) -> None:
    settings = make_settings(fresh_ttl_s=0.1, max_stale_s=0.1, local_ttl_s=0)
    sidecar = await start_sidecar(settings)
    cid = (await emulator.create(KEY_A))["id"]
    emulator.state.update_container(cid, status=status)
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    await get(http, url)
    await backdate(settings, cid, 0.3)  # past fresh and stale for a container that may change
    _, body, _ = await get(http, url)
    assert body["status"] == status
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is not polled
    assert emulator.retrieves(cid) == (2 if polled else 1)


async def test_straight_to_openai_the_gateway_only_provider_parameter_is_not_forwarded(
    start_sidecar: Any, make_settings: Any, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    sidecar = await start_sidecar(make_settings(upstream_kind="openai"))
    await emulator.create(KEY_A)
    async with http.get(
        f"{sidecar.url}/v1/containers?provider=openai&limit=5", headers=AUTH_A
    ) as response:
        assert response.status == 200
    paths = [r["path"] for r in emulator.state.requests() if r["route"] == "list"]
    assert paths[-1] == "/v1/containers?limit=5"
