"""Prices: the built-in table (genai-prices), the policy's overrides and default, and a call's
cost with cache reads, cache writes and reasoning tokens, checked against genai-prices' own
calculation."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import genai_prices
import pytest

from gateway.dialects.base import Usage
from gateway.policy import PolicyError, parse_policy
from gateway.policy import compiled as compiled_module
from gateway.policy.loader import packaged_default
from gateway.policy.prices import ModelPrice, Rates, builtin, cost, data_version, hold

NOW = time.time()
DAY = int(NOW // 86400)


def policy(text: str) -> object:
    return parse_policy(text, "test.yaml")


def price_of(text: str, model: str) -> ModelPrice | None:
    compiled = parse_policy(text, "test.yaml")
    return compiled.price(model, NOW)


def test_the_packaged_policy_prices_the_models_agents_call() -> None:
    compiled = parse_policy(*packaged_default())
    for model in ("gpt-4o", "gpt-4o-mini", "gpt-5", "gpt-4.1", "o3", "claude-sonnet-4-6"):
        price = compiled.price(model, NOW)
        assert price is not None and price.source.startswith("genai-prices"), model
        assert price.rates.input > 0 and price.rates.output > price.rates.input


def test_anthropic_cache_writes_and_reads_are_priced_as_anthropic_prices_them() -> None:
    price = builtin("claude-sonnet-4-6", DAY)
    assert price is not None
    assert price.rates == Rates(input=3.0, output=15.0, cache_read=0.3, cache_write=3.75)


def test_openai_has_no_cache_write_price_so_writes_cost_input() -> None:
    price = builtin("gpt-4o", DAY)
    assert price is not None
    assert price.rates == Rates(input=2.5, output=10.0, cache_read=1.25, cache_write=2.5)


def test_dated_and_prefixed_names_find_their_model() -> None:
    assert builtin("gpt-4o-2024-08-06", DAY) == builtin("gpt-4o", DAY)
    assert builtin("anthropic/claude-haiku-4-5", DAY) == builtin("claude-haiku-4-5", DAY)
    assert builtin("CLAUDE-HAIKU-4-5", DAY) == builtin("claude-haiku-4-5", DAY)


def test_an_unknown_model_has_no_price() -> None:
    assert builtin("house-model-7", DAY) is None
    assert price_of("version: 1\n", "house-model-7") is None
    assert price_of("version: 1\n", "") is None


def test_a_policy_entry_replaces_the_built_in_price_of_what_it_matches() -> None:
    text = "version: 1\nprices:\n  'gpt-4o*': {input: 1, output: 2}\n"
    override = price_of(text, "gpt-4o-mini")
    assert override is not None and override.source == "policy 'gpt-4o*'"
    # Unset cache prices are the input price.
    assert override.rates == Rates(input=1.0, output=2.0, cache_read=1.0, cache_write=1.0)
    # Other models keep the built-in price.
    assert price_of(text, "claude-sonnet-4-6") == builtin("claude-sonnet-4-6", DAY)


def test_a_policy_entry_sets_cache_read_and_cache_write() -> None:
    text = (
        "version: 1\nprices:\n  house-*: {input: 2, output: 8, cache_read: 0.2, cache_write: 2.5}\n"
    )
    price = price_of(text, "house-model-7")
    assert price is not None
    assert price.rates == Rates(input=2.0, output=8.0, cache_read=0.2, cache_write=2.5)


def test_the_star_glob_is_the_default_for_models_nothing_else_prices() -> None:
    text = "version: 1\nprices:\n  '*': {input: 5, output: 20}\n  house-*: {input: 1, output: 1}\n"
    assert price_of(text, "house-model-7") == price_of(text, "house-x")
    default = price_of(text, "mystery-model")
    assert default is not None and default.source == "policy '*'"
    assert default.rates.input == 5.0
    # The default does not replace the built-in table.
    assert price_of(text, "gpt-4o") == builtin("gpt-4o", DAY)


def test_a_name_no_model_has_is_not_looked_up_or_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client's model name can be megabytes: the table scans it (0.14 s a megabyte, on the
    event loop) and a cache would keep it. Past MAX_MODEL_NAME only the '*' default applies."""
    text = "version: 1\nprices:\n  '*': {input: 5, output: 20}\n"
    policy = parse_policy(text, "test.yaml")
    looked_up: list[str] = []
    monkeypatch.setattr(compiled_module, "builtin", lambda model, day: looked_up.append(model))
    huge = "gpt-4o" + "x" * compiled_module.MAX_MODEL_NAME
    found = policy.price(huge)
    assert found is not None and found.source == "policy '*'"
    assert looked_up == [] and not any(huge in key for key in policy._price_cache)
    assert (
        parse_policy("version: 1\n", "test.yaml").price(huge) is None
    )  # unpriced, as any unknown name


@pytest.mark.parametrize(
    "value",
    ["-1", ".nan", ".inf", "1e9", "'lots'"],
)
@pytest.mark.parametrize("field", ["input", "output", "cache_read", "cache_write"])
def test_a_hostile_price_is_refused_by_the_loader(field: str, value: str) -> None:
    prices = {"input": "1", "output": "2", field: value}
    entry = ", ".join(f"{k}: {v}" for k, v in prices.items())
    with pytest.raises(PolicyError) as caught:
        policy(f"version: 1\nprices:\n  'gpt-4o': {{{entry}}}\n")
    assert field in str(caught.value)


def test_cost_prices_cache_reads_and_writes_and_counts_reasoning_once() -> None:
    price = builtin("claude-sonnet-4-6", DAY)
    assert price is not None
    usage = Usage(
        input_tokens=10_000,  # every prompt token: the cache parts are inside
        cache_read_tokens=6_000,
        cache_creation_tokens=3_000,
        output_tokens=500,
        reasoning_tokens=400,  # inside the output tokens
    )
    expected = (1_000 * 3.0 + 6_000 * 0.3 + 3_000 * 3.75 + 500 * 15.0) / 1e6
    assert cost(price, usage) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("model", "provider", "usage"),
    [  # Usage(input, output, cache_read, cache_creation, reasoning)
        ("claude-sonnet-4-6", "anthropic", Usage(10_000, 500, 6_000, 3_000, 400)),
        ("claude-haiku-4-5", "anthropic", Usage(1_234, 77, 0, 1_000, 0)),
        ("gpt-4o", "openai", Usage(20_000, 900, 15_000, 0, 0)),
        ("gpt-5", "openai", Usage(50_000, 4_000, 40_000, 0, 3_500)),
        # Past Sonnet 4.5's 200k-token tier every token of the call is dearer.
        ("claude-sonnet-4-5", "anthropic", Usage(250_000, 1_000, 100_000, 50_000, 0)),
        ("claude-sonnet-4-5", "anthropic", Usage(150_000, 1_000, 100_000, 20_000, 0)),
    ],
)
def test_cost_matches_genai_prices_own_calculation(model: str, provider: str, usage: Usage) -> None:
    price = builtin(model, DAY)
    assert price is not None
    theirs = genai_prices.calc_price(
        genai_prices.Usage(
            input_tokens=usage.input_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_creation_tokens,
            output_tokens=usage.output_tokens,
        ),
        model,
        provider_id=provider,
        genai_request_timestamp=datetime.fromtimestamp(NOW, UTC),
    )
    assert cost(price, usage) == pytest.approx(float(theirs.total_price), rel=1e-9)


def test_the_reservation_holds_input_at_the_dearer_cache_write_price() -> None:
    price = builtin("claude-sonnet-4-6", DAY)
    assert price is not None
    assert hold(price, 1_000, 100) == pytest.approx((1_000 * 3.75 + 100 * 15.0) / 1e6)


def test_the_data_version_names_the_package() -> None:
    version = data_version()
    assert version["source"] == "genai-prices"
    assert version["version"] == genai_prices.__version__
    assert version["providers"] == ["anthropic", "openai"]
    assert version["models"] > 50


def test_genai_prices_auto_update_is_never_started() -> None:
    """Offline: the package's background fetch runs only when an ``UpdatePrices`` starts."""
    from genai_prices import data_snapshot, update_prices

    builtin("gpt-4o", DAY)
    assert update_prices._shared_updater.thread is None
    assert data_snapshot._custom_snapshot is None
