"""A policy compiled for the hot path: matchers precompiled, effective settings cached.

``CompiledPolicy.resolve()`` is all a request calls: no YAML, no validation of the file, and
for a combination of match values already seen, a dictionary look-up.
"""

from __future__ import annotations

import copy
import fnmatch
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from gateway.policy.model import KeyInfo, Match, PolicyFile, PolicySettings, Rule
from gateway.policy.prices import DAY, ModelPrice, builtin, from_policy

_BLOCKS = ("limits", "loops", "context")
_CACHE_SIZE = 4096
MAX_MODEL_NAME = 256
"""Longer model names are not priced by name (only the policy's ``*`` default applies)."""


class RuleError(Exception):
    """Rules whose settings, merged over the defaults, are invalid: every one of them, so a
    file's problems show in one pass (``errors`` is ``(rule index, its errors)``)."""

    def __init__(self, errors: list[tuple[int, list[ErrorDetails]]]) -> None:
        super().__init__("invalid: " + ", ".join(f"rules[{index}]" for index, _ in errors))
        self.errors = errors


def glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern), re.IGNORECASE)


@dataclass(slots=True, frozen=True)
class Caller:
    """The facts about a request that rules can match on."""

    agent: str = "unknown"
    model: str | None = None
    key_hash: str | None = None
    team: str | None = None
    session_name: str | None = None
    mode: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    """Only the headers some rule matches on, lowercased names."""
    principal: str | None = None
    """The authenticated principal's public id (``key:<id>``, ``jwt:<sub>``,
    ``passthrough:<key hash>``)."""
    scopes: frozenset[str] = frozenset()
    """The principal's scopes (``llm``, ``upstream:byok``)."""


@dataclass(slots=True, frozen=True)
class Effective:
    """The settings for one request, and which rule set what."""

    settings: PolicySettings
    rules: tuple[str, ...]
    """Names of the rules that matched, in order."""
    sources: Mapping[str, str]
    """Setting path (``limits.max_turns``) to the rule that set it, or ``defaults``."""
    version: str
    model_allow: tuple[re.Pattern[str], ...] = ()
    model_deny: tuple[re.Pattern[str], ...] = ()

    def model_allowed(self, model: str) -> bool:
        return any(p.fullmatch(model) for p in self.model_allow) and not any(
            p.fullmatch(model) for p in self.model_deny
        )

    def source(self, path: str) -> str:
        """The rule that set ``path``: exactly, inside it (``limits.models`` when a rule set
        ``limits.models.allow``), or around it (a rule that replaced a whole block)."""
        if path in self.sources:
            return self.sources[path]
        inside = [rule for key, rule in self.sources.items() if key.startswith(path + ".")]
        if inside:
            return inside[-1]
        while "." in path:
            path = path.rpartition(".")[0]
            if path in self.sources:
                return self.sources[path]
        return "defaults"


@dataclass(slots=True)
class CompiledRule:
    name: str
    rule: Rule
    conditions: list[tuple[str, re.Pattern[str]]]
    header_conditions: list[tuple[str, re.Pattern[str]]]
    mode: str | None

    def matches(self, caller: Caller, key_name: str | None) -> bool:
        if self.mode is not None and caller.mode != self.mode:
            return False
        for attribute, pattern in self.conditions:
            if attribute == "key":
                values = [v for v in (key_name, caller.key_hash) if v]
            elif attribute == "scope":
                values = list(caller.scopes)
            else:
                value = getattr(caller, attribute)
                values = [value] if value else []
            if not any(pattern.fullmatch(v) for v in values):
                return False
        headers = dict(caller.headers)
        return all(
            (value := headers.get(name)) is not None and pattern.fullmatch(value)
            for name, pattern in self.header_conditions
        )


def compile_rule(index: int, rule: Rule) -> CompiledRule:
    match: Match = rule.match
    conditions = [
        (attribute, glob(value))
        for attribute in ("agent", "key", "team", "model", "session_name", "principal", "scope")
        if (value := getattr(match, attribute)) is not None
    ]
    headers = [(name.lower(), glob(value)) for name, value in match.headers.items()]
    return CompiledRule(rule.name or f"rules[{index}]", rule, conditions, headers, match.mode)


def raw_rule_errors(data: Mapping[str, Any]) -> list[tuple[int, list[ErrorDetails]]]:
    """``RuleError``'s check on a file that failed validation elsewhere: each rule's settings
    blocks merged over the file's defaults as written (over the built-in ones) and validated.

    A rule's blocks are free-form mappings until merged, so without this a typo inside a rule
    would show only once the rest of the file is fixed. Errors the defaults have on their own
    are left out (they are the defaults' errors, reported there); blocks that are not mappings
    are skipped (the file's own validation reports them)."""
    base = PolicySettings().model_dump()
    defaults = data.get("defaults")
    if isinstance(defaults, Mapping):
        merge(base, defaults, "defaults", {}, "defaults")
    try:
        PolicySettings.model_validate(base)
        own: set[tuple[int | str, ...]] = set()
    except ValidationError as exc:
        own = {tuple(error["loc"]) for error in exc.errors()}
    rules = data.get("rules")
    found: list[tuple[int, list[ErrorDetails]]] = []
    for index, rule in enumerate(rules if isinstance(rules, list) else ()):
        if not isinstance(rule, Mapping):
            continue
        merged = copy.deepcopy(base)
        for block in _BLOCKS:
            change = rule.get(block)
            if isinstance(change, Mapping) and isinstance(merged.get(block), dict):
                merge(merged[block], change, block, {}, "rule")
        if isinstance(rule.get("budgets"), list):
            merged["budgets"] = copy.deepcopy(rule["budgets"])
        if rule.get("store_outage") is not None:
            merged["store_outage"] = rule["store_outage"]
        try:
            PolicySettings.model_validate(merged)
        except ValidationError as exc:
            errors = [error for error in exc.errors() if tuple(error["loc"]) not in own]
            if errors:
                found.append((index, errors))
    return found


def merge(
    base: dict[str, Any], change: Mapping[str, Any], path: str, sources: dict[str, str], by: str
) -> None:
    """Deep-merge ``change`` into ``base``, noting who set each leaf."""
    for key, value in change.items():
        leaf = f"{path}.{key}"
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            merge(base[key], value, leaf, sources, by)
        else:
            base[key] = copy.deepcopy(value)
            sources[leaf] = by


@dataclass(slots=True)
class CompiledPolicy:
    file: PolicyFile
    version: str
    """A content hash of the file: what ``GET /gateway/policy`` and rejections name."""
    source: str
    rules: list[CompiledRule] = field(default_factory=list)
    header_names: tuple[str, ...] = ()
    prices: list[tuple[re.Pattern[str], ModelPrice]] = field(default_factory=list)
    default_price: ModelPrice | None = None
    """The ``*`` entry of ``prices``: for models nothing else prices."""
    windows: tuple[tuple[str, int], ...] = ()
    """``windows`` as a tuple: hashable, for the cached window lookup."""
    capture_teams: frozenset[str] = frozenset()
    """``capture_content_teams``: teams whose message content goes on their spans."""
    _defaults: dict[str, Any] = field(default_factory=dict)
    _cache: OrderedDict[Caller, Effective] = field(default_factory=OrderedDict)
    _price_cache: OrderedDict[tuple[str, int], ModelPrice | None] = field(
        default_factory=OrderedDict
    )

    @classmethod
    def build(cls, file: PolicyFile, version: str, source: str) -> CompiledPolicy:
        rules = [compile_rule(i, rule) for i, rule in enumerate(file.rules)]
        names = sorted({name for r in rules for name, _ in r.header_conditions})
        if file.team_header:
            names.append(file.team_header.lower())
        policy = cls(
            file=file,
            version=version,
            source=source,
            rules=rules,
            header_names=tuple(names),
            prices=[
                (glob(pattern), from_policy(pattern, price))
                for pattern, price in file.prices.items()
                if pattern != "*"
            ],
            default_price=from_policy("*", file.prices["*"]) if "*" in file.prices else None,
            windows=tuple(file.windows.items()),
            capture_teams=frozenset(file.capture_content_teams),
            _defaults=file.defaults.model_dump(),
        )
        # Validate every rule merged over the defaults now, so a bad value fails the load;
        # every bad rule, so an operator sees all of them at once.
        errors = []
        for index, rule in enumerate(rules):
            try:
                policy._merge([rule])
            except ValidationError as exc:
                errors.append((index, exc.errors()))
        if errors:
            raise RuleError(errors)
        return policy

    def key_info(self, key_hash: str | None) -> KeyInfo | None:
        return self.file.keys.get(key_hash) if key_hash else None

    def team_of(
        self, key_hash: str | None, headers: Mapping[str, str], trusted: bool = False
    ) -> str | None:
        """The key's team from ``keys``, else ``team_header`` when a ``trusted`` proxy set it."""
        info = self.key_info(key_hash)
        if info is not None and info.team:
            return info.team
        if self.file.team_header and trusted:
            return headers.get(self.file.team_header) or None
        return None

    def resolve(self, caller: Caller) -> Effective:
        cached = self._cache.get(caller)
        if cached is not None:
            return cached
        info = self.key_info(caller.key_hash)
        key_name = info.name if info else None
        matched = [rule for rule in self.rules if rule.matches(caller, key_name)]
        effective = self._merge(matched)
        self._cache[caller] = effective
        if len(self._cache) > _CACHE_SIZE:
            self._cache.popitem(last=False)
        return effective

    def _merge(self, matched: list[CompiledRule]) -> Effective:
        data = copy.deepcopy(self._defaults)
        sources: dict[str, str] = {}
        for compiled in matched:
            rule = compiled.rule
            for block in _BLOCKS:
                change = getattr(rule, block)
                if change:
                    merge(data[block], change, block, sources, compiled.name)
            if rule.budgets is not None:
                data["budgets"] = copy.deepcopy(rule.budgets)
                sources["budgets"] = compiled.name
            if rule.store_outage is not None:
                data["store_outage"] = rule.store_outage
                sources["store_outage"] = compiled.name
        settings = PolicySettings.model_validate(data)
        return Effective(
            settings,
            tuple(r.name for r in matched),
            sources,
            self.version,
            model_allow=tuple(glob(p) for p in settings.limits.models.allow),
            model_deny=tuple(glob(p) for p in settings.limits.models.deny),
        )

    def price(self, model: str | None, now: float | None = None) -> ModelPrice | None:
        """The policy's entry for ``model``, else the built-in table's price, else the
        default (``*``); None: unpriced. Resolved once per model and UTC day (a price can
        change on a date), then a dictionary look-up."""
        if not model:
            return self.default_price
        if len(model) > MAX_MODEL_NAME:
            # No model is named like this: not looked up (genai-prices scans the name, 0.14 s
            # a megabyte, on the event loop) and not cached (it would hold the name).
            return self.default_price
        key = (model, int((time.time() if now is None else now) // DAY))
        if key in self._price_cache:
            return self._price_cache[key]
        found = next((price for pattern, price in self.prices if pattern.fullmatch(model)), None)
        if found is None:
            found = builtin(*key) or self.default_price
        self._price_cache[key] = found
        if len(self._price_cache) > _CACHE_SIZE:
            self._price_cache.popitem(last=False)
        return found
