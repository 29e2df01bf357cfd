"""A session record as a Redis hash and back, and the key names."""

from __future__ import annotations

from dataclasses import fields

from gateway.store.records import ModelTotals, SessionRecord, TokenTotals
from gateway.store.redis_layout import FIELDS, Keys, from_hash, to_hash


def test_every_record_field_has_a_place() -> None:
    assert {f.name for f in fields(SessionRecord)} == FIELDS


def test_a_record_goes_to_a_hash_and_back_whole() -> None:
    record = SessionRecord(
        id="s:1/é",
        source="codex",
        agent="codex",
        first_seen=1796244863.123456,
        last_seen=1796244900.5,
        name="fix the build",
        key_hash="abcdef012345",
        team="platform",
        principal="key:abc",
        status="paused",
        status_reason="paused by the loop rule",
        turns=7,
        cost=0.012345678901,
        tokens=TokenTotals(100, 20, 3, 4, 5),
        models={"gpt-5": ModelTotals(100, 20, 3, 4, 5, turns=7)},
        warnings=[{"key": "x", "at": 1.5, "warnings": ["near"]}],
        context_rewrites=[{"summary": "text"}],
        last_body_hash=2**63 - 1,
        rate_fast=1.25,
        in_flight=2,
        reserved_tokens=300,
    )
    flat = to_hash(record)
    raw = {name.encode(): value.encode() for name, value in zip(flat[::2], flat[1::2], strict=True)}
    assert from_hash(raw) == record


def test_an_empty_or_partial_hash_is_no_record() -> None:
    assert from_hash({}) is None
    assert from_hash({b"turns": b"3"}) is None  # what an expiry between two writes could leave


def test_lua_empty_tables_read_as_empty_lists() -> None:
    record = from_hash({b"id": b"s", b"warnings": b"{}", b"models": b"{}"})
    assert record is not None and record.warnings == [] and record.models == {}


def test_every_key_shares_one_hash_tag() -> None:
    keys = Keys("team-a")
    names = [keys.layout, keys.session_index, keys.leases, keys.lease_entries]
    names += [keys.budget_index, keys.keys, keys.session("x{y}"), keys.budget("team:a:day:1")]
    assert all(name.startswith("gw:{team-a}:") for name in names)
