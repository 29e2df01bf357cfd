"""Reading a policy file: YAML to validated models to a ``CompiledPolicy``, with errors that
name the file, the line and what is wrong.

Every way a file can be wrong (unreadable, not UTF-8, not YAML, too big, too deep, an alias
bomb, too many rules, an invalid setting) is a ``PolicyError``: nothing else escapes
``read_policy`` or ``parse_policy``. The limits are checked on the parser's event stream,
before any node is built, so an oversized or hostile file costs little to refuse.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from gateway.policy.compiled import CompiledPolicy, RuleError, raw_rule_errors
from gateway.policy.model import PolicyFile

DEFAULT_POLICY = "default.yaml"
MAX_POLICY_BYTES = 1024 * 1024
"""A policy of 10,000 rules is about 1 MB of YAML; anything bigger is a mistake."""
MAX_DEPTH = 64
"""Nesting of mappings and lists; a policy needs about six levels."""
MAX_ALIASES = 1000
"""Alias references (``*name``) in one file."""
MAX_NODES = 500_000
"""Nodes the file stands for once every alias is expanded: an alias bomb (aliases of aliases
of aliases) is a few lines that stand for billions."""
MAX_RULES = 10_000

# libyaml when present: composing and constructing a 1 MB file takes a few seconds in pure
# Python and well under one in C.
_LOADER: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


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


def read_policy(path: Path) -> CompiledPolicy:
    """Read, decode, parse, validate and compile a policy file (blocking: call it on a
    thread). Raises ``PolicyError`` only."""
    source = str(path)
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_POLICY_BYTES + 1)
    except OSError as exc:
        raise _error(source, None, f"cannot read the file: {exc.strerror or exc}") from exc
    if len(raw) > MAX_POLICY_BYTES:
        raise _error(source, None, _too_big())
    return parse_policy(decode_utf8(raw, source), source)


def decode_utf8(raw: bytes, source: str) -> str:
    """A file's bytes as text; not UTF-8 is a ``PolicyError`` naming the line and column."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        message = f"not valid UTF-8: byte 0x{raw[exc.start]:02x} at column {column}"
        raise _error(source, line, message) from exc


def parse_policy(text: str, source: str) -> CompiledPolicy:
    """Policy text to a compiled policy. Raises ``PolicyError`` only."""
    encoded = text.encode("utf-8", errors="surrogatepass")
    if len(encoded) > MAX_POLICY_BYTES:
        raise _error(source, None, _too_big())
    data, node = parse_yaml(text, source)
    if not isinstance(data, dict):
        raise _error(source, 1, "expected a mapping with `version`")
    rules = data.get("rules")
    if isinstance(rules, list) and len(rules) > MAX_RULES:
        line = _line_of(node, ("rules",))
        raise _error(source, line, f"{len(rules)} rules, more than the {MAX_RULES} allowed")
    version = hashlib.sha256(encoded).hexdigest()[:12]
    try:
        file = PolicyFile.model_validate(data)
        return CompiledPolicy.build(file, version, source)
    except ValidationError as exc:
        # Every error in one pass: the rules' settings too, which are checked only merged
        # over the defaults (``RuleError``), else they would show once the rest is fixed.
        problems = _problems(exc.errors(), node, ())
        reported = {problem.where for problem in problems}
        for index, errors in raw_rule_errors(data):
            found = _problems(errors, node, ("rules", index))
            problems.extend(p for p in found if p.where not in reported)
        raise PolicyError(source, _by_line(problems)) from None
    except RuleError as exc:
        problems = [
            problem
            for index, errors in exc.errors
            for problem in _problems(errors, node, ("rules", index))
        ]
        raise PolicyError(source, problems) from None
    except RecursionError:
        raise _error(source, None, "nested too deeply to validate") from None


def parse_yaml(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    """YAML text to its data and its node tree (for ``locate``), within the limits above
    (depth, aliases, expansion); a ``PolicyError`` otherwise. Also reads the gateway's config
    file for ``gateway config check``: one reader of hostile YAML, not two."""
    try:
        _check_shape(text)
        loader = _LOADER(text)
        try:
            node = loader.get_single_node()
            # Built from the composed node: the file is parsed once, not once per use.
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except _Limit as exc:
        raise _error(source, exc.line, exc.message) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise _error(source, line, f"not valid YAML: {exc}") from None
    except (RecursionError, ValueError, TypeError) as exc:
        raise _error(source, None, f"cannot be read as YAML: {exc}") from None
    return data, node


def locate(errors: list[ErrorDetails], root: yaml.Node | None) -> list[PolicyProblem]:
    """pydantic's errors for a document read by ``parse_yaml``, each at its line, in the
    file's order."""
    return _by_line(_problems(errors, root, ()))


class _Limit(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


def _check_shape(text: str) -> None:
    """Depth and alias expansion, on the event stream (no recursion, nothing built)."""
    # Per open collection: how many values it stands for so far, and its anchor.
    open_: list[tuple[int, str | None]] = []
    sizes: dict[str, int] = {}
    aliases = total = 0

    def count(size: int) -> None:
        nonlocal total
        total += size
        if open_:
            so_far, anchor = open_[-1]
            open_[-1] = (so_far + size, anchor)

    for event in yaml.parse(text, Loader=_LOADER):
        line = event.start_mark.line + 1 if event.start_mark is not None else 0
        if isinstance(event, yaml.CollectionStartEvent):
            if len(open_) >= MAX_DEPTH:
                raise _Limit(line, f"nested more than {MAX_DEPTH} levels deep")
            total += 1
            open_.append((1, event.anchor))
        elif isinstance(event, yaml.CollectionEndEvent):
            size, anchor = open_.pop()
            if anchor is not None:
                sizes[anchor] = size
            if open_:
                open_[-1] = (open_[-1][0] + size, open_[-1][1])
        elif isinstance(event, yaml.ScalarEvent):
            if event.anchor is not None:
                sizes[event.anchor] = 1
            count(1)
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise _Limit(line, f"more than {MAX_ALIASES} aliases")
            count(sizes.get(event.anchor or "", 1))
        if total > MAX_NODES:
            raise _Limit(line, f"its aliases stand for more than {MAX_NODES} values (alias bomb)")


def _too_big() -> str:
    return f"the file is larger than {MAX_POLICY_BYTES // 1024} KiB, the most a policy may be"


def _error(source: str, line: int | None, message: str) -> PolicyError:
    return PolicyError(source, [PolicyProblem(line, "", message)])


def _problems(
    errors: list[ErrorDetails], root: yaml.Node | None, prefix: tuple[str | int, ...]
) -> list[PolicyProblem]:
    problems = []
    for item in errors:
        loc = prefix + tuple(item["loc"])
        # Dotted paths read like the file: rules[0].limits.max_turns
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        problems.append(PolicyProblem(_line_of(root, loc), where, item["msg"]))
    return problems


def _by_line(problems: list[PolicyProblem]) -> list[PolicyProblem]:
    """In the file's order, as an operator fixes them (stable: same line, pydantic's order)."""
    return sorted(problems, key=lambda problem: problem.line or 0)


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
