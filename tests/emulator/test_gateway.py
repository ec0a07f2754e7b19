"""The gateway face (``/openai/v1``, ``/openai``): Bifrost's shapes, providers and keys."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from tests.emulator.support import (
    KEY,
    REVOKED,
    STRANGER,
    Client,
    MakeClient,
    bearer,
    create,
    not_found,
    state_of,
)

VK = {"x-bf-vk": KEY}


async def gateway_get(client: Client, path: str, headers: dict[str, str] | None = None) -> Any:
    response = await client.get(path, headers=VK if headers is None else headers)
    return response.status, await response.json()


@pytest.mark.parametrize("prefix", ["/openai/v1", "/openai"])
async def test_answers_carry_extra_fields_with_the_providers_raw_response(
    client: Client, prefix: str
) -> None:
    state_of(client).freeze_clock()
    container = await create(client, network_policy={"type": "allowlist",
                                                     "allowed_domains": ["pypi.org"]})  # fmt: skip

    status, body = await gateway_get(client, f"{prefix}/containers/{container['id']}")
    assert status == 200
    extra = body.pop("extra_fields")
    # The gateway's Go struct order; routing_info and upstream_latency are the newer fields.
    assert list(extra) == ["request_type", "routing_info", "provider", "latency",
                           "upstream_latency", "chunk_index", "raw_response"]  # fmt: skip
    assert extra["request_type"] == "container_retrieve"
    assert extra["routing_info"] == {"provider": "openai"}
    assert (extra["provider"], extra["chunk_index"]) == ("openai", 0)
    assert isinstance(extra["latency"], int)
    assert 0 <= extra["upstream_latency"] <= extra["latency"]
    assert extra["raw_response"] == container  # the provider's own JSON, network_policy kept
    assert body == {k: v for k, v in container.items() if k != "network_policy"}

    status, listing = await gateway_get(client, f"{prefix}/containers?provider=azure")
    assert listing["extra_fields"]["request_type"] == "container_list"
    assert listing["extra_fields"]["provider"] == "azure"
    assert "network_policy" not in listing["data"][0]
    assert listing["extra_fields"]["raw_response"]["data"] == [container]


async def test_every_route_answers_in_the_gateways_shape(client: Client) -> None:
    base = "/openai/v1/containers"
    response = await client.post(
        base, json={"name": "gw", "provider": "openai", "memory_limit": "4g"}, headers=VK
    )
    created = await response.json()
    assert response.status == 200, created
    extra = created["extra_fields"]
    assert extra["request_type"] == "container_create"
    # The gateway takes its own provider field out and echoes the provider's request.
    assert extra["raw_request"] == {"name": "gw", "memory_limit": "4g"}
    assert list(extra)[-2:] == ["raw_request", "raw_response"]
    cid = created["id"]

    form = aiohttp.FormData()
    form.add_field("file", b"bytes!", filename="f.txt")
    response = await client.post(f"{base}/{cid}/files", data=form, headers=VK)
    file = await response.json()
    assert file["extra_fields"]["request_type"] == "container_file_create"
    for path, request_type in (
        (f"{base}/{cid}/files", "container_file_list"),
        (f"{base}/{cid}/files/{file['id']}", "container_file_retrieve"),
    ):
        status, body = await gateway_get(client, path)
        assert (status, body["extra_fields"]["request_type"]) == (200, request_type)
    response = await client.get(f"{base}/{cid}/files/{file['id']}/content", headers=VK)
    assert (response.content_type, await response.read()) == ("application/octet-stream", b"bytes!")
    response = await client.delete(f"{base}/{cid}/files/{file['id']}", headers=VK)
    assert (await response.json())["extra_fields"]["request_type"] == "container_file_delete"
    response = await client.delete(f"{base}/{cid}", headers=VK)
    deleted = await response.json()
    assert deleted["extra_fields"]["raw_response"] == {
        "id": cid, "object": "container.deleted", "deleted": True,
    }  # fmt: skip


async def test_legacy_gateways_have_no_routing_info_and_answer_500_unsupported(
    make_client: MakeClient,
) -> None:
    client = await make_client(gateway_version="legacy")
    container = await create(client)
    status, body = await gateway_get(client, f"/openai/containers/{container['id']}")
    assert list(body["extra_fields"]) == ["request_type", "provider", "latency", "chunk_index",
                                          "raw_response"]  # fmt: skip
    status, body = await gateway_get(client, f"/openai/containers/{container['id']}?provider=groq")
    assert (status, body["error"]["code"]) == (500, "unsupported_operation")


async def test_the_gateways_own_errors(client: Client) -> None:
    container = await create(client)
    path = f"/openai/v1/containers/{container['id']}"

    status, body = await gateway_get(client, f"{path}?provider=anthropic")
    assert status == 400
    assert body == {
        "is_bifrost_error": False,
        "error": {
            "message": "container_retrieve is not supported by anthropic provider",
            "code": "unsupported_operation",
        },
        "extra_fields": {"provider": "anthropic", "request_type": "container_retrieve"},
    }

    status, body = await gateway_get(client, f"{path}?provider=my-openai-eu")
    assert status == 400
    assert body == {
        "is_bifrost_error": False,
        "error": {"message": "failed to get config for provider my-openai-eu: not found"},
        "extra_fields": {"provider": "my-openai-eu", "request_type": "container_retrieve"},
    }

    status, body = await gateway_get(client, path, {})
    assert status == 401
    assert (body["type"], body["status_code"]) == ("virtual_key_required", 401)
    assert body["is_bifrost_error"] is False

    response = await client.delete(
        f"/openai/containers/{container['id']}?provider=bedrock", headers=bearer(KEY)
    )
    assert (await response.json())["error"]["message"] == (
        "container_delete is not supported by bedrock provider"
    )
    assert (await gateway_get(client, path))[0] == 200  # nothing was deleted


async def test_the_providers_errors_are_relayed_with_their_raw_response(client: Client) -> None:
    container = await create(client)
    path = f"/openai/v1/containers/{container['id']}"

    status, body = await gateway_get(client, path, {"x-goog-api-key": STRANGER})
    assert status == 404
    assert (body["is_bifrost_error"], body["status_code"]) == (False, 404)
    assert body["error"] == {
        "message": f"Container with id '{container['id']}' not found.",
        "type": "invalid_request_error",
    }
    assert body["extra_fields"] == {
        "provider": "openai",
        "request_type": "container_retrieve",
        "raw_response": not_found(container["id"]),
    }
    status, body = await gateway_get(client, path, {"x-api-key": REVOKED})
    assert (status, body["error"]["code"]) == (401, "invalid_api_key")


async def test_custom_providers_answer_like_their_base(make_client: MakeClient) -> None:
    client = await make_client(
        custom_providers=(("my-openai-eu", "openai"), ("my-claude", "anthropic"))
    )
    container = await create(client)
    path = f"/openai/v1/containers/{container['id']}"

    status, body = await gateway_get(client, f"{path}?provider=my-openai-eu")
    assert status == 200
    assert body["id"] == container["id"]
    assert body["extra_fields"]["provider"] == "my-openai-eu"
    assert body["extra_fields"]["routing_info"] == {"provider": "my-openai-eu"}
    status, body = await gateway_get(client, "/openai/containers?provider=my-openai-eu")
    assert [c["id"] for c in body["data"]] == [container["id"]]

    status, body = await gateway_get(client, f"{path}?provider=my-claude")
    assert (status, body["error"]["message"]) == (
        400, "container_retrieve is not supported by my-claude provider",
    )  # fmt: skip
    status, body = await gateway_get(client, f"{path}?provider=my-mistral")
    assert body["error"]["message"] == "failed to get config for provider my-mistral: not found"


async def test_with_optional_virtual_keys_anonymous_requests_use_the_gateways_key(
    make_client: MakeClient,
) -> None:
    shared = "sk-gateway-own-key-0042"
    client = await make_client(
        virtual_keys="optional", gateway_key=shared, projects=((KEY, shared),)
    )
    mine = await create(client)

    status, body = await gateway_get(client, f"/openai/v1/containers/{mine['id']}", {})
    assert (status, body["id"]) == (200, mine["id"])
    response = await client.post("/openai/containers", json={"name": "anon"})
    anonymous = await response.json()
    assert response.status == 200, anonymous
    status, _ = await gateway_get(client, f"/openai/v1/containers/{anonymous['id']}")
    assert status == 200  # same project as KEY
    # A caller with a credential is still served with it, not with the gateway's key.
    status, _ = await gateway_get(client, f"/openai/v1/containers/{mine['id']}", bearer(STRANGER))
    assert status == 404
    # The OpenAI face knows nothing of virtual keys.
    assert (await client.get(f"/v1/containers/{mine['id']}")).status == 401
