"""What a call costs: a price per model, and a call's cost from its usage.

A model's price is the policy's ``prices`` entry whose glob matches it, else the built-in
table's, else the policy's default (the entry with the glob ``*``), else none: the model is
*unpriced*, which is counted and shown, never taken as free (see ``CompiledPolicy.price``).

The built-in table is genai-prices' (the pydantic team's, kept from the providers' price pages,
with cache-read and cache-write prices), as bundled with the installed package, and only its
OpenAI and Anthropic models: the providers the gateway speaks to. It is read offline: the
package's ``UpdatePrices`` background fetch is never started, and the data is imported from
``genai_prices.data`` (what the package ships), never from a snapshot a fetch could replace.

genai-prices' own calculation builds unit graphs and Decimals per call (tens of microseconds);
here a model's price is resolved once (cached per name and UTC day: some prices change on a
date) into plain floats, and a call's cost is a few multiplications.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from gateway.dialects.base import Usage
from gateway.policy.model import Price

if TYPE_CHECKING:
    from genai_prices.types import ModelInfo, Provider, TieredPrices

SOURCE = "genai-prices"
PROVIDERS = ("anthropic", "openai")
"""The providers whose models the built-in table holds, in the order a name is looked up."""
DAY = 86400
MILLION = 1e6


@dataclass(slots=True, frozen=True)
class Rates:
    """Per million tokens, in US dollars for the built-in table."""

    input: float
    output: float
    cache_read: float
    cache_write: float


@dataclass(slots=True, frozen=True)
class ModelPrice:
    rates: Rates
    source: str
    """Where the price came from: ``policy 'gpt-4o*'`` or ``genai-prices claude-sonnet-4-5``."""
    tiers: tuple[tuple[int, Rates], ...] = ()
    """Long-context prices, ascending: past ``start`` input tokens (cache parts included), the
    call's every token is priced at these rates (the providers' threshold pricing)."""

    def at(self, input_tokens: int) -> Rates:
        rates = self.rates
        if not self.tiers:  # most models: priced on every call, so no loop set up
            return rates
        for start, tier in self.tiers:
            if input_tokens <= start:
                break
            rates = tier
        return rates


def cost(price: ModelPrice, usage: Usage) -> float:
    """A call's cost. ``usage.input_tokens`` counts every prompt token, the cache reads and
    writes among them, so the uncached part is what is left; reasoning tokens are inside
    ``output_tokens`` (both providers count them there) and are not added again."""
    rates = price.at(usage.input_tokens)
    read, written = usage.cache_read_tokens, usage.cache_creation_tokens
    fresh = max(0, usage.input_tokens - read - written)
    return (
        fresh * rates.input
        + read * rates.cache_read
        + written * rates.cache_write
        + usage.output_tokens * rates.output
    ) / MILLION


def hold(price: ModelPrice, input_tokens: int, output_tokens: int) -> float:
    """What a call holds against cost budgets while in flight: its input at the dearer of the
    input and cache-write prices (a prompt may be written to the cache), its output cap."""
    rates = price.at(input_tokens)
    return (
        input_tokens * max(rates.input, rates.cache_write) + output_tokens * rates.output
    ) / MILLION


def from_policy(glob: str, price: Price) -> ModelPrice:
    """A ``prices`` entry; unset cache prices are the input price (what a provider that has
    no separate cache price charges)."""
    read = price.input if price.cache_read is None else price.cache_read
    write = price.input if price.cache_write is None else price.cache_write
    return ModelPrice(Rates(price.input, price.output, read, write), f"policy '{glob}'")


def load() -> None:
    """Import genai-prices and its data (a quarter of a second of CPU): at start-up, in a
    thread, so no request waits for it on the event loop."""
    _table()


def data_version() -> dict[str, Any]:
    """What ``GET /gateway/policy`` says of the built-in table."""
    version, providers = _table()
    return {
        "source": SOURCE,
        "version": version,
        "providers": list(PROVIDERS),
        "models": sum(len(provider.models) for provider in providers),
    }


@lru_cache(maxsize=1024)
def builtin(model: str, day: int) -> ModelPrice | None:
    """The built-in price of ``model`` on UTC day ``day`` (days since the epoch); a provider
    prefix (``anthropic/claude-...``) is dropped, as genai-prices matches bare names."""
    name = model.rsplit("/", 1)[-1].lower()
    for provider in _table()[1]:
        info = provider.find_model(name)
        if info is not None:
            return _converted(info, datetime.fromtimestamp(day * DAY, UTC))
    return None


@lru_cache(maxsize=1)
def _table() -> tuple[str, tuple[Provider, ...]]:
    import genai_prices
    from genai_prices.data import providers

    by_id = {provider.id: provider for provider in providers}
    return genai_prices.__version__, tuple(by_id[name] for name in PROVIDERS)


_KEYS = ("input_mtok", "output_mtok", "cache_read_mtok", "cache_write_mtok")


def _converted(info: ModelInfo, when: datetime) -> ModelPrice | None:
    """genai-prices' standard price of a model (no batch or service-tier variant) as floats.
    A model priced in other units only (images, audio) has no token price: unpriced."""
    from genai_prices.types import TieredPrices

    found = info.get_prices(when)
    values = {key: getattr(found, key, None) for key in _KEYS}
    if values["input_mtok"] is None:
        return None
    starts = sorted(
        {t.start for v in values.values() if isinstance(v, TieredPrices) for t in v.tiers}
    )
    tiers = tuple((start, _rates(values, start + 1)) for start in starts)
    return ModelPrice(_rates(values, 0), f"{SOURCE} {info.id}", tiers)


def _rates(values: dict[str, Decimal | TieredPrices | None], input_tokens: int) -> Rates:
    given = {key: _value(value, input_tokens) for key, value in values.items()}
    fresh = given["input_mtok"] or 0.0
    return Rates(
        input=fresh,
        output=given["output_mtok"] or 0.0,  # embeddings have no output to price
        # Without a cache price genai-prices charges those tokens as input: so do we.
        cache_read=fresh if given["cache_read_mtok"] is None else given["cache_read_mtok"],
        cache_write=fresh if given["cache_write_mtok"] is None else given["cache_write_mtok"],
    )


def _value(value: Decimal | TieredPrices | None, input_tokens: int) -> float | None:
    """One price at a call of ``input_tokens``: a tier applies past its start."""
    if value is None:
        return None
    if isinstance(value, Decimal):
        return float(value)
    applicable = value.base
    for tier in value.tiers:
        if input_tokens > tier.start:
            applicable = tier.price
    return float(applicable)
