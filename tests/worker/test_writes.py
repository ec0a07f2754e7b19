"""Claims rescheduled while Redis is away are rescheduled once it is back."""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar.errors import StoreUnavailable
from worker import writes
from worker.writes import WriteBehind


class _FlakyStore:
    """A store whose writes fail while ``down`` is set; it keeps what it was asked to write."""

    def __init__(self) -> None:
        self.down = True
        self.given_back: dict[str, int] = {}
        self.written = asyncio.Event()

    async def save_many(
        self, records: list[Any], policy: Any, due: dict[str, int], failing: set[str]
    ) -> None:
        if self.down:
            raise StoreUnavailable("redis is hung")
        self.given_back.update(due)
        self.written.set()


async def test_a_claim_given_back_during_an_outage_is_given_back_when_redis_returns(
    monkeypatch: Any,
) -> None:
    monkeypatch.setattr(writes, "_RETRY_S", 0.01)
    store = _FlakyStore()
    behind = WriteBehind(store, policy=None, delay_s=0)  # type: ignore[arg-type]
    assert await behind.reschedule("openai", "cntr_hot", 1_000) is False
    store.down = False
    await asyncio.wait_for(store.written.wait(), 5)
    assert store.given_back == {"openai/cntr_hot": 1_000}
    await behind.close()
