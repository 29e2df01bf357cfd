"""``gateway policy explain``: the effective settings, each with the rule that set it."""

from __future__ import annotations

from typing import Any

from gateway.cli.formatting import table
from gateway.policy.claims import claims_of
from gateway.policy.compiled import CompiledPolicy, Effective
from gateway.policy.model import Budget


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
    # A list of budgets does not fit a cell: its line says how many, a table below says what.
    leaves.append(("budgets", f"{len(budgets)} (below)" if budgets else "none"))
    width = max(len(path) for path, _ in leaves)
    value_width = max(30, *(len(_show(value)) for _, value in leaves))
    marks = claim_marks(policy, effective)
    for path, value in leaves:
        source = effective.source(path)
        if path in marks:
            source += f"  (claim: {', '.join(marks[path])})"
        lines.append(f"{path:<{width}}  {_show(value):<{value_width}}  {source}".rstrip())
    if budgets:
        lines += ["", "budgets:", *budget_table(budgets)]
    return lines


def budget_table(budgets: list[Budget]) -> list[str]:
    """One row a budget, a column a field (in the schema's order), indented under its title."""
    names = list(Budget.model_fields)
    rows = [[name.replace("_", " ") for name in names]]
    rows += [[_cell(getattr(budget, name)) for name in names] for budget in budgets]
    return ["  " + line for line in table(rows[0], rows[1:]).splitlines()]


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


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:,}"  # 2,000,000 tokens, read at a glance
    return str(value)


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)
