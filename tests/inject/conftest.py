"""The injector on a free port, with the template the manifests mount."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from sidecar.inject import Template
from sidecar.webhook import create_injector_app
from tests.conftest import start_app, stop_app
from tests.inject.support import IMAGE, TEMPLATE_FILE, Injector


@pytest.fixture
def template() -> Template:
    return Template.load(TEMPLATE_FILE, image=IMAGE)


@pytest.fixture
async def injector(template: Template, http: aiohttp.ClientSession) -> AsyncIterator[Injector]:
    running = await start_app(create_injector_app(template))
    yield Injector(running, http)
    await stop_app(running)
