"""Container files through the sidecar, uploaded or copied from the Files API, with the SDK."""

from __future__ import annotations

import openai
import pytest
from openai.types.containers import FileCreateResponse, FileListResponse, FileRetrieveResponse

from tests.conformance.support import Stack, known


async def test_every_file_route(stack: Stack) -> None:
    client = stack.sdk()
    container = await client.containers.create(name="with-files")
    files = client.containers.files

    uploaded = await files.create(container.id, file=("notes.txt", b"hello, world"))
    assert isinstance(uploaded, FileCreateResponse)
    assert (uploaded.path, uploaded.bytes, uploaded.container_id, uploaded.source) == (
        "/mnt/data/notes.txt", 12, container.id, "user",
    )  # fmt: skip
    second = await files.create(container.id, file=("data.csv", b"a,b\n"))

    listed = [f async for f in files.list(container.id, order="asc")]
    assert [f.id for f in listed] == [uploaded.id, second.id]
    assert all(isinstance(f, FileListResponse) for f in listed)
    paged = [f.id async for f in files.list(container.id, limit=1)]
    assert paged == [second.id, uploaded.id]

    retrieved = await files.retrieve(uploaded.id, container_id=container.id)
    assert isinstance(retrieved, FileRetrieveResponse)
    assert known(retrieved) == known(uploaded)
    content = await files.content.retrieve(uploaded.id, container_id=container.id)
    assert content.read() == b"hello, world"

    await files.delete(uploaded.id, container_id=container.id)
    with pytest.raises(openai.NotFoundError):
        await files.retrieve(uploaded.id, container_id=container.id)
    assert [f.id async for f in files.list(container.id)] == [second.id]


async def test_file_ids_and_file_id_copy_files_of_the_files_api(stack: Stack) -> None:
    client = stack.sdk()
    stored = stack.emulator.state.upload(stack.project(), "table.csv", b"col\n1\n", "user_data")

    container = await client.containers.create(name="seeded", file_ids=[stored["id"]])
    (copied,) = [f async for f in client.containers.files.list(container.id)]
    assert (copied.path, copied.bytes) == ("/mnt/data/table.csv", 6)

    again = await client.containers.files.create(container.id, file_id=stored["id"])
    assert again.path == "/mnt/data/table.csv"
    content = await client.containers.files.content.retrieve(again.id, container_id=container.id)
    assert content.read() == b"col\n1\n"


async def test_file_operations_keep_the_container_alive(stack: Stack) -> None:
    client = stack.sdk()
    container = await client.containers.create(
        name="busy", expires_after={"anchor": "last_active_at", "minutes": 1}
    )
    for _ in range(3):
        stack.emulator.state.advance_clock(45)
        await client.containers.files.create(container.id, file=("tick.txt", b"."))
    fresh = await client.containers.retrieve(
        container.id, extra_headers={"Cache-Control": "no-cache"}
    )
    assert fresh.status == "running"
    assert fresh.last_active_at == stack.held(container.id)["last_active_at"]
