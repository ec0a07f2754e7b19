"""Every request header that matters: what the gateway does with it, what the sidecar does.

The one source of the table in docs/headers.md and of the conformance test that checks it
(tests/conformance/test_headers.py): the test fails when docs/headers.md differs from what this
module renders. After changing a row: ``.venv/bin/python -m tests.conformance.header_table --write``.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "headers.md"
BEGIN = "<!-- header-table: begin (generated: python -m tests.conformance.header_table --write) -->"
END = "<!-- header-table: end -->"

CTX = "ctx.go `ConvertToBifrostContext`"  # transports/bifrost-http/lib/ctx.go
PLUGIN = "semanticcache main.go"  # plugins/semanticcache/main.go
NO_CONTAINERS = "no effect on containers"


@dataclass(frozen=True)
class Row:
    """One request: its header lines, what each side does, and the rules the sidecar reads."""

    lines: tuple[tuple[str, str], ...]
    gateway: str
    sidecar: str
    source: str
    rules: dict[str, object] | None = field(default_factory=dict)
    """The ``Rules`` fields that differ from the defaults; None: not a cache control (its
    forwarding is checked by the proxy and tenancy tests), and ``parse_rules`` leaves it alone."""


@dataclass(frozen=True)
class Section:
    title: str
    intro: str
    rows: tuple[Row, ...]


def _cc(value: str) -> tuple[tuple[str, str], ...]:
    return (("Cache-Control", value),)


def _h(name: str, value: str) -> tuple[tuple[str, str], ...]:
    return ((name, value),)


IGNORED_CC: dict[str, object] = {"ignored": ("cache-control",)}
TTL_IGNORED: dict[str, object] = {"ignored": ("x-bf-cache-ttl",)}
THRESHOLD_IGNORED: dict[str, object] = {"ignored": ("x-bf-cache-threshold",)}
NOT_READ = "no effect"

SECTIONS = (
    Section(
        "Cache-Control (RFC 9111)",
        "The gateway caches no container request: its semantic cache skips them "
        "(plugins/semanticcache/utils.go `isSemanticCacheSupportedRequestType`), so through it "
        "every retrieve goes to the provider whatever `Cache-Control` says (\"no effect\" "
        "below). The sidecar follows "
        "RFC 9111 section 5.2.1; it ignores a directive it does not understand (5.2: a cache "
        "MUST), never refuses one.",
        (
            Row(_cc("no-cache"), NOT_READ, "revalidates with the upstream before answering",
                "RFC 9111 5.2.1.4", {"no_cache": True}),
            Row(_cc("no-store"), NOT_READ, "does not store the upstream's answer",
                "RFC 9111 5.2.1.5", {"no_store": True}),
            Row(_cc("no-cache, no-store, must-revalidate"), NOT_READ,
                "revalidates, does not store; `must-revalidate` is a response directive: ignored",
                "RFC 9111 5.2, 5.2.2.2", {"no_cache": True, "no_store": True, **IGNORED_CC}),
            Row(_cc("max-age=0, private"), NOT_READ,
                "accepts nothing older than 0 s (revalidates); `private` (a response directive) "
                "ignored", "RFC 9111 5.2.1.1, 5.2", {"max_age_s": 0.0, **IGNORED_CC}),
            Row(_cc("max-age=60"), NOT_READ, "accepts cached data at most 60 s old",
                "RFC 9111 5.2.1.1", {"max_age_s": 60.0}),
            Row(_cc('max-age="60"'), NOT_READ, "the same: the quoted form is accepted too",
                "RFC 9111 5.2", {"max_age_s": 60.0}),
            Row(_cc("MAX-AGE=60"), NOT_READ, "the same: directive names are case-insensitive",
                "RFC 9111 5.2", {"max_age_s": 60.0}),
            Row(_cc("max-age=99999999999999999999"), NOT_READ,
                "a delta-seconds too large is 2^31 (68 years)", "RFC 9111 1.2.2",
                {"max_age_s": 2147483648.0}),
            Row(_cc("max-age=soon"), NOT_READ,
                "a malformed limit is read as the strictest, `max-age=0`: revalidates (the "
                "answer the gateway would give); reported", "RFC 9111 4.2.1",
                {"max_age_s": 0.0, **IGNORED_CC}),
            Row(_cc("max-age"), NOT_READ, "the same (the value is missing)", "RFC 9111 4.2.1",
                {"max_age_s": 0.0, **IGNORED_CC}),
            Row(_cc("max-age=-1"), NOT_READ, "the same (delta-seconds are digits only)",
                "RFC 9111 1.2.2, 4.2.1", {"max_age_s": 0.0, **IGNORED_CC}),
            Row(_cc("max-age=60, max-age=10"), NOT_READ,
                "of repeated limits, the most restrictive", "RFC 9111 4.2.1",
                {"max_age_s": 10.0}),
            Row(_cc("max-stale"), NOT_READ, "accepts stale data, however stale",
                "RFC 9111 5.2.1.2", {"max_stale_s": math.inf}),
            Row(_cc("max-stale=30"), NOT_READ, "accepts data up to 30 s past freshness",
                "RFC 9111 5.2.1.2", {"max_stale_s": 30.0}),
            Row(_cc("max-stale=-1"), NOT_READ,
                "a malformed `max-stale` could only loosen the rules: ignored, reported",
                "RFC 9111 5.2", IGNORED_CC),
            Row(_cc("min-fresh=60"), NOT_READ, "accepts only data fresh for 60 s more",
                "RFC 9111 5.2.1.3", {"min_fresh_s": 60.0}),
            Row(_cc("min-fresh=soon"), NOT_READ,
                "read as the strictest (2^31 s): nothing cached qualifies; reported",
                "RFC 9111 4.2.1", {"min_fresh_s": 2147483648.0, **IGNORED_CC}),
            Row(_cc("only-if-cached"), NOT_READ,
                "never calls the upstream: 504 in the gateway's shape when nothing usable is "
                "cached", "RFC 9111 5.2.1.7", {"only_if_cached": True}),
            Row(_cc("no-transform"), NOT_READ,
                "nothing to do: the sidecar transforms no content", "RFC 9111 5.2.1.6"),
            Row(_cc('no-cache="x"'), NOT_READ,
                "revalidates; the argument (`no-cache` takes none in requests) ignored",
                "RFC 9111 5.2.1.4", {"no_cache": True, **IGNORED_CC}),
            Row(_cc("stale-if-error=60"), NOT_READ,
                "ignored: the sidecar's own stale-if-error window applies", "RFC 5861 4, "
                "RFC 9111 5.2", IGNORED_CC),
            Row(_cc("bogus-directive, max-age=5"), NOT_READ,
                "unknown directive ignored, the rest applies", "RFC 9111 5.2",
                {"max_age_s": 5.0, **IGNORED_CC}),
            Row(_cc('ext="a, max-age=0", max-age=5'), NOT_READ,
                "a comma inside a quoted string does not split the list",
                "RFC 9110 5.6.1, 5.6.4", {"max_age_s": 5.0, **IGNORED_CC}),
            Row(_cc(", ,no-cache,"), NOT_READ, "empty list elements are skipped",
                "RFC 9110 5.6.1", {"no_cache": True}),
            Row((("Cache-Control", "no-cache"), ("Cache-Control", "max-age=5")), NOT_READ,
                "two lines are one list", "RFC 9110 5.3", {"no_cache": True, "max_age_s": 5.0}),
        ),
    ),
    Section(
        "Pragma",
        "RFC 9111 section 5.4 deprecates `Pragma` without new rules; the sidecar keeps RFC "
        "7234's (section 5.4).",
        (
            Row(_h("Pragma", "no-cache"), NOT_READ, "like `Cache-Control: no-cache`",
                "RFC 7234 5.4", {"no_cache": True}),
            Row((("Pragma", "no-cache"), ("Cache-Control", "max-age=60")), NOT_READ,
                "`Pragma` is ignored when `Cache-Control` is present and understood",
                "RFC 7234 5.4", {"max_age_s": 60.0}),
            Row((("Pragma", "no-cache"), ("Cache-Control", "private")), NOT_READ,
                "`Cache-Control` holds nothing understood: `Pragma` applies",
                "RFC 7234 5.4", {"no_cache": True, **IGNORED_CC}),
            Row(_h("Pragma", "foo"), NOT_READ, "extension pragmas are ignored; reported",
                "RFC 7234 5.4", {"ignored": ("pragma",)}),
        ),
    ),
    Section(
        "The gateway's cache headers",
        "The gateway reads these on every request (transports/bifrost-http/lib/ctx.go, "
        "`ConvertToBifrostContext`) and drops a value it cannot read, never refusing it; its "
        "cache (plugins/semanticcache) then skips container requests, so through the gateway "
        "they change nothing for containers. The sidecar reads each value exactly as the "
        "gateway does (Go's `time.ParseDuration`, `strconv.ParseFloat`, `strconv.Atoi`: "
        "sidecar/durations.py, sidecar/controls.py) and gives it the meaning the gateway's "
        "cache gives it on the requests it does cache; what it cannot read is ignored and "
        "reported. Repeated lines: the last one the gateway can read wins.",
        (
            Row(_h("x-bf-cache-ttl", "30s"), f"entries live 30 s ({PLUGIN} `resolveTTL`)",
                "accepts cached data at most 30 s old (records are shared: it changes nothing "
                "for other callers)", f"{CTX}: `time.ParseDuration`", {"max_age_s": 30.0}),
            Row(_h("x-bf-cache-ttl", "1h30m"), "90 min", "90 min", "Go `time.ParseDuration`",
                {"max_age_s": 5400.0}),
            Row(_h("x-bf-cache-ttl", "1.5h"), "90 min", "90 min", "Go `time.ParseDuration`",
                {"max_age_s": 5400.0}),
            Row(_h("x-bf-cache-ttl", "+30s"), "30 s", "30 s", "Go `time.ParseDuration`",
                {"max_age_s": 30.0}),
            Row(_h("x-bf-cache-ttl", "300ms"), "0.3 s", "0.3 s", "Go `time.ParseDuration`",
                {"max_age_s": 0.3}),
            Row(_h("x-bf-cache-ttl", "2us"), "2 µs", "2 µs (in effect: revalidate)",
                "Go `time.ParseDuration`", {"max_age_s": 2e-06}),
            Row(_h("x-bf-cache-ttl", "12µs"), "12 µs (`µs` U+00B5 and `μs` U+03BC both)",
                "12 µs", "Go `time.ParseDuration`", {"max_age_s": 1.2e-05}),
            Row(_h("x-bf-cache-ttl", "90"), "90 s (whole seconds, when not a duration)",
                "90 s", f"{CTX}: `strconv.Atoi`", {"max_age_s": 90.0}),
            Row(_h("x-bf-cache-ttl", "+90"), "90 s", "90 s", "Go `strconv.Atoi`",
                {"max_age_s": 90.0}),
            Row(_h("x-bf-cache-ttl", "0"), f"parsed, not > 0: ignored ({PLUGIN} `resolveTTL`)",
                "ignored, reported", f"{PLUGIN} `resolveTTL`", TTL_IGNORED),
            Row(_h("x-bf-cache-ttl", "-1.5h"), "parsed, not > 0: ignored", "ignored, reported",
                f"{PLUGIN} `resolveTTL`", TTL_IGNORED),
            Row(_h("x-bf-cache-ttl", "-90"), "not > 0: ignored", "ignored, reported",
                f"{CTX}: `seconds > 0`", TTL_IGNORED),
            Row(_h("x-bf-cache-ttl", "forever"), "unreadable: ignored", "ignored, reported",
                CTX, TTL_IGNORED),
            Row(_h("x-bf-cache-ttl", "1d"), "unknown unit: ignored", "ignored, reported",
                "Go `time.ParseDuration`", TTL_IGNORED),
            Row(_h("x-bf-cache-ttl", "30S"), "units are case-sensitive: ignored",
                "ignored, reported", "Go `time.ParseDuration`", TTL_IGNORED),
            Row(_h("x-bf-cache-ttl", "1.5"), "no unit, not an integer: ignored",
                "ignored, reported", CTX, TTL_IGNORED),
            Row(_h("x-bf-cache-ttl", "3000000h"), "overflows a Duration: ignored",
                "ignored, reported", "Go `time.ParseDuration`", TTL_IGNORED),
            Row(_h("x-bf-cache-ttl", "9223372037"),
                "`time.Duration(seconds) * time.Second` overflows int64 and wraps negative: "
                "the default TTL", "9223372037 s as written (292 years: no limit)",
                f"{CTX}; deliberate: no wraparound", {"max_age_s": 9223372037.0}),
            Row((("x-bf-cache-ttl", "5m"), ("Cache-Control", "max-age=60")),
                NO_CONTAINERS, "the stricter of the two: 60 s", "RFC 9111 4.2.1",
                {"max_age_s": 60.0}),
            Row((("x-bf-cache-ttl", "5m"), ("x-bf-cache-ttl", "abc")),
                "every line is read; `abc` is dropped: 5 min", "5 min; `abc` reported", CTX,
                {"max_age_s": 300.0, **TTL_IGNORED}),
            Row(_h("x-bf-cache-threshold", "0.8"),
                "lowest semantic similarity for a hit", "lowest freshness (`similarity`) "
                "accepted: 0.8", f"{CTX}: `strconv.ParseFloat`", {"threshold": 0.8}),
            Row(_h("x-bf-cache-threshold", "7"), "clamped to 1", "clamped to 1", CTX,
                {"threshold": 1.0}),
            Row(_h("x-bf-cache-threshold", "-1"), "clamped to 0", "clamped to 0", CTX,
                {"threshold": 0.0}),
            Row(_h("x-bf-cache-threshold", "abc"), "unreadable: ignored", "ignored, reported",
                CTX, THRESHOLD_IGNORED),
            Row(_h("x-bf-cache-threshold", "1e400"), "out of float64 range: ignored",
                "ignored, reported", "Go `strconv.ParseFloat` (ErrRange)", THRESHOLD_IGNORED),
            Row(_h("x-bf-cache-threshold", "inf"), "clamped to 1", "clamped to 1",
                "Go `strconv.ParseFloat`", {"threshold": 1.0}),
            Row(_h("x-bf-cache-threshold", "0x1p-1"), "0.5 (a Go hex float)", "0.5",
                "Go `strconv.ParseFloat`", {"threshold": 0.5}),
            Row(_h("x-bf-cache-threshold", "NaN"),
                "read; the clamp keeps NaN",
                "ignored, reported (compared with a freshness it would admit everything)",
                "Go `strconv.ParseFloat`; deliberate", THRESHOLD_IGNORED),
            Row(_h("x-bf-cache-type", "direct"), "exact-match lookups only",
                "the default: lookups are exact", f"{PLUGIN} `PreLLMHook`"),
            Row(_h("x-bf-cache-type", "semantic"), "similarity lookups only",
                "served as `direct` (a container lookup is exact)", f"{PLUGIN} `PreLLMHook`"),
            Row(_h("x-bf-cache-type", "Direct"),
                "any other value (comparisons are case-sensitive): no lookup at all, the "
                "answer is still stored", "the same: revalidates, stores; reported",
                f"{PLUGIN} `PreLLMHook`", {"no_cache": True, "ignored": ("x-bf-cache-type",)}),
            Row(_h("x-bf-cache-type", "fuzzy"), "no lookup, stored", "the same; reported",
                f"{PLUGIN} `PreLLMHook`", {"no_cache": True, "ignored": ("x-bf-cache-type",)}),
            Row(_h("x-bf-cache-no-store", "true"), "the answer is not stored",
                "the answer is not stored", f"{CTX}; {PLUGIN} `PostLLMHook`", {"no_store": True}),
            Row(_h("x-bf-cache-no-store", "false"), "ignored (only `true` counts)",
                "the default: stored", CTX),
            Row(_h("x-bf-cache-no-store", "yes"), "ignored", "ignored (stored), reported", CTX,
                {"ignored": ("x-bf-cache-no-store",)}),
            Row(_h("x-bf-cache-no-store", "TRUE"), "ignored: exactly `true` only",
                "ignored (stored), reported", CTX, {"ignored": ("x-bf-cache-no-store",)}),
            Row(_h("x-bf-cache-key", "team-a"),
                "the key its entries are stored under; without one (and no default key) "
                "nothing is cached", "not used (a container's key is its id); reported",
                f"{CTX}; {PLUGIN} `PreLLMHook`", {"ignored": ("x-bf-cache-key",)}),
        ),
    ),
    Section(
        "Credentials and forwarding",
        "Not cache controls: `parse_rules` leaves them alone (checked here); what the sidecar "
        "forwards and how it keys its cache by them is checked by the proxy and tenancy tests. "
        "The credential fingerprint is an HMAC of the credential headers "
        "(`SIDECAR_KEY_SECRET`): it decides which cached grants and negative entries a "
        "request may use.",
        (
            Row(_h("Authorization", "Bearer sk-bf-..."),
                "a virtual key (`sk-bf-`, any case); another bearer value is a provider key "
                "(with direct keys allowed) or an admin token", "forwarded; part of the "
                "credential fingerprint", f"{CTX}; plugins/governance `VirtualKeyPrefix`", None),
            Row((("x-api-key", "sk-bf-..."),), "a virtual key when it starts with `sk-bf-`",
                "forwarded; in the fingerprint", CTX, None),
            Row((("x-goog-api-key", "sk-bf-..."),), "a virtual key when it starts with `sk-bf-`",
                "forwarded; in the fingerprint", CTX, None),
            Row(_h("x-bf-vk", "..."), "a virtual key, any value", "forwarded; in the "
                "fingerprint", CTX, None),
            Row((("Authorization", "Bearer sk-bf-a"), ("Authorization", "Bearer sk-bf-b")),
                "every line is read; the last one wins", "400: a credential must be "
                "unambiguous", CTX, None),
            Row((("Authorization", "Bearer sk-bf-a"), ("x-bf-vk", "sk-bf-b")),
                "whichever comes last wins", "400: two different credentials", CTX, None),
            Row(_h("x-bf-direct-key", "true"),
                "with direct keys allowed, the `Authorization` / `x-api-key` value is the "
                "provider key itself", "forwarded; in the fingerprint", CTX, None),
            Row(_h("x-bf-api-key", "prod-key"), "selects one of the provider's keys by name",
                "forwarded; in the fingerprint", CTX, None),
            Row(_h("x-bf-eh-openai-organization", "org-1"),
                "sent to the provider as `openai-organization` (auth headers refused)",
                "forwarded; in the fingerprint (extra headers may carry auth)", CTX, None),
            Row(_h("x-bf-send-back-raw-response", "true"),
                "raw provider response in `extra_fields` (forced on for containers)",
                "forwarded; not in the fingerprint", CTX, None),
            Row(_h("x-bf-session-id", "s-1"), "session stickiness: one provider key per "
                "session", "forwarded; not in the fingerprint", CTX, None),
            Row((("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
                 ("tracestate", "vendor=1")), "trace context flows through",
                "forwarded; not in the fingerprint", "W3C Trace Context", None),
            Row((), "served with the gateway's own provider keys when virtual keys are "
                "optional; else 401 `virtual_key_required`",
                "`SIDECAR_UPSTREAM_KIND=bifrost`: forwarded, cached under an anonymous "
                "identity only credential-less requests share; `openai`: 401",
                "plugins/governance", None),
        ),
    ),
)  # fmt: skip


def rows() -> list[Row]:
    """Every row of every section."""
    return [row for section in SECTIONS for row in section.rows]


def _number(value: float) -> str:
    if math.isinf(value):
        return "inf"
    return str(int(value)) if value.is_integer() else repr(value)


def render_rules(rules: dict[str, object] | None) -> str:
    """The ``Rules`` column: the fields a row sets."""
    if rules is None:
        return "not a control"
    if not rules:
        return "defaults"
    parts = []
    for name, value in rules.items():
        if name == "ignored":
            assert isinstance(value, tuple)
            parts.append("ignored: " + ", ".join(value))
        elif value is True:
            parts.append(name)
        else:
            assert isinstance(value, float)
            parts.append(f"{name}={_number(value)}")
    return "<br>".join(f"`{part}`" for part in parts)


def _request(row: Row) -> str:
    if not row.lines:
        return "no credential header"
    return "<br>".join(f"`{name}: {value}`" for name, value in row.lines)


def render_tables() -> str:
    """The generated part of docs/headers.md."""
    out = [BEGIN, ""]
    for section in SECTIONS:
        out += [f"### {section.title}", "", section.intro, ""]
        out += [
            "| request | gateway | sidecar | `Rules` | source |",
            "| --- | --- | --- | --- | --- |",
        ]
        for row in section.rows:
            cells = (_request(row), row.gateway, row.sidecar, render_rules(row.rules), row.source)
            out.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
        out.append("")
    out.append(END)
    return "\n".join(out)


def write() -> None:
    """Replace the generated part of docs/headers.md."""
    text = DOC.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(head + render_tables() + tail)


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        write()
    else:
        print(render_tables())
