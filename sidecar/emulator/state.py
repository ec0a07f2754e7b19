"""The emulator's domain: projects, containers and their files, a movable clock, faults, stats.

Pure Python, no aiohttp: every method answers the OpenAI-shape JSON object (a dict ready to
encode) or raises :class:`ApiError`, which carries OpenAI's error envelope.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import Counter
from typing import Any, Literal

import msgspec

from sidecar.emulator import schema
from sidecar.emulator.schema import ApiError

__all__ = ["ROUTE_NAMES", "EmulatorConfig", "EmulatorState", "Fault", "FaultKind"]

ROUTE_NAMES = (
    "create", "list", "retrieve", "delete",
    "file_create", "file_list", "file_retrieve", "file_content", "file_delete",
)  # fmt: skip
FaultKind = Literal["status", "timeout", "malformed", "reset", "hangup"]


class EmulatorConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How the emulator starts; everything but the projects can be changed later over HTTP."""

    latency_ms: float = 0.0
    # Groups of API keys sharing one project; a key listed nowhere is a project of its own.
    projects: tuple[tuple[str, ...], ...] = ()
    # Keys answered with OpenAI's 401 invalid_api_key.
    revoked_keys: frozenset[str] = frozenset()
    default_expires_minutes: int = 20

    def __post_init__(self) -> None:
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        if not 1 <= self.default_expires_minutes <= 1440:
            raise ValueError("default_expires_minutes must be between 1 and 1440")
        keys = [key for group in self.projects for key in group]
        if len(keys) != len(set(keys)):
            raise ValueError("an API key may belong to one project only")

    def __repr__(self) -> str:
        # The keys are secrets, even in an emulator: show only how many there are.
        return (
            f"EmulatorConfig(latency_ms={self.latency_ms}, projects=<{len(self.projects)} groups>, "
            f"revoked_keys=<{len(self.revoked_keys)} keys>, "
            f"default_expires_minutes={self.default_expires_minutes})"
        )


class Fault(msgspec.Struct, kw_only=True):
    """A failure injected into matching API requests, ``count`` times or until cleared."""

    id: int = 0
    kind: FaultKind
    status: int = 500
    retry_after_s: float | None = None
    route: str = "*"
    container_id: str | None = None
    count: int | None = None


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
    pinned_status: str | None = None
    files: dict[str, ContainerFile] = msgspec.field(default_factory=dict)

    def status(self, now: int) -> str:
        if self.pinned_status is not None:
            return self.pinned_status
        expired = now - self.last_active_at >= self.expires_minutes * 60
        return "expired" if expired else "running"

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


def _not_found(container_id: str) -> ApiError:
    return ApiError(404, f"Container with id '{container_id}' not found.")


class EmulatorState:
    """Everything the emulator remembers, behind methods the routes and tests call."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.latency_ms = config.latency_ms
        self._offset_s = 0.0
        self._seq = 0
        self._containers: dict[str, Container] = {}
        self._faults: list[Fault] = []
        self._revoked = set(config.revoked_keys)
        self._project_of: dict[str, str] = {
            key: f"proj_{index}" for index, group in enumerate(config.projects) for key in group
        }
        self._calls: Counter[str] = Counter()
        self._retrieves: Counter[str] = Counter()

    # Clock, latency, stats, faults: the knobs of the control API.

    def now(self) -> int:
        """The emulator's clock in unix seconds: wall time plus every ``advance_clock``."""
        return int(time.time() + self._offset_s)

    def advance_clock(self, seconds: float) -> int:
        """Move the clock forward; answer the new time."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        self._offset_s += seconds
        return self.now()

    def set_latency(self, ms: float) -> None:
        """Delay every API answer by ``ms`` from now on."""
        if ms < 0:
            raise ValueError("latency must be >= 0")
        self.latency_ms = ms

    def count(self, route: str, container_id: str | None) -> None:
        """Record one API request as it arrives."""
        self._calls[route] += 1
        if route == "retrieve" and container_id is not None:
            self._retrieves[container_id] += 1

    def stats(self) -> dict[str, Any]:
        """Requests seen since start or the last reset, by route and retrieves by container."""
        return {
            "total": self._calls.total(),
            "calls": dict(self._calls),
            "retrieve_by_container": dict(self._retrieves),
        }

    def reset_stats(self) -> None:
        """Forget the counted requests."""
        self._calls.clear()
        self._retrieves.clear()

    def add_fault(
        self,
        kind: FaultKind,
        *,
        status: int = 500,
        retry_after_s: float | None = None,
        route: str = "*",
        container_id: str | None = None,
        count: int | None = None,
    ) -> Fault:
        """Make matching requests fail; ``count=None`` keeps the fault until cleared."""
        if route != "*" and route not in ROUTE_NAMES:
            raise ValueError(f"unknown route {route!r}: use '*' or one of {', '.join(ROUTE_NAMES)}")
        if not 100 <= status <= 599:
            raise ValueError("status must be an HTTP status code")
        if count is not None and count < 1:
            raise ValueError("count must be >= 1 (or null for until cleared)")
        self._seq += 1
        fault = Fault(
            id=self._seq, kind=kind, status=status, retry_after_s=retry_after_s,
            route=route, container_id=container_id, count=count,
        )  # fmt: skip
        self._faults.append(fault)
        return fault

    def faults(self) -> list[Fault]:
        """The faults still armed, oldest first."""
        return list(self._faults)

    def clear_faults(self) -> int:
        """Disarm every fault; answer how many there were."""
        cleared = len(self._faults)
        self._faults.clear()
        return cleared

    def take_fault(self, route: str, container_id: str | None) -> Fault | None:
        """The first fault matching this request, used up by one if it has a count."""
        for fault in self._faults:
            if fault.route not in ("*", route):
                continue
            if fault.container_id is not None and fault.container_id != container_id:
                continue
            if fault.count is not None:
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)
            return fault
        return None

    # Projects and containers: the OpenAI API.

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

    def create_container(self, project: str, body: schema.CreateBody) -> dict[str, Any]:
        """Create a container from a validated request body."""
        now = self.now()
        after = body.expires_after
        policy = body.network_policy
        self._seq += 1
        container = Container(
            id="cntr_" + secrets.token_hex(16), seq=self._seq, project=project, name=body.name,
            created_at=now, last_active_at=now,
            expires_minutes=after.minutes if after else self.config.default_expires_minutes,
            memory_limit=body.memory_limit, metadata=body.metadata or None,
            network_policy=msgspec.to_builtins(policy) if policy else {"type": "disabled"},
        )  # fmt: skip
        self._containers[container.id] = container
        return container.to_json(now)

    def list_containers(self, project: str, query: schema.ListQuery) -> dict[str, Any]:
        """One page of the project's containers."""
        mine = [c for c in self._containers.values() if c.project == project]
        now = self.now()
        return schema.list_page(mine, query, "container", lambda c: c.to_json(now))

    def get_container(self, project: str, container_id: str) -> dict[str, Any]:
        """A container, without counting as activity (pollers must not keep it alive)."""
        return self._find(project, container_id).to_json(self.now())

    def delete_container(self, project: str, container_id: str) -> dict[str, Any]:
        """Delete a container and its files."""
        self._find(project, container_id)
        del self._containers[container_id]
        return {"id": container_id, "object": "container.deleted", "deleted": True}

    def create_file(
        self, project: str, container_id: str, filename: str, content: bytes
    ) -> dict[str, Any]:
        """Add a file at ``/mnt/data/<filename>``."""
        container = self._activate(project, container_id)
        self._seq += 1
        name = filename.replace("\\", "/").rsplit("/", 1)[-1] or "upload"
        file = ContainerFile(
            id="cfile_" + secrets.token_hex(16), seq=self._seq, container_id=container_id,
            created_at=container.last_active_at, path="/mnt/data/" + name, content=content,
        )  # fmt: skip
        container.files[file.id] = file
        return file.to_json()

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
        now = self.now()
        status = container.status(now)
        if status != "running":
            raise ApiError(
                400,
                f"Container with id '{container_id}' is {status} and can no longer be used. "
                "Create a new container.",
                code=f"container_{status}",
            )
        container.last_active_at = now
        return container

    def _find_file(self, project: str, container_id: str, file_id: str) -> ContainerFile:
        file = self._activate(project, container_id).files.get(file_id)
        if file is None:
            raise ApiError(
                404, f"File with id '{file_id}' not found in container '{container_id}'."
            )
        return file
