"""Files in containers, uploaded or copied from the Files API, and the Files API itself."""

from __future__ import annotations

import hashlib
import re
import tracemalloc
from collections.abc import AsyncIterator

import aiohttp

from tests.emulator.support import KEY, STRANGER, Client, bearer, create, get, state_of, upload


async def test_container_files_lifecycle(client: Client) -> None:
    container = await create(client)
    base = f"/v1/containers/{container['id']}"

    form = aiohttp.FormData()
    form.add_field("file", b"hello, world", filename="reports/notes.txt")
    response = await client.post(f"{base}/files", data=form, headers=bearer(KEY))
    file = await response.json()
    assert re.fullmatch(r"cfile_[0-9a-f]+", file["id"])
    assert file == {
        "id": file["id"],
        "object": "container.file",
        "created_at": file["created_at"],
        "bytes": 12,
        "container_id": container["id"],
        "path": "/mnt/data/notes.txt",
        "source": "user",
    }
    response = await client.get(f"{base}/files/{file['id']}/content", headers=bearer(KEY))
    assert response.content_type == "application/octet-stream"
    assert await response.read() == b"hello, world"
    assert await get(client, f"{base}/files/{file['id']}") == (200, file)

    response = await client.delete(f"{base}/files/{file['id']}", headers=bearer(KEY))
    assert await response.json() == {
        "id": file["id"],
        "object": "container.file.deleted",
        "deleted": True,
    }
    status, body = await get(client, f"{base}/files/{file['id']}")
    assert status == 404
    assert body["error"]["message"] == (
        f"File with id '{file['id']}' not found in container '{container['id']}'."
    )


async def test_a_file_id_copies_the_files_content(client: Client) -> None:
    stored = await upload(client, b"col\n1\n", "table.csv")
    container = await create(client)
    base = f"/v1/containers/{container['id']}/files"

    response = await client.post(base, json={"file_id": stored["id"]}, headers=bearer(KEY))
    copy = await response.json()
    assert (response.status, copy["path"], copy["bytes"]) == (200, "/mnt/data/table.csv", 6)
    content = await client.get(f"{base}/{copy['id']}/content", headers=bearer(KEY))
    assert await content.read() == b"col\n1\n"
    # The copy outlives the stored file.
    assert (await client.delete(f"/v1/files/{stored['id']}", headers=bearer(KEY))).status == 200
    assert (await get(client, f"{base}/{copy['id']}"))[0] == 200

    form = aiohttp.FormData(default_to_multipart=True)
    form.add_field("file_id", (await upload(client, b"42", "answer.txt"))["id"])
    response = await client.post(base, data=form, headers=bearer(KEY))  # multipart file_id
    assert (await response.json())["path"] == "/mnt/data/answer.txt"

    for body in ({"file_id": stored["id"]}, {"file_id": "file-nope"}):
        response = await client.post(base, json=body, headers=bearer(KEY))
        assert (response.status, (await response.json())["error"]["param"]) == (404, "file_id")
    theirs = await upload(client, b"x", "x.txt", key=STRANGER)
    response = await client.post(base, json={"file_id": theirs["id"]}, headers=bearer(KEY))
    assert response.status == 404
    response = await client.post(base, json={"id": "file-1"}, headers=bearer(KEY))
    assert (await response.json())["error"]["code"] == "unknown_parameter"
    response = await client.post(
        base, data=aiohttp.FormData({"x": "y"}, default_to_multipart=True), headers=bearer(KEY)
    )
    assert (await response.json())["error"]["param"] == "file"

    _, listing = await get(client, f"{base}?order=asc")
    assert [f["path"] for f in listing["data"]] == ["/mnt/data/table.csv", "/mnt/data/answer.txt"]


async def test_the_files_api(client: Client) -> None:
    stored = await upload(client, b"abc", "dir/abc.txt", purpose="assistants")
    assert re.fullmatch(r"file-[A-Za-z0-9]{22}", stored["id"])
    assert stored == {
        "id": stored["id"], "object": "file", "bytes": 3, "created_at": stored["created_at"],
        "filename": "abc.txt", "purpose": "assistants", "status": "processed",
        "expires_at": None, "status_details": None,
    }  # fmt: skip
    assert await get(client, f"/v1/files/{stored['id']}") == (200, stored)
    response = await client.get(f"/v1/files/{stored['id']}/content", headers=bearer(KEY))
    assert await response.read() == b"abc"
    assert (await get(client, "/v1/files"))[1]["data"] == [stored]
    assert (await get(client, "/v1/files", STRANGER))[1]["data"] == []
    assert (await get(client, f"/v1/files/{stored['id']}", STRANGER))[0] == 404

    response = await client.delete(f"/v1/files/{stored['id']}", headers=bearer(KEY))
    assert await response.json() == {"id": stored["id"], "object": "file", "deleted": True}
    assert (await get(client, f"/v1/files/{stored['id']}"))[0] == 404

    for fields, param in (({"purpose": "fun"}, "purpose"), ({}, "purpose")):
        form = aiohttp.FormData(fields)
        form.add_field("file", b"x", filename="x")
        response = await client.post("/v1/files", data=form, headers=bearer(KEY))
        assert (response.status, (await response.json())["error"]["param"]) == (400, param)
    form = aiohttp.FormData({"purpose": "user_data"}, default_to_multipart=True)
    response = await client.post("/v1/files", data=form, headers=bearer(KEY))
    assert (await response.json())["error"]["param"] == "file"
    response = await client.post("/v1/files", json={"purpose": "x"}, headers=bearer(KEY))
    assert response.status == 400


async def test_a_large_upload_is_streamed_to_disk_counted_and_hashed(client: Client) -> None:
    chunk, chunks = bytes(range(256)) * 256, 256  # 16 MiB, generated as it is sent
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(chunks):
            digest.update(chunk)
            yield chunk

    form = aiohttp.FormData({"purpose": "batch"})
    form.add_field("file", body(), filename="big.jsonl")
    tracemalloc.start()
    try:
        response = await client.post("/v1/files", data=form, headers=bearer(KEY))
        stored = await response.json()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    size = len(chunk) * chunks
    assert (stored["bytes"], stored["filename"]) == (size, "big.jsonl")
    assert state_of(client).peek_upload(stored["id"]).sha256 == digest.hexdigest()
    assert peak < size // 4, "the upload went through memory in chunks, not whole"

    response = await client.get(f"/v1/files/{stored['id']}/content", headers=bearer(KEY))
    received = hashlib.sha256()
    async for piece in response.content.iter_chunked(1 << 16):
        received.update(piece)
    assert received.hexdigest() == digest.hexdigest()
