"""The serving path end to end: real sidecar, real Redis, the emulator as the gateway."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from sidecar.credentials import CredentialReader
from sidecar.keys import KeySpace
from tests.conftest import Emulator, Running
from tests.support import AUTH_A, KEY_A, KEY_B, get, wait_for


async def test_miss_then_hit_in_the_gateways_shape(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    container = await emulator.create(KEY_A, metadata={"team": "a"})
    url = f"{sidecar.url}/openai/v1/containers/{container['id']}"

    status, first, _ = await get(http, url)
    assert status == 200
    extra = first.pop("extra_fields")
    # The gateway's own answer, as it came: its fields and order, its extra_fields (the
    # provider's JSON in raw_response, routing_info...), only latency and cache_debug ours.
    direct = await emulator_gateway_answer(emulator, container["id"])
    gateway_extra = direct.pop("extra_fields")
    assert list(first) == list(direct)
    assert first["id"] == container["id"]
    assert first["status"] == "running"
    assert first["metadata"] == {"team": "a"}
    assert extra["request_type"] == "container_retrieve"
    assert extra["provider"] == "openai"
    assert extra["chunk_index"] == 0
    assert isinstance(extra["latency"], int)
    assert set(extra) == set(gateway_extra) | {"cache_debug"}
    assert extra["raw_response"]["id"] == container["id"]
    assert (
        extra["raw_response"]["network_policy"] == gateway_extra["raw_response"]["network_policy"]
    )
    miss_debug = extra["cache_debug"]
    assert miss_debug["cache_hit"] is False
    assert set(miss_debug) == {"cache_hit", "cache_id", "requested_provider", "provider_used"}
    assert miss_debug["requested_provider"] == miss_debug["provider_used"] == "openai"

    status, second, _ = await get(http, url)
    assert status == 200
    hit_extra = second.pop("extra_fields")
    assert second == first
    hit_debug = hit_extra["cache_debug"]
    assert hit_debug == {
        "cache_hit": True,
        "cache_id": miss_debug["cache_id"],
        "hit_type": "direct",
        "requested_provider": "openai",
        "provider_used": "openai",
        "threshold": 0.0,
        "similarity": 1.0,
    }
    assert set(hit_extra) == set(extra)
    assert hit_extra["raw_response"] == extra["raw_response"]
    assert emulator.retrieves(container["id"]) == 2  # ours, and the direct one above


async def emulator_gateway_answer(emulator: Emulator, cid: str) -> dict[str, Any]:
    """What the gateway itself answers for a retrieve."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{emulator.url}/openai/v1/containers/{cid}", headers=AUTH_A) as response,
    ):
        assert response.status == 200
        result: dict[str, Any] = await response.json()
        return result


async def test_every_route_answers_and_shares_one_entry(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    ids = set()
    for path in (
        f"/openai/v1/containers/{cid}",
        f"/openai/containers/{cid}",
        f"/v1/containers/{cid}?provider=openai",
    ):
        status, body, _ = await get(http, sidecar.url + path)
        assert status == 200, body
        ids.add(body["extra_fields"]["cache_debug"]["cache_id"])
    assert len(ids) == 1
    assert emulator.retrieves(cid) == 1


async def test_empty_fields_are_omitted_and_unknown_fields_survive(
    start_sidecar: Any, make_settings: Any, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    # Straight to the OpenAI-shaped API: network_policy is a field the gateway does not know,
    # so, as the gateway does, it lives in raw_response (the provider's own JSON).
    sidecar = await start_sidecar(make_settings(upstream_kind="openai"))
    cid = (await emulator.create(KEY_A))["id"]
    emulator.state.update_container(cid, memory_limit="", network_policy={"type": "allowlist",
                                    "allowed_domains": ["pypi.org"]})  # fmt: skip
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    for expect_hit in (False, True):
        status, body, _ = await get(http, url)
        assert status == 200
        assert "memory_limit" not in body
        assert "network_policy" not in body
        raw = body["extra_fields"]["raw_response"]
        assert raw["network_policy"] == {"type": "allowlist", "allowed_domains": ["pypi.org"]}
        assert body["extra_fields"]["cache_debug"]["cache_hit"] is expect_hit


@pytest.mark.parametrize(
    ("path", "headers", "status", "param", "code"),
    [
        ("/v1/containers/cntr_ok", AUTH_A, 400, "provider", "invalid_parameter"),
        ("/openai/v1/containers/cntr_ok?provider=no%20pe", AUTH_A, 400, "provider", "invalid_parameter"),
        ("/openai/v1/containers/cntr_ok?provider=" + "p" * 65, AUTH_A, 400, "provider",
         "invalid_parameter"),
        ("/openai/v1/containers/cntr_ok", {"Authorization": f"Bearer {KEY_A}",
         "x-api-key": KEY_B}, 400, "authorization", "ambiguous_credential"),
        ("/openai/v1/containers/" + "a" * 129, AUTH_A, 400, "container_id", "invalid_parameter"),
        ("/openai/v1/containers/cntr%20x", AUTH_A, 400, "container_id", "invalid_parameter"),
        ("/openai/v1/containers/..%2Fadmin", AUTH_A, 400, "container_id", "invalid_parameter"),
        ("/openai/v1/containers/cntr.1", AUTH_A, 400, "container_id", "invalid_parameter"),
        ("/openai/v1/containers/_leading", AUTH_A, 400, "container_id", "invalid_parameter"),
        ("/openai/v1/containers/cntr%00", AUTH_A, 400, "container_id", "invalid_parameter"),
    ],
)  # fmt: skip
async def test_bad_requests_get_a_clear_error_and_no_upstream_call(
    sidecar: Running,
    emulator: Emulator,
    http: aiohttp.ClientSession,
    path: str,
    headers: dict[str, str],
    status: int,
    param: str,
    code: str,
) -> None:
    got, body, _ = await get(http, sidecar.url + path, headers)
    assert got == status
    assert body["is_bifrost_error"] is False
    assert body["status_code"] == status
    assert body["error"]["code"] == code
    assert body["error"].get("param", "") == param
    assert body["error"]["message"]
    assert body["extra_fields"]["request_type"] == "container_retrieve"
    assert emulator.retrieves() == 0


@pytest.mark.parametrize(
    ("path", "headers", "status", "param", "code"),
    [
        ("/openai/v1/containers/cntr_ok", {}, 401, "", "missing_credential"),
        ("/openai/v1/containers/cntr_ok", {"Authorization": "Bearer "}, 401, "", "missing_credential"),
        ("/openai/v1/containers/cntr_ok?provider=nope", AUTH_A, 400, "provider", "invalid_parameter"),
        ("/openai/v1/containers/cntr_ok?provider=anthropic", AUTH_A, 400, "provider",
         "unsupported_operation"),
        ("/v1/containers/cntr_ok?provider=groq", AUTH_A, 400, "provider", "unsupported_operation"),
    ],
)  # fmt: skip
async def test_straight_to_openai_bad_requests_are_refused_early(
    start_sidecar: Any,
    make_settings: Any,
    emulator: Emulator,
    http: aiohttp.ClientSession,
    path: str,
    headers: dict[str, str],
    status: int,
    param: str,
    code: str,
) -> None:
    sidecar = await start_sidecar(make_settings(upstream_kind="openai"))
    got, body, _ = await get(http, sidecar.url + path, headers)
    assert got == status
    assert body["error"]["code"] == code
    assert body["error"].get("param", "") == param
    assert emulator.retrieves() == 0


async def test_unsupported_provider_message_matches_the_gateway(
    start_sidecar: Any, make_settings: Any, http: aiohttp.ClientSession
) -> None:
    sidecar = await start_sidecar(make_settings(upstream_kind="openai"))
    _, body, _ = await get(http, f"{sidecar.url}/openai/v1/containers/cntr_1?provider=mistral")
    assert body["error"]["message"] == "container_retrieve is not supported by mistral provider"
    assert body["extra_fields"]["provider"] == "mistral"


async def test_the_gateway_decides_about_providers_and_its_refusal_is_not_cached(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    for _ in range(2):
        status, body, _ = await get(
            http, f"{sidecar.url}/openai/v1/containers/cntr_1?provider=mistral"
        )
        assert status == 400
        assert body["error"]["message"] == "container_retrieve is not supported by mistral provider"
    assert emulator.retrieves() == 2


async def test_threshold_header_is_clamped(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    await get(http, url)
    _, body, _ = await get(http, url, {**AUTH_A, "x-bf-cache-threshold": "7"})
    assert body["extra_fields"]["cache_debug"]["threshold"] == 1.0
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is True
    _, body, _ = await get(http, url, {**AUTH_A, "x-bf-cache-threshold": "-1"})
    assert body["extra_fields"]["cache_debug"]["threshold"] == 0.0


async def test_upstream_errors_are_relayed_then_shield_the_upstream_until_the_backoff_ends(
    start_sidecar: Any, make_settings: Any, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    sidecar = await start_sidecar(make_settings(error_backoff_s=0.3))
    cid = (await emulator.create(KEY_A))["id"]
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    emulator.state.add_fault(kind="status", status=503, count=1)
    status, body, _ = await get(http, url)
    assert status == 503
    assert body["is_bifrost_error"] is False
    assert body["status_code"] == 503
    # During the back-off the same error is answered, with no upstream call and a Retry-After.
    for _ in range(5):
        status, body, headers = await get(http, url)
        assert status == 503
        assert headers["Retry-After"] == "1"
    assert emulator.retrieves(cid) == 1
    # Kept: the 0.3 s back-off is real time (a failure marker's TTL in Redis), and the test
    # bounds when it ends.
    await asyncio.sleep(0.35)
    status, body, _ = await get(http, url)
    assert status == 200
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is False
    assert emulator.retrieves(cid) == 2


async def test_openai_errors_are_mapped_to_the_gateway_shape(
    start_sidecar: Any, make_settings: Any, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    sidecar = await start_sidecar(make_settings(upstream_kind="openai"))
    status, body, _ = await get(http, f"{sidecar.url}/openai/v1/containers/cntr_missing")
    assert status == 404
    assert body["is_bifrost_error"] is False
    assert body["error"]["message"] == "Container with id 'cntr_missing' not found."
    assert body["error"]["type"] == "invalid_request_error"
    assert body["extra_fields"]["raw_response"]["error"]["message"].startswith("Container")


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ({"kind": "timeout"}, 504, "upstream_timeout"),
        ({"kind": "malformed"}, 502, "upstream_malformed_response"),
        ({"kind": "reset"}, 502, "upstream_unavailable"),
    ],
)
async def test_upstream_failures_are_the_gateways_own_errors(
    start_sidecar: Any,
    make_settings: Any,
    emulator: Emulator,
    http: aiohttp.ClientSession,
    fault: dict[str, Any],
    status: int,
    code: str,
) -> None:
    sidecar = await start_sidecar(make_settings(upstream_timeout_s=0.3, error_backoff_s=0.2))
    cid = (await emulator.create(KEY_A))["id"]
    emulator.state.add_fault(count=1, **fault)
    got, body, _ = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
    assert got == status
    assert body["is_bifrost_error"] is True
    assert body["error"]["code"] == code
    assert emulator.url.split("//")[1] not in body["error"]["message"]  # no internal address
    await asyncio.sleep(0.25)  # kept: past the 0.2 s back-off, a failure marker's TTL in Redis
    got, body, _ = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
    assert got == 200
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is False


async def test_concurrent_cold_requests_make_one_upstream_call(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    emulator.state.set_latency(50)
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    results = await asyncio.gather(*(get(http, url) for _ in range(200)))
    assert {status for status, _, _ in results} == {200}
    assert emulator.retrieves(cid) == 1


async def test_replicas_sharing_redis_make_one_upstream_call(
    start_sidecar: Any, make_settings: Any, emulator: Emulator, http: aiohttp.ClientSession
) -> None:
    # A loaded machine must not make Redis look hung (a timeout sends reads upstream by design).
    settings = make_settings(redis_socket_timeout_s=5, redis_connect_timeout_s=5)
    replicas = [await start_sidecar(settings) for _ in range(3)]
    cid = (await emulator.create(KEY_A))["id"]
    emulator.state.set_latency(100)
    results = await asyncio.gather(
        *(get(http, f"{r.url}/openai/v1/containers/{cid}") for r in replicas for _ in range(20))
    )
    assert {status for status, _, _ in results} == {200}
    assert emulator.retrieves(cid) == 1


async def test_a_crashed_lock_holder_does_not_block_others(
    start_sidecar: Any,
    make_settings: Any,
    emulator: Emulator,
    http: aiohttp.ClientSession,
    redis_server: Any,
) -> None:
    sidecar = await start_sidecar(make_settings(lock_age_s=0.3))
    cid = (await emulator.create(KEY_A))["id"]
    credential = CredentialReader("bifrost", "test-secret").read(
        [("Authorization", f"Bearer {KEY_A}")]
    )
    # Another replica took the fetch lock and died: nobody will ever release it.
    lock = KeySpace("bcs").lock("openai", cid, credential.fingerprint)
    redis_server.client().set(lock, "dead-replica", px=60_000)
    status, body, _ = await get(http, f"{sidecar.url}/openai/v1/containers/{cid}")
    assert status == 200
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is False
    assert emulator.retrieves(cid) == 1


async def test_a_cancelled_waiter_does_not_cancel_the_shared_fetch(
    sidecar: Running, emulator: Emulator, http: aiohttp.ClientSession, redis_server: Any
) -> None:
    cid = (await emulator.create(KEY_A))["id"]
    emulator.state.set_latency(300)
    url = f"{sidecar.url}/openai/v1/containers/{cid}"
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(get(http, url), 0.05)
    emulator.state.set_latency(0)
    client = redis_server.client()
    record = KeySpace("bcs").record("openai", cid)
    await wait_for(lambda: bool(client.exists(record)))  # the shared fetch went on and landed
    client.close()
    status, body, _ = await get(http, url)
    assert status == 200
    assert body["extra_fields"]["cache_debug"]["cache_hit"] is True
    assert emulator.retrieves(cid) == 1
