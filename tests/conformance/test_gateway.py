"""In front of the gateway: its own ``extra_fields`` survive, its providers and keys rule."""

from __future__ import annotations

from collections.abc import AsyncIterator

import openai
import pytest

from emulator import EmulatorConfig, create_emulator_app
from tests.conformance.conftest import MakeStack
from tests.conformance.support import (
    ANONYMOUS,
    CUSTOM,
    KEY_A,
    Stack,
    assert_matches,
    cache_hit,
    error_of,
    extra_fields,
)
from tests.conftest import Emulator, start_app


async def test_the_gateways_extra_fields_survive_a_miss_and_a_hit(bifrost: Stack) -> None:
    policy = {"type": "allowlist", "allowed_domains": ["pypi.org"]}
    cid = (await bifrost.emulator.create(KEY_A, name="raw", network_policy=policy))["id"]
    client = bifrost.sdk()
    direct = extra_fields(await bifrost.direct().containers.with_raw_response.retrieve(cid))

    for expect_hit in (False, True):
        raw = await client.containers.with_raw_response.retrieve(cid)
        extra = extra_fields(raw)
        assert cache_hit(raw) is expect_hit
        # The provider's own JSON, network_policy included, as the gateway sent it.
        assert extra["raw_response"] == bifrost.held(cid)
        assert extra["raw_response"]["network_policy"]["allowed_domains"] == ["pypi.org"]
        # Fields newer gateways add, which the sidecar knows nothing about, are kept.
        assert extra["routing_info"] == direct["routing_info"] == {"provider": "openai"}
        assert isinstance(extra["upstream_latency"], int)
        assert (extra["request_type"], extra["provider"]) == ("container_retrieve", "openai")
        assert raw.parse().network_policy is None  # the gateway drops it outside raw_response


async def test_a_retrieve_seeded_by_a_create_or_a_list_is_a_retrieve(bifrost: Stack) -> None:
    client = bifrost.sdk()
    created = (await client.containers.create(name="seeded")).id
    listed = (await bifrost.emulator.create(KEY_A, name="listed"))["id"]
    await client.containers.list()

    for cid in (created, listed):
        raw = await client.containers.with_raw_response.retrieve(cid)
        extra = extra_fields(raw)
        assert cache_hit(raw) is True
        assert_matches(raw.parse(), bifrost.held(cid), "bifrost")
        # Not the create's or the list's extra_fields: the gateway's answer to a retrieve.
        assert (extra["request_type"], extra["provider"]) == ("container_retrieve", "openai")
        assert extra["raw_response"] == bifrost.held(cid)


@pytest.mark.parametrize("cached", [True, False], ids=["declared", "undeclared"])
async def test_a_custom_provider_works_like_openai(make_stack: MakeStack, cached: bool) -> None:
    settings = {"container_providers": frozenset({"openai", "azure", CUSTOM})} if cached else {}
    stack = await make_stack("bifrost", **settings)
    client = stack.sdk(default_query={"provider": CUSTOM})

    container = await client.containers.create(name="eu")
    first = await client.containers.with_raw_response.retrieve(container.id)
    second = await client.containers.with_raw_response.retrieve(container.id)
    for raw in (first, second):
        assert_matches(raw.parse(), stack.held(container.id), "bifrost")
        assert extra_fields(raw)["provider"] == CUSTOM
    if cached:
        assert cache_hit(second) is True
    assert [c.id async for c in client.containers.list()] == [container.id]
    uploaded = await client.containers.files.create(container.id, file=("a.txt", b"a"))
    content = await client.containers.files.content.retrieve(uploaded.id, container_id=container.id)
    assert content.read() == b"a"
    await client.containers.delete(container.id)
    with pytest.raises(openai.NotFoundError):
        await client.containers.retrieve(container.id)


@pytest.mark.parametrize(
    ("provider", "expected"),
    [("anthropic", openai.BadRequestError), ("groq", openai.BadRequestError),
     ("my-mistral-eu", openai.BadRequestError), ("nope", openai.BadRequestError)],
)  # fmt: skip
async def test_providers_the_gateway_refuses(
    bifrost: Stack, provider: str, expected: type[openai.APIStatusError]
) -> None:
    cid = (await bifrost.emulator.create(KEY_A))["id"]
    errors = []
    for client in (bifrost.sdk(default_query={"provider": provider}),
                   bifrost.direct(default_query={"provider": provider})):  # fmt: skip
        with pytest.raises(expected) as caught:
            await client.containers.retrieve(cid)
        errors.append(error_of(caught.value))
    assert errors[0] == errors[1]


@pytest.fixture
async def open_gateway() -> AsyncIterator[Emulator]:
    """A gateway whose virtual keys are optional, serving anonymous callers with its own key."""
    config = EmulatorConfig(
        projects=((KEY_A, "sk-gateway-own-0001"),),
        virtual_keys="optional",
        gateway_key="sk-gateway-own-0001",
    )
    running = await start_app(create_emulator_app(config))
    yield Emulator(running.url, running.app, running.runner)
    await running.runner.cleanup()


async def test_without_a_credential_when_virtual_keys_are_optional(
    make_stack: MakeStack, open_gateway: Emulator
) -> None:
    open_gateway.state.freeze_clock()
    stack = await make_stack("bifrost", upstream=open_gateway)
    client = stack.sdk()

    container = await client.containers.create(name="anonymous", extra_headers=ANONYMOUS)
    for _ in range(2):
        seen = await client.containers.retrieve(container.id, extra_headers=ANONYMOUS)
        assert_matches(seen, stack.held(container.id), "bifrost")
    listed = await client.containers.list(extra_headers=ANONYMOUS)
    assert [c.id for c in listed.data] == [container.id]
    # The gateway's key belongs to KEY_A's project: the same container, with a credential.
    assert (await client.containers.retrieve(container.id)).id == container.id
    await client.containers.delete(container.id, extra_headers=ANONYMOUS)
    with pytest.raises(openai.NotFoundError):
        await client.containers.retrieve(container.id, extra_headers=ANONYMOUS)


async def test_without_a_credential_when_virtual_keys_are_required(bifrost: Stack) -> None:
    cid = (await bifrost.emulator.create(KEY_A))["id"]
    errors = []
    for client in (bifrost.sdk(), bifrost.direct()):
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.containers.retrieve(cid, extra_headers=ANONYMOUS)
        errors.append(caught.value)
    assert error_of(errors[0]) == error_of(errors[1])
    assert errors[0].response.json()["type"] == "virtual_key_required"
