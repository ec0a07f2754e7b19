"""What a caller asks of the cache: ``Cache-Control`` (RFC 9111) and the gateway's own headers.

Bad values get a 400 naming the header; nothing is silently ignored except ``x-bf-cache-key``
(the gateway's key for prompt caching: a container lookup's key is its id).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import msgspec

from sidecar.errors import InvalidParameter
from sidecar.policy import Freshness, State

__all__ = ["Rules", "parse_rules"]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
_DELTA = re.compile(r"^\d{1,10}$")
_CACHE_TYPES = ("direct", "semantic")


class Rules(msgspec.Struct, frozen=True, gc=False):
    """One request's cache rules."""

    threshold: float = 0.0
    """Lowest freshness (``cache_debug.similarity``) accepted."""
    no_cache: bool = False
    """Revalidate with the upstream before answering."""
    no_store: bool = False
    """Do not write the upstream's answer to the cache."""
    only_if_cached: bool = False
    """Never call the upstream: 504 when nothing usable is cached."""
    max_age_s: float | None = None
    """Oldest data accepted (``max-age``, ``x-bf-cache-ttl``)."""
    max_stale_s: float | None = None
    """Staleness accepted past freshness (``max-stale``; ``inf`` when given without a value)."""
    min_fresh_s: float | None = None
    """Freshness that must be left (``min-fresh``)."""

    def admits(self, freshness: Freshness) -> bool:
        """Whether a record this fresh may answer the request."""
        if freshness.similarity < self.threshold:
            return False
        if self.max_age_s is not None and freshness.age_s > self.max_age_s:
            return False
        if self.min_fresh_s is not None and freshness.ttl_s < self.min_fresh_s:
            return False
        return not (
            freshness.state is not State.FRESH
            and self.max_stale_s is not None
            and -freshness.ttl_s > self.max_stale_s
        )


def _bad(header: str, message: str) -> InvalidParameter:
    return InvalidParameter(f"{header}: {message}", param=header)


def _cache_control(value: str, rules: dict[str, object]) -> None:
    for raw in value.split(","):
        directive = raw.strip()
        if not directive:
            continue
        name, _, argument = directive.partition("=")
        name, argument = name.strip().lower(), argument.strip().strip('"')
        if name in ("no-cache", "no-store", "only-if-cached"):
            rules[name.replace("-", "_")] = True
        elif name in ("max-age", "min-fresh"):
            if not _DELTA.match(argument):
                raise _bad("cache-control", f"{name} needs a number of seconds, got {directive!r}")
            rules[name.replace("-", "_") + "_s"] = float(argument)
        elif name == "max-stale":
            if argument and not _DELTA.match(argument):
                raise _bad(
                    "cache-control", f"max-stale takes a number of seconds, got {directive!r}"
                )
            rules["max_stale_s"] = float(argument) if argument else math.inf
        elif name in ("no-transform", "stale-if-error", "stale-while-revalidate"):
            continue  # response or transformation directives: nothing to do here
        else:
            raise _bad("cache-control", f"unsupported directive {directive[:40]!r}")


def parse_duration(value: str, header: str) -> float:
    """``30s``, ``5m``, ``1h``, ``250ms`` or plain seconds, greater than zero."""
    match = _DURATION.match(value.strip().lower())
    seconds = float(match.group(1)) * _UNITS[match.group(2)] if match else 0.0
    if seconds <= 0:
        raise _bad(
            header, f"expected a duration like 30s or 5m, or seconds > 0, got {value[:40]!r}"
        )
    return seconds


def parse_rules(headers: Mapping[str, str], default_threshold: float) -> Rules:
    """The rules of a request's headers; raises InvalidParameter for a bad value."""
    fields: dict[str, object] = {"threshold": default_threshold}
    if (value := headers.get("cache-control")) is not None:
        _cache_control(value, fields)
    if (value := headers.get("pragma")) is not None and value.strip().lower() == "no-cache":
        fields.setdefault("no_cache", True)
    if (value := headers.get("x-bf-cache-threshold")) is not None:
        try:
            threshold = float(value)
        except ValueError:
            threshold = math.nan
        if math.isnan(threshold):
            raise _bad(
                "x-bf-cache-threshold", f"expected a number between 0 and 1, got {value[:32]!r}"
            )
        fields["threshold"] = min(1.0, max(0.0, threshold))
    if (value := headers.get("x-bf-cache-ttl")) is not None:
        ttl = parse_duration(value, "x-bf-cache-ttl")
        current = fields.get("max_age_s")
        fields["max_age_s"] = ttl if not isinstance(current, float) else min(current, ttl)
    if (value := headers.get("x-bf-cache-no-store")) is not None:
        if value not in ("true", "false"):
            raise _bad("x-bf-cache-no-store", f"expected 'true' or 'false', got {value[:32]!r}")
        if value == "true":
            fields["no_store"] = True
    if (value := headers.get("x-bf-cache-type")) is not None and value.lower() not in _CACHE_TYPES:
        raise _bad(
            "x-bf-cache-type",
            f"expected 'direct' (container lookups are exact; 'semantic' is served as direct), "
            f"got {value[:32]!r}",
        )
    return Rules(**fields)  # type: ignore[arg-type]
