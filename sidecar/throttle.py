"""A provider's 429 back-off, shared through Redis so that every process obeys it."""

from __future__ import annotations

import contextlib
import email.utils
import time

from sidecar.errors import StoreUnavailable
from sidecar.flight import remember
from sidecar.store import CacheStore

__all__ = ["Throttle", "retry_after_ms"]


def retry_after_ms(value: str | None, default_s: float, max_s: float) -> int:
    """Milliseconds to wait for a ``Retry-After`` value (RFC 9110 10.2.3: ``1*DIGIT`` or an
    HTTP-date, not ``inf`` or ``1e300``), at most ``max_s``; ``default_s`` if unreadable."""
    wait_s = default_s
    text = value.strip() if value else ""
    if text.isascii() and text.isdigit():
        digits = text.lstrip("0") or "0"
        wait_s = max_s if len(digits) > 9 else float(digits)
    elif 0 < len(text) <= 64:  # an HTTP-date is 29 characters
        try:
            when = email.utils.parsedate_to_datetime(text)
            wait_s = when.timestamp() - time.time()
        except (TypeError, ValueError, IndexError, OverflowError):
            pass
    return int(min(max(wait_s, 0.0), max_s) * 1000)


_MAX_PROVIDERS = 256


class Throttle:
    """Whether refreshes from a provider must wait; Redis is asked at most every 250 ms. At most
    256 providers are remembered (names come from clients), those not backing off go first."""

    def __init__(
        self, store: CacheStore, default_s: float, max_s: float, recheck_s: float = 0.25
    ) -> None:
        self._store = store
        self._default_s = default_s
        self._max_s = max_s
        self._recheck_s = recheck_s
        self._known: dict[str, tuple[float, float]] = {}  # provider -> (until, checked_at)

    async def active(self, provider: str) -> bool:
        """True while the provider's back-off runs."""
        now = time.monotonic()
        until, checked_at = self._known.get(provider, (0.0, -1e9))
        if until > now:
            return True
        if now - checked_at < self._recheck_s:
            return False
        try:
            left_ms = await self._store.backoff_left_ms(provider)
        except StoreUnavailable:
            left_ms = 0
        self._remember(provider, (now + left_ms / 1000, now))
        return left_ms > 0

    def _remember(self, provider: str, state: tuple[float, float]) -> None:
        remember(self._known, provider, state, _MAX_PROVIDERS, _over)

    def left_ms(self, provider: str) -> int:
        """Milliseconds left of the provider's back-off as this process last heard of it."""
        until, _ = self._known.get(provider, (0.0, 0.0))
        return max(0, int((until - time.monotonic()) * 1000))

    def remaining(self) -> dict[str, float]:
        """Seconds left of each back-off this process knows of."""
        now = time.monotonic()
        return {provider: max(0.0, until - now) for provider, (until, _) in self._known.items()}

    async def obey(self, provider: str, retry_after: str | None) -> float:
        """Start a back-off after a 429; returns its length in seconds."""
        wait_ms = retry_after_ms(retry_after, self._default_s, self._max_s)
        self._remember(provider, (time.monotonic() + wait_ms / 1000, time.monotonic()))
        with contextlib.suppress(StoreUnavailable):
            await self._store.set_backoff(provider, wait_ms)
        return wait_ms / 1000


def _over(state: tuple[float, float]) -> bool:
    return state[0] <= time.monotonic()
