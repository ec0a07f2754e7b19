"""Every parser of caller-controlled text costs about its input's length, whatever the text.

A backtracking pattern on a header value froze a process for a second with 8 KB of digits and
one letter. Each parser here gets 8 KB values built to trip backtracking (long runs of what a
pattern repeats, ended by what makes it fail) and must finish each in a small fraction of the
time a quadratic parser needs for them (over a second): the bound is loose on purpose, so a
loaded machine does not fail it while a quadratic parser always does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import pytest
from multidict import CIMultiDict

from sidecar.controls import CONTROL_HEADERS, parse_rules
from sidecar.credentials import CredentialReader
from sidecar.errors import SidecarError
from sidecar.logs import redact
from sidecar.settings import load_settings
from sidecar.throttle import retry_after_ms
from sidecar.views import parse_container_id, parse_provider

SIZE = 8192
#: Runs of what patterns repeat, each ended by a character that makes a match fail.
UNITS = ("1", "1_", "0", ".", "1.", "e1", "0x", "p", "_", " ", ",", "=", "\"", "\\\"", "\\",
         "a=", "sk-", "bearer ", "://a:", "@", "1s", "1.5h", "-", "+", "\t")  # fmt: skip
ENDINGS = ("", "x", "!", '"', "é", ".", "e", "p", "_")
HOSTILE = sorted({(unit * (SIZE // len(unit) + 1))[:SIZE - len(end)] + end
                  for unit in UNITS for end in ENDINGS})  # fmt: skip
#: Process time one value may take: a linear parser needs well under a millisecond.
BOUND_S = 0.05

SETTINGS = load_settings({}, upstream_kind="bifrost", upstream_url="http://gateway.invalid")


def _quietly(parse: Callable[[str], object], value: str) -> None:
    with contextlib.suppress(SidecarError):
        parse(value)


def _cost_s(parse: Callable[[str], object], value: str) -> float:
    """The least of three runs, in process time (other processes' load does not count)."""
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        _quietly(parse, value)
        best = min(best, time.process_time() - started)
    return best


def _control(name: str) -> Callable[[str], object]:
    return lambda value: parse_rules({name: value}, 0.0)


def _credential(kind: str, name: str) -> Callable[[str], object]:
    reader = CredentialReader(kind, "secret")
    return lambda value: reader.read([(name, value), ("authorization", "Bearer sk-" + value)])


PARSERS: dict[str, Callable[[str], object]] = {
    **{f"control {name}": _control(str(name)) for name in CONTROL_HEADERS},
    **{f"credential {kind} {name}": _credential(kind, name)
       for kind in ("bifrost", "openai")
       for name in ("authorization", "x-api-key", "x-bf-vk", "x-goog-api-key", "x-bf-eh-x")},
    "provider": lambda value: parse_provider(value, True, SETTINGS),
    "container id": parse_container_id,
    "retry-after": lambda value: retry_after_ms(value, 1.0, 60.0),
    "log redaction": redact,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_a_parser_of_caller_text_is_linear_on_hostile_values(name: str) -> None:
    parse = PARSERS[name]
    slow = {value[:12] + "..." + value[-3:]: round(cost, 3) for value in HOSTILE
            if (cost := _cost_s(parse, value)) > BOUND_S}  # fmt: skip
    assert not slow, f"{name}: values that took over {BOUND_S}s: {slow}"


def test_a_request_of_many_hostile_header_lines_is_answered_in_linear_time() -> None:
    # A request may carry a hundred such lines of one header: every line is read once.
    lines = [("x-bf-cache-threshold", "1" * (SIZE - 1) + "x")] * 100
    started = time.process_time()
    rules = parse_rules(CIMultiDict(lines), 0.0)
    assert time.process_time() - started < 100 * BOUND_S
    assert rules.ignored == ("x-bf-cache-threshold",)
