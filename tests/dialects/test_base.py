"""The dialect seam: shared value types, coercion helpers, the route table."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.dialects import (
    ANTHROPIC_MESSAGES,
    OPENAI_CHAT,
    OPENAI_RESPONSES,
    ROUTES,
    ErrorKind,
    Usage,
)
from gateway.dialects.base import STATUS_OF, as_dict, as_int, as_list, as_str


def test_usage_total_is_input_plus_output() -> None:
    usage = Usage(input_tokens=100, output_tokens=20, cache_read_tokens=80, reasoning_tokens=5)
    assert usage.total_tokens == 120
    assert Usage().total_tokens == 0
    assert Usage().estimated is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [(7, 7), (0, 0), (None, 0), (True, 0), ("12", 0), (1.5, 0), (-5, 0), (10**30, 2**40)],
)
def test_as_int_counts_only_real_ints(value: Any, expected: int) -> None:
    assert as_int(value) == expected


def test_coercions_fall_back_to_empty() -> None:
    assert as_str("x") == "x"
    assert as_str(1) is None
    assert as_dict({"a": 1}) == {"a": 1}
    assert as_dict([1]) == {}
    assert as_list([1]) == [1]
    assert as_list({"a": 1}) == []


def test_every_error_kind_has_a_status() -> None:
    assert set(STATUS_OF) == set(ErrorKind)
    assert STATUS_OF[ErrorKind.TOO_LARGE] == 413
    assert STATUS_OF[ErrorKind.UPSTREAM] == 502


def test_route_table() -> None:
    assert ROUTES == {
        "/v1/chat/completions": OPENAI_CHAT,
        "/v1/responses": OPENAI_RESPONSES,
        "/v1/messages": ANTHROPIC_MESSAGES,
    }
    assert {d.name for d in ROUTES.values()} == {
        "openai.chat",
        "openai.responses",
        "anthropic.messages",
    }
    assert [d.provider for d in ROUTES.values()] == ["openai", "openai", "anthropic"]
    assert all(d.operation == "chat" for d in ROUTES.values())


@pytest.mark.parametrize("dialect", list(ROUTES.values()), ids=list(ROUTES))
def test_every_dialect_answers_every_error_kind(dialect: Any) -> None:
    for kind in ErrorKind:
        error = dialect.error(kind, "msg")
        assert 400 <= error.status < 600
        assert "error" in error.body


@pytest.mark.parametrize("dialect", list(ROUTES.values()), ids=list(ROUTES))
def test_every_dialect_reads_an_empty_body(dialect: Any) -> None:
    facts = dialect.read_request({})
    assert facts.model is None
    assert facts.stream is False
    assert facts.items == []
    assert facts.user_turn is False
    assert facts.session_hints == {}
    answer = dialect.read_response({})
    assert answer.usage is None
    assert answer.finish_reasons == []


@pytest.mark.parametrize("dialect", list(ROUTES.values()), ids=list(ROUTES))
def test_observers_start_empty(dialect: Any) -> None:
    for rewritten in (False, True):
        observer = dialect.observe_stream(rewritten)
        assert observer.facts.usage is None
        assert observer.facts.output_text == []
        assert isinstance(observer.rewrites, bool)
