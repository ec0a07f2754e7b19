"""Containers on the emulator's OpenAI face: create, retrieve, list, delete, keys and projects."""

from __future__ import annotations

import re

import msgspec

from tests.emulator.support import (
    KEY,
    REVOKED,
    STRANGER,
    TEAMMATE,
    Client,
    bearer,
    create,
    get,
    not_found,
    state_of,
    upload,
)


async def test_container_lifecycle(client: Client) -> None:
    state_of(client).freeze_clock()
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


async def test_create_takes_every_openai_option(client: Client) -> None:
    created = await create(
        client,
        expires_after={"anchor": "last_active_at", "minutes": 5},
        memory_limit="4g",
        network_policy={
            "type": "allowlist",
            "allowed_domains": ["pypi.org"],
            "domain_secrets": [{"domain": "pypi.org", "name": "TOKEN", "value": "s3cret"}],
        },
        skills=[
            {"type": "skill_reference", "skill_id": "skill_abc", "version": "latest"},
            {"type": "inline", "name": "csv", "description": "reads CSVs",
             "source": {"type": "base64", "media_type": "application/zip", "data": "UEsFBg=="}},
        ],
    )  # fmt: skip
    assert created["expires_after"]["minutes"] == 5
    assert created["memory_limit"] == "4g"
    # The secrets of a network policy are never echoed.
    assert created["network_policy"] == {"type": "allowlist", "allowed_domains": ["pypi.org"]}
    assert "metadata" not in created
    assert "s3cret" not in msgspec.json.encode(created).decode()


async def test_create_copies_its_file_ids_into_the_container(client: Client) -> None:
    notes = await upload(client, b"hello", "notes.txt")
    data = await upload(client, b"a,b\n1,2\n", "data.csv")
    created = await create(client, file_ids=[notes["id"], data["id"]])

    _, listing = await get(client, f"/v1/containers/{created['id']}/files?order=asc")
    files = listing["data"]
    assert [(f["path"], f["bytes"]) for f in files] == [
        ("/mnt/data/notes.txt", 5), ("/mnt/data/data.csv", 8),
    ]  # fmt: skip
    response = await client.get(
        f"/v1/containers/{created['id']}/files/{files[1]['id']}/content", headers=bearer(KEY)
    )
    assert await response.read() == b"a,b\n1,2\n"

    # A file of another project, or none at all, is not found, and nothing is created.
    theirs = await upload(client, b"x", "x.txt", key=STRANGER)
    for file_id in (theirs["id"], "file-missing"):
        response = await client.post(
            "/v1/containers", json={"name": "b", "file_ids": [file_id]}, headers=bearer(KEY)
        )
        error = (await response.json())["error"]
        assert (response.status, error["param"]) == (404, "file_ids")
        assert error["message"] == f"No such File object: {file_id}"
    assert len((await get(client, "/v1/containers"))[1]["data"]) == 1


async def test_create_refuses_what_openai_refuses(client: Client) -> None:
    bad_bodies = [
        ({}, "name", "missing_required_parameter"),
        ({"name": 3}, "name", "invalid_value"),
        ({"name": "b", "memory_limit": "2g"}, "memory_limit", "invalid_value"),
        ({"name": "b", "expires_after": {"anchor": "last_active_at", "minutes": 0}},
         "expires_after.minutes", "invalid_value"),
        ({"name": "b", "colour": "red"}, "colour", "unknown_parameter"),
        ({"name": "b", "network_policy": {"type": "allowlist"}}, "network_policy.allowed_domains",
         "missing_required_parameter"),
        ({"name": "b", "network_policy": {"type": "open"}}, "network_policy.type", "invalid_value"),
        ({"name": "b", "skills": [{"type": "skill_reference"}]}, "skills[0].skill_id",
         "missing_required_parameter"),
        ({"name": "b", "skills": [{"type": "inline", "name": "n", "description": "d",
          "source": {"type": "url", "media_type": "application/zip", "data": ""}}]},
         "skills[0].source.type", "invalid_value"),
        ({"name": "b", "file_ids": "file-1"}, "file_ids", "invalid_value"),
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
    _, page = await get(client, "/v1/containers")  # default limit 20, newest first
    assert [c["id"] for c in page["data"]] == ids[::-1]
    for query, param in (("limit=0", "limit"), ("limit=101", "limit"), ("order=up", "order"),
                         ("after=cntr_unknown", "after")):  # fmt: skip
        status, body = await get(client, f"/v1/containers?{query}")
        assert (status, body["error"]["param"]) == (400, param)


async def test_list_filters_by_name(client: Client) -> None:
    twins = [(await create(client, name="twin"))["id"] for _ in range(2)]
    await create(client, name="other")

    _, page = await get(client, "/v1/containers?name=twin&order=asc")
    assert [c["id"] for c in page["data"]] == twins
    _, page = await get(client, "/v1/containers?name=twin&limit=1")
    assert ([c["id"] for c in page["data"]], page["has_more"]) == ([twins[1]], True)
    assert (await get(client, "/v1/containers?name=nobody"))[1]["data"] == []


async def test_containers_are_scoped_to_the_project(client: Client) -> None:
    state_of(client).freeze_clock()
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
