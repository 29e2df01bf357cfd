"""``gateway policy explain``: the effective settings, each with the rule that set it."""

from __future__ import annotations

from typing import Any

from gateway.policy.claims import claims_of
from gateway.policy.compiled import CompiledPolicy, Effective


def flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``limits.models.allow`` style paths to leaf values (lists stay whole)."""
    if isinstance(value, dict):
        leaves = []
        for key, child in value.items():
            leaves.extend(flatten(child, f"{prefix}.{key}" if prefix else key))
        return leaves
    return [(prefix, value)]


def explain_lines(policy: CompiledPolicy, effective: Effective) -> list[str]:
    lines = [
        f"policy {policy.source} (version {policy.version})",
        f"matching rules: {', '.join(effective.rules) or 'none (defaults only)'}",
        "",
    ]
    leaves = flatten(effective.settings.model_dump(exclude={"budgets"}))
    budgets = effective.settings.budgets
    leaves.append(("budgets", [b.model_dump(exclude_none=True) for b in budgets] or "none"))
    width = max(len(path) for path, _ in leaves)
    marks = claim_marks(policy, effective)
    for path, value in leaves:
        source = effective.source(path)
        if path in marks:
            source += f"  (claim: {', '.join(marks[path])})"
        lines.append(f"{path:<{width}}  {_show(value):<30}  {source}")
    return lines


def claim_marks(policy: CompiledPolicy, effective: Effective) -> dict[str, list[str]]:
    """Setting path -> the client claims of the rule that set it (only where it had any):
    what the caller asserted, not proved, decided that setting."""
    by_rule: dict[str, list[str]] = {}
    for compiled in policy.rules:
        claims = by_rule.setdefault(compiled.name, [])
        claims.extend(c for c in claims_of(compiled.rule) if c not in claims)
    leaves = flatten(effective.settings.model_dump(exclude={"budgets"}))
    paths = [path for path, _ in leaves] + ["budgets"]
    marks: dict[str, list[str]] = {}
    for path in paths:
        decided = by_rule.get(effective.source(path))
        if decided:
            marks[path] = decided
    return marks


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)
