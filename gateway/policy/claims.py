"""Client claims: what a rule matches on that the client asserts rather than proves.

The credential (``key``, and ``team`` from ``keys`` or a trusted proxy's ``team_header``) is
identity. The agent (``X-Gateway-Agent``, User-Agent), the mode (``X-Gateway-Mode``, the
User-Agent), the session name and any header are claims: any client can send them. A rule that
matches only on claims and loosens a setting is one a client can opt into, so ``gateway policy
check`` warns about it (``loosening``) and ``policy explain`` marks what a claim decided
(``claims_of``).

"Looser" is judged against every value the setting could have had before the rule: the
defaults, and each earlier rule's value (a caller may match any of them), so a claim that lifts
a key's own tighter limit is found too.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from gateway.policy.model import Budget, PolicyFile, Rule

IDENTITY = ("key", "team")
CLAIMS = ("agent", "session_name", "mode")
_ACTION_STRENGTH = {"flag": 0, "reject": 1, "pause": 2}
_LIMITS = ("max_turns", "max_session_tokens", "max_request_input_tokens", "max_body_bytes")
_LOOP_THRESHOLDS = (
    "identical_tool_calls",
    "repeated_requests",
    "turn_rate_factor",
    "min_turns_per_minute",
)


@dataclass(slots=True, frozen=True)
class ClaimWarning:
    rule: str
    claims: tuple[str, ...]
    """What the rule matches on that a client asserts (``agent``, ``header x-tier``)."""
    setting: str
    """The setting path it loosens (``limits.max_turns``, ``budgets``)."""
    value: str
    before: str
    """The tighter value it replaces, and where that came from."""

    def message(self) -> str:
        return (
            f"rule '{self.rule}' matches only on client claims ({', '.join(self.claims)}) and "
            f"loosens {self.setting} to {self.value} (from {self.before}): any client can "
            f"send those; match on key or team to make it a grant"
        )


def claims_of(rule: Rule) -> tuple[str, ...]:
    """The claims a rule matches on, in a stable order."""
    match = rule.match
    found = [name for name in CLAIMS if getattr(match, name) is not None]
    found.extend(f"header {name.lower()}" for name in sorted(match.headers))
    return tuple(found)


def claim_only(rule: Rule) -> bool:
    """Matches on a claim and on nothing the credential proves."""
    match = rule.match
    return bool(claims_of(rule)) and all(getattr(match, name) is None for name in IDENTITY)


def loosening(file: PolicyFile) -> list[ClaimWarning]:
    """Every claim-only rule's setting that is looser than a value it could replace."""
    warnings: list[ClaimWarning] = []
    # Setting path -> the values seen so far, each with where it came from.
    seen: dict[str, list[tuple[Any, str]]] = {}
    defaults = file.defaults.model_dump()
    for path, value in _settings(defaults):
        seen[path] = [(value, "the defaults")]
    seen["store_outage"] = [(defaults["store_outage"], "the defaults")]
    for index, rule in enumerate(file.rules):
        name = rule.name or f"rules[{index}]"
        changes = list(_rule_settings(rule))
        if claim_only(rule):
            for path, value in changes:
                looser = _looser_than(path, value, seen.get(path, []))
                if looser is not None:
                    warnings.append(ClaimWarning(name, claims_of(rule), path, _show(value), looser))
        for path, value in changes:
            seen.setdefault(path, []).append((value, f"rule '{name}'"))
    return warnings


def _settings(data: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """The settings this module compares, from a complete (dumped) settings block."""
    return _compared(data["limits"], data["loops"], data["context"], data["budgets"])


def _rule_settings(rule: Rule) -> Iterator[tuple[str, Any]]:
    """What a rule sets of the compared settings (rules name only what they change)."""
    budgets = None if rule.budgets is None else _budgets(rule.budgets)
    yield from _compared(rule.limits or {}, rule.loops or {}, rule.context or {}, budgets)
    if rule.store_outage is not None:
        yield "store_outage", rule.store_outage


def _compared(
    limits: dict[str, Any],
    loops: dict[str, Any],
    context: dict[str, Any],
    budgets: list[dict[str, Any]] | None,
) -> Iterator[tuple[str, Any]]:
    """The compared settings present in these blocks, by path (a complete block has all)."""
    for name in _LIMITS:
        if name in limits:
            yield f"limits.{name}", limits[name]
    models = limits.get("models")
    if isinstance(models, dict):
        for part in ("allow", "deny"):
            if part in models:
                yield f"limits.models.{part}", models[part]
    if budgets is not None:
        yield "budgets", budgets
    for name in _LOOP_THRESHOLDS:
        if name in loops:
            yield f"loops.{name}", loops[name]
    if "action" in loops:
        yield "loops.action", loops["action"]
    if "strategies" in context:
        yield "context.strategies", context["strategies"]


def _budgets(raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A rule's budgets with their defaults filled in (the file was validated at load)."""
    try:
        return [Budget.model_validate(b).model_dump() for b in raw]
    except ValidationError:
        return raw


def _looser_than(path: str, value: Any, before: list[tuple[Any, str]]) -> str | None:
    """The first earlier value ``value`` loosens, shown with its origin; None if none."""
    compare = _COMPARE.get(path, _higher_limit)
    for old, origin in before:
        if compare(value, old):
            return f"{_show(old)} in {origin}"
    return None


def _higher_limit(new: Any, old: Any) -> bool:
    """``None`` is no limit: the loosest of all."""
    if old is None:
        return False
    return new is None or new > old


def _more_allowed(new: Any, old: Any) -> bool:
    """A pattern the old list does not cover (``gpt-4o-mini`` is covered by ``gpt-4o*``)."""
    return any(not _covered(pattern, old) for pattern in new)


def _fewer_denied(new: Any, old: Any) -> bool:
    return any(not _covered(pattern, new) for pattern in old)


def _covered(pattern: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(pattern.lower(), other.lower()) for other in patterns)


def _weaker_budgets(new: Any, old: Any) -> bool:
    """A budget of before that is gone, or raised (matched by whose spending and window)."""
    for budget in old:
        same = [
            b for b in new if (b.get("per"), b.get("window")) == (budget["per"], budget["window"])
        ]
        if not same:
            return True
        for amount in ("max_tokens", "max_cost"):
            if budget.get(amount) is not None and all(
                _higher_limit(b.get(amount), budget[amount]) for b in same
            ):
                return True
    return False


def _weaker_action(new: Any, old: Any) -> bool:
    return _ACTION_STRENGTH.get(new, 0) < _ACTION_STRENGTH.get(old, 0)


def _fail_open(new: Any, old: Any) -> bool:
    """``open`` serves from memory what ``closed`` refuses while the store is down."""
    return bool(new == "open" and old == "closed")


def _fewer_strategies(new: Any, old: Any) -> bool:
    return any(strategy not in new for strategy in old)


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "limits.models.allow": _more_allowed,
    "limits.models.deny": _fewer_denied,
    "budgets": _weaker_budgets,
    "loops.action": _weaker_action,
    "context.strategies": _fewer_strategies,
    "store_outage": _fail_open,
}


def _show(value: Any) -> str:
    if value is None:
        return "no limit"
    if isinstance(value, list):
        return "[" + ", ".join(_show_item(v) for v in value) + "]"
    return str(value)


def _show_item(value: Any) -> str:
    if isinstance(value, dict):
        shown = {k: v for k, v in value.items() if v is not None}
        return "{" + ", ".join(f"{k}: {v}" for k, v in shown.items()) + "}"
    return str(value)
