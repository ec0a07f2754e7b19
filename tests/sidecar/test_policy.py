"""Freshness windows, from the record and the settings."""

from __future__ import annotations

from sidecar.policy import Policy, State
from sidecar.records import Record, decode_record, encode_record
from sidecar.settings import load_settings

SETTINGS = load_settings(
    {},
    upstream_kind="openai",
    fresh_ttl_s=10,
    max_stale_s=60,
    stale_if_error_s=300,
    negative_ttl_s=5,
    terminal_ttl_s=3600,
)
T0 = 1_700_000_000_000


def record(**fields: object) -> Record:
    values: dict[str, object] = {
        "provider": "openai",
        "container_id": "cntr_1",
        "status_code": 200,
        "body": b'{"id":"cntr_1"}',
        "fetched_at_ms": T0,
        "status": "running",
    }
    values.update(fields)
    return Record(**values)  # type: ignore[arg-type]


def test_fresh_then_stale_with_falling_similarity_then_if_error_then_dead() -> None:
    policy = Policy(SETTINGS)
    rec = record()
    assert policy.assess(rec, T0 + 9_000).state is State.FRESH
    assert policy.assess(rec, T0 + 9_000).similarity == 1.0
    halfway = policy.assess(rec, T0 + 40_000)
    assert halfway.state is State.STALE
    assert halfway.similarity == 0.5
    assert halfway.ttl_s == -30
    assert halfway.age_s == 40
    assert policy.assess(rec, T0 + 71_000).state is State.STALE_IF_ERROR
    assert policy.assess(rec, T0 + 371_000).state is State.DEAD
    assert policy.retention_ms(rec) == 10_000 + 60_000 + 300_000


def test_fresh_window_stops_at_the_predicted_expiry() -> None:
    policy = Policy(SETTINGS)
    rec = record(expires_at=(T0 + 4_000) // 1000)
    assert policy.assess(rec, T0 + 3_000).state is State.FRESH
    assert policy.assess(rec, T0 + 5_000).state is State.STALE


def test_a_prediction_already_past_is_ignored() -> None:
    policy = Policy(SETTINGS)
    rec = record(expires_at=(T0 - 60_000) // 1000)
    assert policy.assess(rec, T0 + 9_000).state is State.FRESH


def test_terminal_containers_stay_fresh_longer_and_negatives_never_serve_stale() -> None:
    policy = Policy(SETTINGS)
    assert policy.assess(record(status="expired"), T0 + 3_000_000).state is State.FRESH
    negative = record(status_code=404, status="")
    assert policy.assess(negative, T0 + 4_000).state is State.FRESH
    assert policy.assess(negative, T0 + 6_000).state is State.DEAD


def test_records_round_trip_and_unknown_versions_are_skipped() -> None:
    rec = record(last_active_at=5, expires_at=7)
    data = encode_record(rec)
    assert decode_record(data) == rec
    assert decode_record(b"\x93\x02\xa1x\xa1y") is None
    assert decode_record(b"not msgpack") is None
