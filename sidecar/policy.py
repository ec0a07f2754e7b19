"""Freshness: when a record is fresh, servable stale, servable only on upstream errors, or dead.

    fetched ── fresh ──▶ fresh_until ── stale (max_stale_s) ──▶ ── if-error (stale_if_error_s) ──▶
               similarity 1.0           similarity 1.0 → 0           similarity 0

The fresh window never runs past the container's predicted expiry; terminal containers stay fresh
for ``terminal_ttl_s``; negative entries are fresh for ``negative_ttl_s`` and never served stale.
"""

from __future__ import annotations

import enum

import msgspec

from sidecar.records import Record
from sidecar.settings import Settings

__all__ = ["Freshness", "Policy", "State"]


class State(enum.Enum):
    """How a record may be used."""

    FRESH = "fresh"
    STALE = "stale"
    """Servable at once while a refresh runs."""
    STALE_IF_ERROR = "stale-if-error"
    """Servable only when the upstream fails."""
    DEAD = "dead"


class Freshness(msgspec.Struct, frozen=True, gc=False):
    """A record's freshness at one instant."""

    state: State
    similarity: float
    """1.0 while fresh, falling linearly to 0 over the stale window."""
    ttl_s: float
    """Seconds of freshness left; negative once stale (RFC 9211 ``ttl``)."""
    age_s: float
    """Seconds since the upstream answered (RFC 9111 ``Age``)."""


class Policy:
    """The freshness and back-off rules, from the settings."""

    def __init__(self, settings: Settings) -> None:
        self._fresh_ms = int(settings.fresh_ttl_s * 1000)
        self._terminal_ms = int(settings.terminal_ttl_s * 1000)
        self._negative_ms = int(settings.negative_ttl_s * 1000)
        self._stale_ms = int(settings.max_stale_s * 1000)
        self._if_error_ms = int(settings.stale_if_error_s * 1000)
        self._backoff_ms = int(settings.error_backoff_s * 1000)
        self._backoff_max_ms = int(settings.error_backoff_max_s * 1000)

    def backoff(self, floor_ms: int = 0) -> tuple[int, int, int]:
        """The upstream back-off's ``(base, cap, keep)`` in ms (``_FAILED`` in the store reads
        them): at least ``floor_ms`` (a Retry-After); the failure count is kept as long as a
        stale-if-error copy may serve."""
        base, cap = max(self._backoff_ms, floor_ms), max(self._backoff_max_ms, floor_ms)
        return base, cap, self._if_error_ms

    def backoff_ms(self, failures: int, floor_ms: int = 0) -> int:
        """The back-off after ``failures`` in a row: doubling from base to cap."""
        base, cap, _ = self.backoff(floor_ms)
        return min(cap, base << min(failures - 1, 32))

    def fresh_until_ms(self, record: Record) -> int:
        """When ``record`` stops being fresh (unix ms)."""
        fetched = record.fetched_at_ms
        if record.negative:
            return fetched + self._negative_ms
        if record.terminal:
            return fetched + self._terminal_ms
        until = fetched + self._fresh_ms
        expires_ms = record.expires_at * 1000
        # A prediction already in the past was wrong (the upstream still says running): ignore it.
        if expires_ms > fetched:
            until = min(until, expires_ms)
        return until

    def assess(self, record: Record, now_ms: int, fresh_until: int | None = None) -> Freshness:
        """The record's freshness at ``now_ms`` (``fresh_until``: its end, if already known)."""
        if fresh_until is None:
            fresh_until = self.fresh_until_ms(record)
        age_s = max(0, now_ms - record.fetched_at_ms) / 1000
        ttl_s = (fresh_until - now_ms) / 1000
        if now_ms < fresh_until:
            return Freshness(State.FRESH, 1.0, ttl_s, age_s)
        stale_for = now_ms - fresh_until
        if record.negative:
            return Freshness(State.DEAD, 0.0, ttl_s, age_s)
        if stale_for < self._stale_ms:
            similarity = round(1.0 - stale_for / self._stale_ms, 4)
            return Freshness(State.STALE, similarity, ttl_s, age_s)
        if stale_for < self._stale_ms + self._if_error_ms:
            return Freshness(State.STALE_IF_ERROR, 0.0, ttl_s, age_s)
        return Freshness(State.DEAD, 0.0, ttl_s, age_s)

    def due_ms(self, record: Record) -> int | None:
        """When refresh-ahead should renew ``record``; None when it is never polled."""
        if record.negative or record.terminal:
            return None
        return self.fresh_until_ms(record)

    def retention_ms(self, record: Record) -> int:
        """How long Redis keeps ``record``: as long as any window may still serve it."""
        fresh_ms = self.fresh_until_ms(record) - record.fetched_at_ms
        if record.negative:
            return max(fresh_ms, 1)
        return max(fresh_ms, 1) + self._stale_ms + self._if_error_ms
