"""Response headers that say what the cache did: ``Cache-Status`` (RFC 9211) and ``Age``."""

from __future__ import annotations

from sidecar.controls import Rules
from sidecar.outcomes import Outcome

__all__ = ["CACHE_NAME", "cache_headers"]

CACHE_NAME = "bifrost-sidecar"


def cache_headers(outcome: Outcome, *, rules: Rules | None = None) -> dict[str, str]:
    """``Cache-Status`` for every answer, ``Age`` for answers from the cache. Its one ``detail``
    (RFC 9211 2.8) holds ``stale-if-error`` and ``ignored:<header>,...`` (names, never values)."""
    kind, freshness = outcome.kind, outcome.freshness
    parts = [CACHE_NAME]
    if kind in ("miss", "stale_if_error"):
        parts.append("fwd=stale" if kind != "miss" else f"fwd={outcome.forward or 'uri-miss'}")
        if outcome.upstream_status is not None:
            parts.append(f"fwd-status={outcome.upstream_status}")
        if outcome.stored:
            parts.append("stored")
    else:
        parts.append("hit")
    if freshness is not None:
        parts.append(f"ttl={int(freshness.ttl_s // 1)}")
    if outcome.collapsed:
        parts.append("collapsed")
    if rules is not None and rules.ignored:
        detail = "ignored:" + ",".join(rules.ignored)
        if kind == "stale_if_error":
            detail = "stale-if-error " + detail
        parts.append(f'detail="{detail}"')
    elif kind == "stale_if_error":
        parts.append("detail=stale-if-error")
    headers = {"Cache-Status": "; ".join(parts)}
    if freshness is not None:
        headers["Age"] = str(int(freshness.age_s))
    return headers
