"""The config reference (``docs/config-reference.md``), generated from ``Settings``: every key
as a dotted path, with its type, default, environment variable and the field's docstring."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

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
    """Every leaf setting as (dotted path, field), nested models walked in place."""
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from keys(annotation, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type) and not getattr(annotation, "__args__", None):
        name = "secret string" if annotation is SecretStr else annotation.__name__
        return "path" if issubclass(annotation, Path) else name
    if get_origin(annotation) is Literal:
        return " | ".join(str(value) for value in get_args(annotation))
    text = str(annotation).replace("typing.", "").replace("pydantic.types.", "")
    text = text.replace("pathlib.", "").replace("Path", "path").replace("SecretStr", "secret")
    return text.replace("NoneType", "null").replace("None", "null")


def _default(field: FieldInfo) -> str:
    default = field.default
    if default is None:
        return "none"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"  # as YAML and the environment spell it
    if isinstance(default, list | dict) and not default:
        return "`[]`" if isinstance(default, list) else "`{}`"
    return f"`{default}`"


def render() -> str:
    env_of = {path: name for name, path in _ENV.items()}
    rows = []
    for path, field in keys():
        env = env_of.get(tuple(path.split(".")))
        meaning = " ".join((field.description or "").split()).replace("``", "`")
        cells = (
            f"`{path}`",
            _type_name(field.annotation),
            _default(field),
            f"`{env}`" if env else "",
            meaning,
        )
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return HEADER + "\n".join(rows) + "\n"
