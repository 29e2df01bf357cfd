"""The config reference (``docs/config-reference.md``), generated from ``Settings``: every key
as a dotted path, with its type, default, environment variable and the field's docstring."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from gateway.secret import Secret
from gateway.settings import _ENV, Settings

HEADER = """# Config reference

Generated from `gateway/settings.py` by `gateway config reference`; do not edit by hand.
Settings come from the defaults, then the config file (`gateway serve --config FILE`, YAML with
these keys, nested as the dots say), then the environment, then `serve`'s flags. The policy
(limits, loops, compaction) is a file of its own: see `policy-reference.md`.

| key | type | default | environment | meaning |
| --- | --- | --- | --- | --- |
"""


def keys(model: type[BaseModel] = Settings, prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """Every leaf setting as (dotted path, field), nested models walked in place; a mapping
    of names to models (``upstreams``) is one row, then its model's keys under ``<name>``."""
    for name, field in model.model_fields.items():
        nested, named = _model_of(field.annotation), _named_models(field.annotation)
        if nested is not None:
            yield from keys(nested, f"{prefix}{name}.")
        elif named is not None:
            yield f"{prefix}{name}.<name>", field
            yield from keys(named, f"{prefix}{name}.<name>.")
        else:
            yield f"{prefix}{name}", field


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model of a ``Model`` or ``Model | None`` field."""
    union = get_origin(annotation) in (Union, UnionType)
    for candidate in (annotation, *(get_args(annotation) if union else ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _named_models(annotation: Any) -> type[BaseModel] | None:
    """The model of a ``dict[str, Model]`` field."""
    if get_origin(annotation) is dict:
        return _model_of(get_args(annotation)[1])
    return None


def _environment() -> dict[str, list[str]]:
    """Each key path as the table shows it, with its variables; a variable that sets one
    entry of a mapping of names (``upstreams.openai.url``) says which entry."""
    found: dict[str, list[str]] = {}
    for variable, path in _ENV.items():
        shown: list[str] = []
        entry = None
        model: type[BaseModel] | None = Settings
        parts = iter(path)
        for part in parts:
            shown.append(part)
            field = model.model_fields.get(part) if model is not None else None
            annotation = field.annotation if field is not None else None
            model = _named_models(annotation)
            if model is not None:
                entry = next(parts, None)
                shown.append("<name>")
            else:
                model = _model_of(annotation)
        cell = f"`{variable}` ({entry})" if entry else f"`{variable}`"
        found.setdefault(".".join(shown), []).append(cell)
    return found


def _type_name(annotation: Any) -> str:
    named = _named_models(annotation)
    if named is not None:
        return "mapping"
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        name = "secret string" if annotation is Secret else annotation.__name__
        return "path" if issubclass(annotation, Path) else name
    if get_origin(annotation) is Literal:
        return " | ".join(str(value) for value in get_args(annotation))
    args = get_args(annotation)
    if get_origin(annotation) in (Union, UnionType) and any(get_origin(a) is Literal for a in args):
        return " | ".join("null" if arg is NoneType else _type_name(arg) for arg in args)
    text = str(annotation).replace("typing.", "").replace("pydantic.types.", "")
    text = text.replace("pathlib.", "").replace("Path", "path")
    text = text.replace("gateway.secret.Secret", "secret string")
    return text.replace("NoneType", "null").replace("None", "null")


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    default = field.get_default(call_default_factory=True)
    if isinstance(default, BaseModel):
        return "see below"
    if default is None:
        return "none"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"  # as YAML and the environment spell it
    if isinstance(default, list | dict) and not default:
        return "`[]`" if isinstance(default, list) else "`{}`"
    return f"`{default}`"


def render() -> str:
    environment = _environment()
    rows = []
    for path, field in keys():
        described = [field.description or ""]
        named = _named_models(field.annotation)
        if named is not None and named.__doc__:
            described.append(named.__doc__)  # what one entry is, e.g. a plain URL's meaning
        meaning = " ".join(" ".join(described).split()).replace("``", "`")
        default = _default(field)
        if named is not None:  # the entries every gateway has, whatever the file says
            present = getattr(Settings(), path.split(".")[-2])
            default = ", ".join(f"`{name}`" for name in present)
        cells = (
            f"`{path}`",
            _type_name(field.annotation),
            default,
            ", ".join(environment.get(path, [])),
            meaning,
        )
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return HEADER + "\n".join(rows) + "\n"
