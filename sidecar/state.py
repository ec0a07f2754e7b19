"""Typed application state shared by the handlers (``web.AppKey``s, no singletons)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from aiohttp import web

from sidecar.credentials import CredentialReader
from sidecar.logs import Every
from sidecar.metrics import Metrics
from sidecar.service import ContainerService
from sidecar.settings import Settings
from sidecar.stats import FleetStats
from sidecar.store import CacheStore
from sidecar.upstream import Upstream

__all__ = ["DRAINING", "SERVICES", "Services"]


@dataclass(frozen=True, slots=True)
class Services:
    """What the handlers use, built once per application by ``create_app``."""

    settings: Settings
    credentials: CredentialReader
    store: CacheStore
    service: ContainerService
    upstream: Upstream
    metrics: Metrics
    stats: FleetStats
    warnings: Every = field(default_factory=lambda: Every(5.0))
    """One warning per kind of upstream failure this often (each request keeps its access line)."""


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)
DRAINING: web.AppKey[asyncio.Event] = web.AppKey("draining", asyncio.Event)
"""Set on SIGTERM: in-flight requests finish while readiness fails."""
