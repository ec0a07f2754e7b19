"""Containers through the sidecar, as the official SDK (and so an app) sees them."""

from __future__ import annotations

import openai
import pytest
from openai.types import ContainerCreateResponse, ContainerListResponse, ContainerRetrieveResponse

from emulator.schema import ListQuery
from tests.conformance.conftest import MakeStack
from tests.conformance.support import (
    KEY_A,
    KEY_A2,
    NO_CACHE,
    Stack,
    assert_matches,
    cache_hit,
    extra_fields,
    known,
    raw_policy,
)
from tests.conftest import RedisServer


async def test_create_then_retrieve_then_a_cached_retrieve(stack: Stack) -> None:
    client = stack.sdk()
    created = await client.containers.create(
        name="conformance",
        expires_after={"anchor": "last_active_at", "minutes": 5},
        memory_limit="4g",
        network_policy={"type": "allowlist", "allowed_domains": ["pypi.org"]},
    )
    assert isinstance(created, ContainerCreateResponse)
    held = stack.held(created.id)
    assert (held["name"], held["memory_limit"], held["status"]) == ("conformance", "4g", "running")
    assert held["expires_after"] == {"anchor": "last_active_at", "minutes": 5}
    assert_matches(created, held, stack.kind)

    retrieved = await client.containers.retrieve(created.id)
    assert isinstance(retrieved, ContainerRetrieveResponse)
    assert_matches(retrieved, stack.held(created.id), stack.kind)

    raw = await client.containers.with_raw_response.retrieve(created.id)
    assert raw.status_code == 200
    assert_matches(raw.parse(), stack.held(created.id), stack.kind)
    assert extra_fields(raw)["request_type"] == "container_retrieve"
    assert raw_policy(raw) == {"type": "allowlist", "allowed_domains": ["pypi.org"]}
    if stack.cache == "warm":
        assert cache_hit(raw) is True
        assert stack.emulator.retrieves(created.id) <= 1
    else:
        assert cache_hit(raw) is False
        assert stack.emulator.retrieves(created.id) == 2


async def test_a_container_made_elsewhere_is_a_miss_then_a_hit(stack: Stack) -> None:
    cid = (await stack.emulator.create(KEY_A, name="elsewhere"))["id"]
    client = stack.sdk(KEY_A2)  # the same project, another key

    first = await client.containers.with_raw_response.retrieve(cid)
    second = await client.containers.with_raw_response.retrieve(cid)
    assert cache_hit(first) is False
    assert cache_hit(second) is (stack.cache == "warm")
    for raw in (first, second):
        assert_matches(raw.parse(), stack.held(cid), stack.kind)
        assert extra_fields(raw)["provider"] == "openai"
        assert raw_policy(raw) == stack.held(cid)["network_policy"]


async def test_list_pages_filters_and_orders(stack: Stack) -> None:
    client = stack.sdk()
    made = [(await client.containers.create(name="batch")).id for _ in range(3)]
    await client.containers.create(name="other")

    page = await client.containers.list(limit=2, name="batch")
    assert [c.id for c in page.data] == made[:0:-1]
    assert page.has_more is True
    assert all(isinstance(c, ContainerListResponse) for c in page.data)
    # The SDK follows the cursor (``after``) through the sidecar.
    assert [c.id async for c in client.containers.list(limit=2, name="batch")] == made[::-1]
    assert [c.id async for c in client.containers.list(order="asc", name="batch")] == made
    everything = [c async for c in client.containers.list(limit=100)]
    expected = stack.emulator.state.list_containers(stack.project(), ListQuery(limit=100))
    assert [c.id for c in everything] == [c["id"] for c in expected["data"]]
    for container in everything:
        assert_matches(container, stack.held(container.id), stack.kind)


async def test_a_retrieve_after_delete_is_not_found(stack: Stack) -> None:
    client = stack.sdk()
    container = await client.containers.create(name="doomed")
    await client.containers.retrieve(container.id)  # cached
    await client.containers.retrieve(container.id)

    await client.containers.delete(container.id)
    for _ in range(2):
        with pytest.raises(openai.NotFoundError):
            await client.containers.retrieve(container.id)
    assert container.id not in [c.id async for c in client.containers.list()]
    with pytest.raises(openai.NotFoundError):
        await client.containers.delete(container.id)


async def test_a_container_deleted_behind_the_sidecars_back_is_gone_on_revalidation(
    stack: Stack,
) -> None:
    client = stack.sdk()
    container = await client.containers.create(name="elsewhere-deleted")
    await client.containers.retrieve(container.id)
    await stack.direct().containers.delete(container.id)

    with pytest.raises(openai.NotFoundError):
        await client.containers.retrieve(container.id, extra_headers=NO_CACHE)


async def test_expiry_reaches_the_app(stack: Stack) -> None:
    client = stack.sdk()
    container = await client.containers.create(
        name="short", expires_after={"anchor": "last_active_at", "minutes": 1}
    )
    assert (await client.containers.retrieve(container.id)).status == "running"
    stack.emulator.state.advance_clock(61)

    expired = await client.containers.retrieve(container.id, extra_headers=NO_CACHE)
    assert expired.status == "expired"
    assert_matches(expired, stack.held(container.id), stack.kind)
    again = await client.containers.with_raw_response.retrieve(container.id)
    assert again.parse().status == "expired"
    assert cache_hit(again) is (stack.cache == "warm")


async def test_retrieving_through_the_sidecar_is_activity_upstream(stack: Stack) -> None:
    client = stack.sdk()
    container = await client.containers.create(name="kept")
    born = stack.held(container.id)["last_active_at"]
    stack.emulator.state.advance_clock(30)

    seen = await client.containers.retrieve(container.id, extra_headers=NO_CACHE)
    assert seen.last_active_at == born + 30 == stack.held(container.id)["last_active_at"]


@pytest.mark.parametrize("kind", ["openai", "bifrost"])
async def test_a_cold_cache_answers_the_same(
    kind: str, make_stack: MakeStack, redis_server: RedisServer
) -> None:
    warm = await make_stack(kind)
    container = await warm.sdk().containers.create(name="cold")
    hot = await warm.sdk().containers.with_raw_response.retrieve(container.id)
    assert cache_hit(hot) is True

    redis_server.client().flushall()
    cold = await make_stack(kind)  # a new replica: no copies of its own either
    client = cold.sdk()
    first = await client.containers.with_raw_response.retrieve(container.id)
    second = await client.containers.with_raw_response.retrieve(container.id)
    assert (cache_hit(first), cache_hit(second)) == (False, True)
    assert known(first.parse()) == known(second.parse())
    assert_matches(first.parse(), cold.held(container.id), cold.kind)


async def test_openai_kind_is_a_drop_in_for_the_v1_base_url(make_stack: MakeStack) -> None:
    """An app that used ``https://api.openai.com/v1`` points the SDK at the sidecar's ``/v1``."""
    stack = await make_stack("openai")
    client = stack.sdk(base_url=f"{stack.sidecar.url}/v1")
    container = await client.containers.create(name="v1")

    raw = await client.containers.with_raw_response.retrieve(container.id)
    assert raw.status_code == 200
    assert_matches(raw.parse(), stack.held(container.id), "openai")
    assert cache_hit(await client.containers.with_raw_response.retrieve(container.id)) is True
    assert [c.id async for c in client.containers.list()] == [container.id]
