"""Session records: totals, and the JSON form the sqlite store writes."""

from __future__ import annotations

from gateway.dialects import Usage
from gateway.store import SessionRecord, TokenTotals


def test_token_totals_add() -> None:
    totals = TokenTotals()
    totals.add(Usage(input_tokens=10, output_tokens=2, cache_read_tokens=4, reasoning_tokens=1))
    totals.add(Usage(input_tokens=5, output_tokens=3, cache_creation_tokens=7))
    assert (totals.input_tokens, totals.output_tokens) == (15, 5)
    assert (totals.cache_read_tokens, totals.cache_creation_tokens) == (4, 7)
    assert totals.reasoning_tokens == 1
    assert totals.total_tokens == 20


def test_json_round_trip_drops_in_flight_figures() -> None:
    record = SessionRecord.from_json(
        {
            "id": "s",
            "source": "codex",
            "agent": "codex",
            "first_seen": 1.0,
            "last_seen": 2.0,
            "name": "n",
            "key_hash": "abcdef012345",
            "turns": 3,
            "user_turns": 1,
            "tokens": {"input_tokens": 100, "output_tokens": 10, "total_tokens": 110},
            "models": {"gpt-5": {"turns": 3, "input_tokens": 100, "output_tokens": 10}},
        }
    )
    record.in_flight = 2
    record.reserved_tokens = 500
    data = record.to_json()
    assert data["tokens"]["total_tokens"] == 110
    assert data["in_flight"] == 2
    back = SessionRecord.from_json(data)
    assert back.in_flight == 0
    assert back.reserved_tokens == 0
    assert back.tokens == record.tokens
    assert back.tokens.total_tokens == 110
    assert back.models == record.models
    assert back.models["gpt-5"].turns == 3
    assert (back.id, back.turns, back.user_turns, back.name) == ("s", 3, 1, "n")
