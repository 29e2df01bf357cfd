"""Reading a policy file: YAML to validated models to a ``CompiledPolicy``, with errors that
name the file, the line and what is wrong."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.policy.compiled import CompiledPolicy, RuleError
from gateway.policy.model import PolicyFile

DEFAULT_POLICY = "default.yaml"


@dataclass(slots=True)
class PolicyProblem:
    line: int | None
    where: str
    message: str

    def __str__(self) -> str:
        at = f"line {self.line}: " if self.line else ""
        return f"{at}{self.where}: {self.message}" if self.where else f"{at}{self.message}"


class PolicyError(Exception):
    """A policy file that cannot be used; the policy in force stays."""

    def __init__(self, source: str, problems: list[PolicyProblem]) -> None:
        self.source = source
        self.problems = problems
        super().__init__("\n".join(f"{source}: {p}" for p in problems))


def packaged_default() -> tuple[str, str]:
    """The policy a gateway runs without ``--policy``: text and a name for it."""
    text = (resources.files("gateway.policy") / DEFAULT_POLICY).read_text()
    return text, f"(packaged) {DEFAULT_POLICY}"


def parse_policy(text: str, source: str) -> CompiledPolicy:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise PolicyError(source, [PolicyProblem(line, "", f"not valid YAML: {exc}")]) from exc
    if not isinstance(data, dict):
        raise PolicyError(source, [PolicyProblem(1, "", "expected a mapping with `version`")])
    version = hashlib.sha256(text.encode()).hexdigest()[:12]
    try:
        file = PolicyFile.model_validate(data)
        return CompiledPolicy.build(file, version, source)
    except ValidationError as exc:
        raise PolicyError(source, _problems(exc, node, ())) from exc
    except RuleError as exc:
        raise PolicyError(source, _problems(exc.error, node, ("rules", exc.index))) from exc


def _problems(
    error: ValidationError, root: yaml.Node | None, prefix: tuple[str | int, ...]
) -> list[PolicyProblem]:
    problems = []
    for item in error.errors():
        loc = prefix + tuple(item["loc"])
        # Dotted paths read like the file: rules[0].limits.max_turns
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        problems.append(PolicyProblem(_line_of(root, loc), where, item["msg"]))
    return problems


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The line of the deepest node of ``loc`` that exists in the file."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part):
                    child = value
                    line = key.start_mark.line + 1
                    break
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line
