"""What the emulator stores: containers, the files inside them, and the Files API's files.

Each renders itself as the JSON object OpenAI answers (a dict ready to encode).
"""

from __future__ import annotations

import secrets
import string
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["Container", "ContainerFile", "Received", "StoredFile", "new_id"]

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str) -> str:
    """An id in OpenAI's style: ``cntr_<32 hex>``, ``cfile_<32 hex>``, ``file-<22 alnum>``."""
    if prefix == "file-":
        return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(22))
    return prefix + secrets.token_hex(16)


class Received(msgspec.Struct, frozen=True, kw_only=True):
    """An uploaded file as it went by: its name, size and SHA-256."""

    filename: str
    size: int
    sha256: str


class StoredFile(msgspec.Struct, kw_only=True):
    """A file of the Files API (``POST /v1/files``), which ``file_ids`` and ``file_id`` copy;
    its bytes are on disk, at ``path``."""

    id: str
    seq: int
    project: str
    created_at: int
    filename: str
    purpose: str
    path: Path
    size: int
    sha256: str

    @property
    def content(self) -> bytes:
        return self.path.read_bytes()

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.size,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


class ContainerFile(msgspec.Struct, kw_only=True):
    """A file inside a container."""

    id: str
    seq: int
    container_id: str
    created_at: int
    path: str
    content: bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "container.file",
            "created_at": self.created_at,
            "bytes": len(self.content),
            "container_id": self.container_id,
            "path": self.path,
            "source": "user",
        }


class Container(msgspec.Struct, kw_only=True):
    """A container; ``status`` is computed from the clock unless an operator pinned it."""

    id: str
    seq: int
    project: str
    name: str
    created_at: int
    last_active_at: int
    expires_minutes: int
    memory_limit: str
    metadata: dict[str, str] | None
    network_policy: dict[str, Any]
    skills: list[dict[str, Any]] = msgspec.field(default_factory=list)
    pinned_status: str | None = None
    files: dict[str, ContainerFile] = msgspec.field(default_factory=dict)

    def status(self, now: int) -> str:
        if self.pinned_status is not None:
            return self.pinned_status
        expired = now - self.last_active_at >= self.expires_minutes * 60
        return "expired" if expired else "running"

    def touch(self, now: int) -> bool:
        """Count as activity at ``now`` if the container is still running; True if it was."""
        if self.status(now) != "running":
            return False
        # Never backwards: an operator may have set last_active_at ahead of the clock.
        self.last_active_at = max(self.last_active_at, now)
        return True

    def to_json(self, now: int) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "object": "container",
            "created_at": self.created_at,
            "status": self.status(now),
            "expires_after": {"anchor": "last_active_at", "minutes": self.expires_minutes},
            "last_active_at": self.last_active_at,
            "memory_limit": self.memory_limit,
            "name": self.name,
            "network_policy": self.network_policy,
        }
        if self.metadata:
            out["metadata"] = self.metadata
        return out
