"""The due set's packed scores: when an entry goes stale and when it was last read, in one set."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from sidecar.keys import KeySpace
from sidecar.policy import Policy
from sidecar.records import Record
from sidecar.settings import load_settings
from sidecar.store import (
    DUE_MARKS,
    READ_EPOCH_MS,
    Breaker,
    CacheStore,
    now_ms,
    read_by_ms,
    read_mark,
)

WRAP_MS = (DUE_MARKS - 1) * READ_EPOCH_MS


@given(
    read_at=st.integers(0, 4_000_000_000_000),
    later=st.integers(0, WRAP_MS - READ_EPOCH_MS),
)
def test_a_read_mark_says_when_the_read_was_within_one_epoch(read_at: int, later: int) -> None:
    read_by = read_by_ms(read_mark(read_at), read_at + later)
    assert read_by is not None
    assert read_at < read_by <= read_at + READ_EPOCH_MS


def test_no_mark_no_read() -> None:
    assert read_by_ms(0, now_ms()) is None


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[CacheStore]:
    client = aioredis.Redis.from_url(redis_url)
    store = CacheStore(client, KeySpace(f"t{uuid.uuid4().hex[:8]}"), Breaker(1.0))
    yield store
    await client.delete(store.keys.due)
    await store.close()
    await client.aclose()


async def _entry(store: CacheStore, name: str) -> tuple[int, int | None] | None:
    score = await store.redis.zscore(store.keys.due, name)
    if score is None:
        return None
    due_ms, mark = divmod(int(score), DUE_MARKS)
    return due_ms, read_by_ms(mark, now_ms())


async def test_every_writer_of_a_due_time_keeps_the_read_and_reads_keep_the_due_time(
    store: CacheStore,
) -> None:
    now = now_ms()
    # A worker's refresh of an entry never read (a stale read's job): read now, as far as known.
    await store.save_many([running("c1", now)], store_policy())
    due, read_by = await _entry(store, "openai/c1") or (0, None)
    assert due == now + 10_000
    assert read_by is not None
    assert now < read_by <= now + READ_EPOCH_MS + 1_000
    # A read noted later moves the mark, not the due time; an entry not indexed stays out.
    await store.redis.zadd(store.keys.due, {"openai/c1": (now + 10_000) * DUE_MARKS + 1})
    await store.mark_read(["openai/c1", "openai/absent"], read_by - 1)  # the same epoch
    assert await _entry(store, "openai/c1") == (now + 10_000, read_by)
    assert await _entry(store, "openai/absent") is None
    # Claims and refreshes change the due time and keep the mark.
    assert await store.claim_due([("openai/c1", now + 10_000)], now + 60_000) == ["openai/c1"]
    assert await store.claim_due([("openai/c1", now + 10_000)], now + 90_000) == []
    assert await _entry(store, "openai/c1") == (now + 60_000, read_by)
    assert not await store.claim_refresh("openai", "c1", now + 10_000, now + 70_000)
    assert await store.claim_refresh("openai", "c1", now + 60_000, now + 70_000)
    assert await _entry(store, "openai/c1") == (now + 70_000, read_by)
    await store.save_many([], store_policy(), {"openai/c1": now + 80_000})
    assert await _entry(store, "openai/c1") == (now + 80_000, read_by)


async def test_due_for_refresh_takes_read_entries_and_drops_stale_unread_ones(
    store: CacheStore,
) -> None:
    now = now_ms()
    long_ago = now - 600_000
    scores = {
        "openai/read-due": (now + 1_000) * DUE_MARKS + read_mark(now),
        "openai/read-later": (now + 120_000) * DUE_MARKS + read_mark(now),
        "openai/unread-stale": (now - 1_000) * DUE_MARKS + read_mark(long_ago),
        "openai/unread-fresh": (now + 1_000) * DUE_MARKS + read_mark(long_ago),
        "openai/never-read": (now - 1_000) * DUE_MARKS,
    }
    await store.redis.zadd(store.keys.due, scores)
    due = await store.due_for_refresh(now + 5_000, now - 120_000)
    assert due == [("openai", "read-due", now + 1_000)]
    left = {n.decode() for n in await store.redis.zrange(store.keys.due, 0, -1)}
    assert left == {"openai/read-due", "openai/read-later", "openai/unread-fresh"}


def running(container_id: str, fetched_at_ms: int) -> Record:
    """A running container's record as fetched at ``fetched_at_ms`` (due 10 s later)."""
    body = b'{"id":"%s","object":"container","status":"running"}' % container_id.encode()
    return Record(provider="openai", container_id=container_id, status_code=200, body=body,
                  fetched_at_ms=fetched_at_ms, status="running")  # fmt: skip


def store_policy() -> Policy:
    return Policy(load_settings({}, upstream_url="http://gateway"))


async def test_a_claim_given_back_after_a_delete_does_not_put_the_entry_back(
    store: CacheStore,
) -> None:
    now = now_ms()
    await store.save_many([running("gone", now)], store_policy())
    assert await store.claim_due([("openai/gone", now + 10_000)], now + 60_000) == ["openai/gone"]
    await store.delete("openai", "gone")
    await store.save_many([], store_policy(), {"openai/gone": now + 10_000})  # rescheduled
    assert await _entry(store, "openai/gone") is None


async def test_a_lapsed_claim_holds_nothing(store: CacheStore) -> None:
    # Found: after Redis resumed from a hang, claims taken during it (their refreshes never
    # happened) kept stale reads' refreshes refused as deduplicated until refresh-ahead planned
    # the entries again, half a minute later.
    now = now_ms()
    due = now - 5_000  # the record went stale 5 s ago
    await store.redis.zadd(store.keys.due, {"openai/c2": (now - 1) * DUE_MARKS + 1})  # lapsed
    assert await store.claim_refresh("openai", "c2", due, now + 30_000)
    # A live claim still holds.
    assert not await store.claim_refresh("openai", "c2", due, now + 30_000)
