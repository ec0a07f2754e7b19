"""Typed application state shared by the handlers (``web.AppKey``s, no singletons)."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from sidecar.credentials import CredentialReader
from sidecar.service import ContainerService
from sidecar.settings import Settings
from sidecar.store import CacheStore

__all__ = ["SERVICES", "Services"]


@dataclass(frozen=True, slots=True)
class Services:
    """What the handlers use, built once per application by ``create_app``."""

    settings: Settings
    credentials: CredentialReader
    store: CacheStore
    service: ContainerService


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)
