"""Multipart request bodies: small forms read whole, uploads streamed (counted and hashed).

An upload of any size passes through in chunks: its bytes are counted, hashed and, when the
route keeps them, written to disk, so the emulator's memory stays flat for a 1 GiB file.
"""

from __future__ import annotations

import hashlib
from typing import BinaryIO
from urllib.parse import unquote

from aiohttp import BodyPartReader, web

from emulator.objects import Received
from emulator.schema import ApiError

__all__ = ["Received", "missing_file", "read_form", "receive_form"]

_CHUNK = 1 << 16


def missing_file() -> ApiError:
    """OpenAI's 400 for a multipart body without its ``file``."""
    message = "Missing required parameter: 'file'."
    return ApiError(400, message, param="file", code="missing_required_parameter")


def _filename(part: BodyPartReader) -> str:
    # aiohttp's own client percent-encodes filenames; curl and httpx send them raw.
    return unquote(part.filename or "upload")


async def read_form(request: web.Request) -> tuple[dict[str, str], tuple[str, bytes] | None]:
    """A multipart body's text fields, and its ``file`` part (name and bytes) if it has one."""
    fields: dict[str, str] = {}
    upload: tuple[str, bytes] | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name is None:
                continue
            if part.name == "file":
                upload = _filename(part), bytes(await part.read())
            else:
                fields[part.name] = await part.text()
    except ValueError as exc:
        raise ApiError(400, f"Could not parse the multipart body: {exc}") from None
    return fields, upload


async def receive_form(
    request: web.Request, sink: BinaryIO | None = None
) -> tuple[dict[str, str], Received | None]:
    """A multipart body's text fields, and its ``file`` part streamed into ``sink`` (if any)
    chunk by chunk, never held whole."""
    if not request.content_type.startswith("multipart/"):
        raise ApiError(400, "This route expects a multipart/form-data body.")
    fields: dict[str, str] = {}
    received: Received | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader) or part.name is None:
                continue
            if part.name != "file":
                fields[part.name] = await part.text()
                continue
            digest, size = hashlib.sha256(), 0
            while chunk := await part.read_chunk(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                if sink is not None:
                    sink.write(chunk)
            received = Received(filename=_filename(part), size=size, sha256=digest.hexdigest())
    except ValueError as exc:
        raise ApiError(400, f"Could not parse the multipart body: {exc}") from None
    return fields, received
