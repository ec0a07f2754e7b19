"""Errors raise the SDK exceptions an app expects, and say what the upstream itself says."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI

from tests.conformance.support import (
    ANONYMOUS,
    KEY_A,
    KEY_B,
    REVOKED,
    Stack,
    cache_hit,
    error_of,
)

UNKNOWN = "cntr_" + "0" * 32
BOTH = ("openai", "bifrost")
Call = Callable[[AsyncOpenAI], Awaitable[Any]]


async def failure(call: Call, client: AsyncOpenAI) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        await call(client)
    return caught.value


# (case, key, call, exception, kinds in which the error must also say what the upstream says)
CASES: list[tuple[str, str, Call, type[openai.APIStatusError], tuple[str, ...]]] = [
    ("unknown container", KEY_A, lambda c: c.containers.retrieve(UNKNOWN),
     openai.NotFoundError, BOTH),
    ("unknown container, delete", KEY_A, lambda c: c.containers.delete(UNKNOWN),
     openai.NotFoundError, BOTH),
    ("unknown container, files", KEY_A, lambda c: c.containers.files.list(UNKNOWN),
     openai.NotFoundError, BOTH),
    ("revoked key, retrieve", REVOKED, lambda c: c.containers.retrieve(UNKNOWN),
     openai.AuthenticationError, BOTH),
    ("revoked key, list", REVOKED, lambda c: c.containers.list(),
     openai.AuthenticationError, BOTH),
    ("no credential, retrieve", KEY_A,
     lambda c: c.containers.retrieve(UNKNOWN, extra_headers=ANONYMOUS), openai.AuthenticationError,
     ("bifrost",)),
    ("no credential, create", KEY_A,
     lambda c: c.containers.create(name="x", extra_headers=ANONYMOUS), openai.AuthenticationError,
     ("bifrost",)),
    ("bad memory limit", KEY_A,
     lambda c: c.containers.create(name="x", memory_limit="2g"),  # type: ignore[arg-type]
     openai.BadRequestError, BOTH),
    ("bad list limit", KEY_A, lambda c: c.containers.list(limit=0),
     openai.BadRequestError, BOTH),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "key", "call", "expected", "relayed"), CASES, ids=[c[0] for c in CASES]
)
async def test_errors_are_the_upstreams(
    kind_stack: Stack,
    case: str,
    key: str,
    call: Call,
    expected: type[openai.APIStatusError],
    relayed: tuple[str, ...],
) -> None:
    through = await failure(call, kind_stack.sdk(key))
    direct = await failure(call, kind_stack.direct(key))
    assert isinstance(through, expected)
    assert through.status_code == direct.status_code
    if kind_stack.kind in relayed:
        # The upstream's own error, word for word. In openai mode the sidecar may refuse a
        # request without a credential itself: same exception and status, its own words.
        assert error_of(through) == error_of(direct)


async def test_an_unknown_container_stays_not_found_and_the_404_is_cached(
    kind_stack: Stack,
) -> None:
    client = kind_stack.sdk()
    for expect_hit in (False, True):
        error = await failure(lambda c: c.containers.with_raw_response.retrieve(UNKNOWN), client)
        assert isinstance(error, openai.NotFoundError)
        assert error.response.json()["extra_fields"]["cache_debug"]["cache_hit"] is expect_hit


async def test_a_cached_container_is_not_shown_to_other_projects_or_revoked_keys(
    kind_stack: Stack,
) -> None:
    container = await kind_stack.sdk().containers.create(name="private")
    raw = await kind_stack.sdk().containers.with_raw_response.retrieve(container.id)
    assert cache_hit(raw) is True

    with pytest.raises(openai.NotFoundError):
        await kind_stack.sdk(KEY_B).containers.retrieve(container.id)
    with pytest.raises(openai.AuthenticationError):
        await kind_stack.sdk(REVOKED).containers.retrieve(container.id)
    kind_stack.emulator.state.revoke_key(KEY_A)
    with pytest.raises(openai.AuthenticationError):
        await kind_stack.sdk().containers.retrieve(
            container.id, extra_headers={"Cache-Control": "no-cache"}
        )


async def test_a_failing_upstream_raises_the_sdks_server_error(kind_stack: Stack) -> None:
    kind_stack.emulator.state.add_fault("status", status=503, route="retrieve")
    container = await kind_stack.sdk().containers.create(name="unlucky")
    cid = (await kind_stack.emulator.create(KEY_A, name="never-seen"))["id"]

    with pytest.raises(openai.InternalServerError) as caught:
        await kind_stack.sdk().containers.retrieve(cid)
    assert caught.value.status_code == 503
    # What the cache holds still answers (the create seeded it).
    assert (await kind_stack.sdk().containers.retrieve(container.id)).id == container.id
