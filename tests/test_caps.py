"""cap: open-valued fields bounded in length, with a marker."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.caps import LIMIT, MARKER, cap, cap_optional


def test_short_values_are_kept_as_they_are() -> None:
    assert cap("claude-sonnet-4-6") == "claude-sonnet-4-6"
    assert cap("x" * LIMIT) == "x" * LIMIT
    assert cap_optional(None) is None


def test_a_long_value_is_cut_with_a_marker() -> None:
    capped = cap("m" * 200_000)
    assert len(capped) == LIMIT and capped.endswith(MARKER)
    assert cap("abcdef", 4) == "abc" + MARKER
    assert cap_optional("y" * 500) == cap("y" * 500)


@given(st.text(max_size=400), st.integers(1, 300))
def test_a_capped_value_is_never_longer_than_the_limit(value: str, limit: int) -> None:
    capped = cap(value, limit)
    assert len(capped) <= limit
    assert capped == value or (capped.endswith(MARKER) and value.startswith(capped[:-1]))
