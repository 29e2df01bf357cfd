"""``window_of``: the built-in table, the policy's overrides, globs, and the default."""

from __future__ import annotations

import pytest

from gateway.compaction import window_of

DEFAULT = 64_000


@pytest.mark.parametrize(
    ("model", "window"),
    [
        ("claude-sonnet-4-6", 200_000),
        ("claude-opus-4-1-20250805", 200_000),
        ("claude-3-5-haiku-latest", 200_000),
        ("gpt-4o", 128_000),
        ("gpt-4o-mini", 128_000),
        ("gpt-4o-2024-08-06", 128_000),
        ("gpt-5", 272_000),
        ("gpt-5.1-codex", 272_000),
        ("gpt-5-mini", 272_000),
        ("gpt-4.1", 1_047_576),
        ("gpt-4.1-mini", 1_047_576),
        ("gpt-4-turbo-2024-04-09", 128_000),
        ("gpt-4-32k-0613", 32_768),
        ("gpt-4", 8_192),
        ("gpt-4-0613", 8_192),
        ("gpt-3.5-turbo-0125", 16_385),
        ("o3-mini", 200_000),
        ("o4-mini-2025-04-16", 200_000),
        ("codex-mini-latest", 200_000),
        ("gpt-oss-120b", 131_072),
    ],
)
def test_built_in_windows(model: str, window: int) -> None:
    assert window_of(model, {}, DEFAULT) == window


@pytest.mark.parametrize(
    ("model", "window"),
    [
        ("openai/gpt-4o", 128_000),
        ("anthropic/claude-sonnet-4-6", 200_000),
        ("openrouter/openai/gpt-5.1-codex", 272_000),
        ("azure/gpt-4.1", 1_047_576),
    ],
)
def test_a_provider_prefix_is_ignored(model: str, window: int) -> None:
    assert window_of(model, {}, DEFAULT) == window


def test_model_ids_match_case_insensitively() -> None:
    assert window_of("GPT-4o-Mini", {}, DEFAULT) == 128_000
    assert window_of("Claude-Sonnet-4-6", {}, DEFAULT) == 200_000
    assert window_of("gpt-4o", {"GPT-4O*": 50_000}, DEFAULT) == 50_000


def test_the_exact_gpt_4_entries_do_not_swallow_their_variants() -> None:
    """``gpt-4`` is an exact entry: ``gpt-4o`` and ``gpt-4.1`` have windows of their own."""
    assert window_of("gpt-4", {}, DEFAULT) == 8_192
    assert window_of("gpt-4o", {}, DEFAULT) != 8_192
    assert window_of("gpt-4.1", {}, DEFAULT) != 8_192


@pytest.mark.parametrize("model", ["mistral-large-latest", "llama-3.1-70b", "gemini-2.5-pro"])
def test_an_unknown_model_uses_the_default(model: str) -> None:
    assert window_of(model, {}, DEFAULT) == DEFAULT
    assert window_of(model, {"gpt-*": 1000}, 5000) == 5000


@pytest.mark.parametrize("model", [None, ""])
def test_no_model_uses_the_default(model: str | None) -> None:
    assert window_of(model, {}, DEFAULT) == DEFAULT
    assert window_of(model, {"*": 1234}, DEFAULT) == DEFAULT


def test_a_policy_override_wins_over_the_built_in_table() -> None:
    assert window_of("claude-sonnet-4-6", {"claude-sonnet-4-6": 1_000_000}, DEFAULT) == 1_000_000
    assert window_of("gpt-4o-mini", {"gpt-4o*": 32_000}, DEFAULT) == 32_000


def test_even_a_broad_override_wins_over_a_more_specific_built_in_entry() -> None:
    """Overrides are looked up first: any match there ends the search."""
    assert window_of("gpt-4.1-mini", {"gpt-*": 100_000}, DEFAULT) == 100_000
    assert window_of("claude-opus-4-1", {"*": 50_000}, DEFAULT) == 50_000


def test_an_override_that_does_not_match_falls_back_to_the_built_in_table() -> None:
    assert window_of("gpt-4o", {"claude-*": 1_000_000}, DEFAULT) == 128_000
    assert window_of("my-local-model", {"claude-*": 1_000_000}, DEFAULT) == DEFAULT


def test_an_override_can_name_a_model_the_table_does_not_know() -> None:
    overrides = {"qwen3-coder*": 262_144, "deepseek-*": 65_536}
    assert window_of("qwen3-coder-480b", overrides, DEFAULT) == 262_144
    assert window_of("deepseek/deepseek-chat", overrides, DEFAULT) == 65_536


def test_the_most_specific_override_wins() -> None:
    overrides = {"*": 10_000, "gpt-*": 20_000, "gpt-4o*": 30_000, "gpt-4o-mini*": 40_000}
    assert window_of("gpt-4o-mini-2024-07-18", overrides, DEFAULT) == 40_000
    assert window_of("gpt-4o-2024-08-06", overrides, DEFAULT) == 30_000
    assert window_of("gpt-5", overrides, DEFAULT) == 20_000
    assert window_of("claude-sonnet-4-6", overrides, DEFAULT) == 10_000


def test_the_most_specific_override_wins_whatever_the_order() -> None:
    overrides = {"gpt-4o-mini*": 40_000, "gpt-4o*": 30_000, "*": 10_000}
    assert window_of("gpt-4o-mini", overrides, DEFAULT) == 40_000
    assert window_of("gpt-4o", overrides, DEFAULT) == 30_000


def test_an_exact_override_beats_a_glob() -> None:
    overrides = {"claude-sonnet-4-6": 1_000_000, "claude-*": 100_000}
    assert window_of("claude-sonnet-4-6", overrides, DEFAULT) == 1_000_000
    assert window_of("claude-sonnet-4-5", overrides, DEFAULT) == 100_000


def test_a_default_is_returned_as_given() -> None:
    assert window_of("unknown", {}, 1024) == 1024
    assert window_of(None, {}, 2_000_000) == 2_000_000
