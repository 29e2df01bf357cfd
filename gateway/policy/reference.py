"""The policy reference (``docs/policy-reference.md``), generated from the schema's models."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel

from gateway.policy.model import (
    Budget,
    Context,
    KeyInfo,
    Limits,
    Loops,
    Match,
    ModelRules,
    PolicyFile,
    PolicySettings,
    Price,
    Rule,
)

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("The file", PolicyFile),
    ("Settings blocks (`defaults`, and what a rule may change)", PolicySettings),
    ("`limits`", Limits),
    ("`limits.models`", ModelRules),
    ("`budgets[]`", Budget),
    ("`loops`", Loops),
    ("`context`", Context),
    ("`rules[]`", Rule),
    ("`rules[].match`", Match),
    ("`keys.<hash>`", KeyInfo),
    ("`prices.<model glob>`", Price),
]

HEADER = """# Policy reference

Generated from `gateway/policy/model.py` by `gateway policy reference`; do not edit by hand.
The commented files in `policies/` show these settings in use.
"""


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation).replace("typing.", "")
    for prefix in ("gateway.policy.model.",):
        text = text.replace(prefix, "")
    if "Literal" in text:
        values = [
            getattr(v, "__name__", str(v))
            for arg in get_args(annotation)
            for v in (get_args(arg) or [arg])
        ]
        return " | ".join(v for v in values if v not in ("None", "NoneType")) or text
    text = text.replace("<class '", "").replace("'>", "")
    return text.replace("NoneType", "null").replace("None", "null")


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    default = field.default
    if isinstance(default, BaseModel):
        return "see below"
    return f"`{default!r}`".replace("None", "null")


def render() -> str:
    parts = [HEADER]
    for title, model in SECTIONS:
        parts.append(f"## {title}\n")
        if model.__doc__:
            parts.append(" ".join(model.__doc__.split()) + "\n")
        parts.append("| setting | type | default | meaning |\n| --- | --- | --- | --- |")
        for name, field in model.model_fields.items():
            meaning = " ".join((field.description or "").split()).replace("``", "`")
            meaning = meaning.replace("|", "\\|")
            kind = _type_name(field.annotation).replace("|", "\\|")
            parts.append(f"| `{name}` | {kind} | {_default(field)} | {meaning} |")
        parts.append("")
    return "\n".join(parts)
