"""The emulator's domain: projects and keys, containers and their files, the Files API.

Pure Python, no aiohttp: every method answers the OpenAI-shape JSON object (a dict ready to
encode) or raises :class:`ApiError`, which carries OpenAI's error envelope.

As on OpenAI, any operation on a container (retrieving it, adding, listing, reading or
deleting its files) refreshes its ``last_active_at``, and a container idle for its
``expires_after.minutes`` is ``expired``: its metadata still answers, its files do not.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any

import msgspec

from emulator import schema
from emulator.config import EmulatorConfig
from emulator.knobs import ROUTE_NAMES, Fault, FaultKind, Knobs
from emulator.objects import Container, ContainerFile, Received, StoredFile, new_id
from emulator.schema import ApiError
from emulator.streams import Streams

__all__ = ["ROUTE_NAMES", "EmulatorConfig", "EmulatorState", "Fault", "FaultKind"]


def _not_found(container_id: str) -> ApiError:
    return ApiError(404, f"Container with id '{container_id}' not found.")


class EmulatorState(Knobs):
    """Everything the emulator remembers, behind methods the routes and tests call."""

    def __init__(self, config: EmulatorConfig) -> None:
        super().__init__(config.latency_ms)
        self.config = config
        self._containers: dict[str, Container] = {}
        self._uploads: dict[str, StoredFile] = {}
        self._revoked = set(config.revoked_keys)
        self._project_of: dict[str, str] = {
            key: f"proj_{index}" for index, group in enumerate(config.projects) for key in group
        }
        self.streams = Streams(config.stream_delay_ms)
        # The Files API's bytes live on disk, removed with the state (or at exit).
        self._blobs = Path(tempfile.mkdtemp(prefix="emulator-files-"))
        self.close = weakref.finalize(self, shutil.rmtree, self._blobs, ignore_errors=True)

    def reset_stats(self) -> None:
        """Forget the counted (and recorded) requests and what streams sent."""
        super().reset_stats()
        self.streams.reset()

    # Projects and keys.

    def authenticate(self, key: str | None) -> str:
        """The project a key belongs to, or OpenAI's 401."""
        if not key:
            raise ApiError(401, schema.NO_KEY_MESSAGE)
        if key in self._revoked:
            message = f"Incorrect API key provided: {schema.mask_key(key)}. {schema.KEY_HINT}"
            raise ApiError(401, message, code="invalid_api_key")
        project = self._project_of.get(key)
        if project is None:
            # A digest, not the key itself, so that a record's repr never shows a secret.
            project = "key_" + hashlib.sha256(key.encode()).hexdigest()[:24]
        return project

    def revoke_key(self, key: str) -> None:
        """Answer 401 invalid_api_key to ``key`` from now on."""
        self._revoked.add(key)

    # Containers.

    def create_container(self, project: str, body: schema.CreateBody) -> dict[str, Any]:
        """Create a container from a validated request body, with copies of its ``file_ids``."""
        copies = [
            self._find_upload(project, file_id, "file_ids") for file_id in body.file_ids or ()
        ]
        now = self.now()
        after = body.expires_after
        self._seq += 1
        container = Container(
            id=new_id("cntr_"), seq=self._seq, project=project, name=body.name,
            created_at=now, last_active_at=now,
            expires_minutes=after.minutes if after else self.config.default_expires_minutes,
            memory_limit=body.memory_limit, metadata=body.metadata or None,
            network_policy=schema.render_network_policy(body.network_policy),
            skills=[msgspec.to_builtins(skill) for skill in body.skills or ()],
        )  # fmt: skip
        for upload in copies:
            self._add_file(container, upload.filename, upload.content)
        self._containers[container.id] = container
        return container.to_json(now)

    def list_containers(self, project: str, query: schema.ListQuery) -> dict[str, Any]:
        """One page of the project's containers (of one ``name``, if the query says so)."""
        mine = [
            c for c in self._containers.values()
            if c.project == project and query.name in (None, c.name)
        ]  # fmt: skip
        now = self.now()
        return schema.list_page(mine, query, "container", lambda c: c.to_json(now))

    def get_container(self, project: str, container_id: str) -> dict[str, Any]:
        """A container; retrieving a running container counts as activity, as on OpenAI."""
        container = self._find(project, container_id)
        now = self.now()
        container.touch(now)
        return container.to_json(now)

    def peek_container(self, container_id: str) -> dict[str, Any]:
        """A container as the emulator holds it, outside any project and without touching it."""
        container = self._containers.get(container_id)
        if container is None:
            raise _not_found(container_id)
        return container.to_json(self.now())

    def delete_container(self, project: str, container_id: str) -> dict[str, Any]:
        """Delete a container and its files."""
        self._find(project, container_id)
        del self._containers[container_id]
        return {"id": container_id, "object": "container.deleted", "deleted": True}

    # Files inside containers: every one of these is activity.

    def create_file(
        self, project: str, container_id: str, filename: str, content: bytes
    ) -> dict[str, Any]:
        """Add a file at ``/mnt/data/<filename>``."""
        return self._add_file(self._activate(project, container_id), filename, content).to_json()

    def copy_file(self, project: str, container_id: str, file_id: str) -> dict[str, Any]:
        """Add a copy of a Files API file (name and bytes) to the container."""
        container = self._activate(project, container_id)
        upload = self._find_upload(project, file_id, "file_id")
        return self._add_file(container, upload.filename, upload.content).to_json()

    def list_files(
        self, project: str, container_id: str, query: schema.ListQuery
    ) -> dict[str, Any]:
        """One page of a container's files."""
        files = list(self._activate(project, container_id).files.values())
        return schema.list_page(files, query, "file", ContainerFile.to_json)

    def get_file(self, project: str, container_id: str, file_id: str) -> dict[str, Any]:
        """A file's metadata."""
        return self._find_file(project, container_id, file_id).to_json()

    def file_content(self, project: str, container_id: str, file_id: str) -> bytes:
        """A file's bytes."""
        return self._find_file(project, container_id, file_id).content

    def delete_file(self, project: str, container_id: str, file_id: str) -> dict[str, Any]:
        """Remove a file from its container."""
        self._find_file(project, container_id, file_id)
        del self._containers[container_id].files[file_id]
        return {"id": file_id, "object": "container.file.deleted", "deleted": True}

    # The Files API, whose files ``file_ids`` and ``file_id`` copy into containers.

    def upload(self, project: str, filename: str, content: bytes, purpose: str) -> dict[str, Any]:
        """Store a file of bytes at hand, as ``POST /v1/files`` does."""
        path = self.blob_path()
        path.write_bytes(content)
        digest = hashlib.sha256(content).hexdigest()
        received = Received(filename=filename, size=len(content), sha256=digest)
        return self.store_upload(project, received, path, purpose)

    def blob_path(self) -> Path:
        """A new file's place on disk, for an upload streamed there."""
        return self._blobs / new_id("blob_")

    def store_upload(
        self, project: str, received: Received, path: Path, purpose: str
    ) -> dict[str, Any]:
        """Keep a file whose bytes were streamed to ``path`` (``POST /v1/files``)."""
        self._seq += 1
        upload = StoredFile(
            id=new_id("file-"), seq=self._seq, project=project, created_at=self.now(),
            filename=_basename(received.filename), purpose=purpose, path=path,
            size=received.size, sha256=received.sha256,
        )  # fmt: skip
        self._uploads[upload.id] = upload
        return upload.to_json()

    def peek_upload(self, file_id: str) -> Received:
        """What the emulator received of a stored file: name, size, SHA-256 (for tests)."""
        upload = self._uploads.get(file_id)
        if upload is None:
            raise ApiError(404, f"No such File object: {file_id}")
        return Received(filename=upload.filename, size=upload.size, sha256=upload.sha256)

    def list_uploads(self, project: str, query: schema.ListQuery) -> dict[str, Any]:
        """One page of the project's stored files."""
        mine = [u for u in self._uploads.values() if u.project == project]
        return schema.list_page(mine, query, "file", StoredFile.to_json)

    def get_upload(self, project: str, file_id: str) -> dict[str, Any]:
        """A stored file's metadata."""
        return self._find_upload(project, file_id).to_json()

    def upload_content(self, project: str, file_id: str) -> Path:
        """Where a stored file's bytes are."""
        return self._find_upload(project, file_id).path

    def delete_upload(self, project: str, file_id: str) -> dict[str, Any]:
        """Delete a stored file (copies in containers stay)."""
        self._uploads.pop(self._find_upload(project, file_id).id).path.unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    # Operator overrides, outside any project.

    def touch(self, container_id: str) -> dict[str, Any]:
        """Count as activity now, whatever the container's status."""
        container = self._containers.get(container_id)
        if container is None:
            raise _not_found(container_id)
        container.last_active_at = self.now()
        return container.to_json(container.last_active_at)

    def update_container(self, container_id: str, **fields: Any) -> dict[str, Any]:
        """Overwrite fields (status, last_active_at, ...); a status set here sticks."""
        container = self._containers.get(container_id)
        if container is None:
            raise _not_found(container_id)
        for name, value in schema.parse_overrides(fields).items():
            setattr(container, name, value)
        return container.to_json(self.now())

    def _find(self, project: str, container_id: str) -> Container:
        container = self._containers.get(container_id)
        if container is None or container.project != project:
            raise _not_found(container_id)
        return container

    def _activate(self, project: str, container_id: str) -> Container:
        container = self._find(project, container_id)
        if not container.touch(self.now()):
            status = container.status(self.now())
            raise ApiError(
                400,
                f"Container with id '{container_id}' is {status} and can no longer be used. "
                "Create a new container.",
                code=f"container_{status}",
            )
        return container

    def _add_file(self, container: Container, filename: str, content: bytes) -> ContainerFile:
        self._seq += 1
        file = ContainerFile(
            id=new_id("cfile_"), seq=self._seq, container_id=container.id,
            created_at=self.now(), path="/mnt/data/" + _basename(filename),
            content=content,
        )  # fmt: skip
        container.files[file.id] = file
        return file

    def _find_file(self, project: str, container_id: str, file_id: str) -> ContainerFile:
        file = self._activate(project, container_id).files.get(file_id)
        if file is None:
            raise ApiError(
                404, f"File with id '{file_id}' not found in container '{container_id}'."
            )
        return file

    def _find_upload(self, project: str, file_id: str, param: str | None = None) -> StoredFile:
        upload = self._uploads.get(file_id)
        if upload is None or upload.project != project:
            raise ApiError(404, f"No such File object: {file_id}", param=param)
        return upload


def _basename(filename: str) -> str:
    return filename.replace("\\", "/").rsplit("/", 1)[-1] or "upload"
