"""Nothing in the project reads a path outside the repository.

A fresh clone has nothing beside it: the recorded agent requests the tests replay live in
``tests/fixtures``, and a reference to a sibling folder (``../shared``) or to this machine's
directories would pass here and fail for every user. A static check of the source is cheap and
runs with the suite; a second copy of the suite run from a bare clone would not be.

What counts as reading outside: a path built from ``__file__`` that climbs above the repository
(``parents[N]``, chained ``.parent``), a relative path that starts by climbing (``"../x"``,
``Path(...) / ".."``), and an absolute path into a home or work directory.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKED = ("gateway", "tests", "bench", "dashboards")
_OUTSIDE_PREFIXES = ("/work/", "/home/", "/root/", "/Users/", "~/")


def python_files() -> Iterator[Path]:
    for top in CHECKED:
        for path in sorted((REPO / top).rglob("*.py")):
            # This file names the ways out as its examples.
            skip = "node_modules" in path.parts or path == Path(__file__).resolve()
            if not skip:
                yield path


def escapes(source: str, path: Path) -> list[str]:
    """Each place in ``source`` (the file at ``path``) that reaches outside the repository."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        reached = _reached_from_file(node, path)
        if reached is not None and not reached.is_relative_to(REPO):
            found.append(f"line {node.lineno}: climbs to {reached} from __file__")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and _climbs(node.right):
            found.append(f"line {node.lineno}: joins a path that climbs ('..')")
        if isinstance(node, ast.Call) and node.args and _opens_climbing(node):
            found.append(f"line {node.lineno}: opens a path that climbs ('..')")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if "../shared" in text or text.startswith(_OUTSIDE_PREFIXES):
                found.append(f"line {node.lineno}: names a path outside: {text[:60]!r}")
    return found


def _reached_from_file(node: ast.AST, path: Path) -> Path | None:
    """The folder ``Path(__file__)...parents[N]`` or ``....parent.parent`` names, if ``node``
    is such an expression (the outermost of a chain is what counts)."""
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "parents"
        and _mentions_file(node.value.value)
        and isinstance(node.slice, ast.Constant)
        and isinstance(node.slice.value, int)
    ):
        return path.parents[min(node.slice.value, len(path.parents) - 1)]
    depth = 0
    inner: ast.AST = node
    while isinstance(inner, ast.Attribute) and inner.attr == "parent":
        depth += 1
        inner = inner.value
    if depth and _mentions_file(inner):
        return path.parents[min(depth - 1, len(path.parents) - 1)]
    return None


def _mentions_file(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(node))


def _climbs(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and (node.value == ".." or node.value.startswith(("../", "..\\")))
    )


def _opens_climbing(call: ast.Call) -> bool:
    return _is_path_call(call.func) and _climbs(call.args[0])


def _is_path_call(func: ast.AST) -> bool:
    name = (
        func.id
        if isinstance(func, ast.Name)
        else func.attr
        if isinstance(func, ast.Attribute)
        else ""
    )
    return name in {"Path", "PurePath", "open", "read_text", "read_bytes"}


def test_nothing_reads_outside_the_repository() -> None:
    found = {
        str(path.relative_to(REPO)): hits
        for path in python_files()
        if (hits := escapes(path.read_text(encoding="utf-8"), path))
    }
    assert found == {}


@pytest.mark.parametrize(
    "source",
    [
        'FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"',
        "ROOT = Path(__file__).resolve().parent.parent.parent",
        'DATA = HERE / ".." / "shared"',
        'DATA = Path("../shared/fixtures/codex.json")',
        'text = open("/work/shared/CLIENTS.md").read()',
    ],
)
def test_the_check_finds_each_way_out(source: str) -> None:
    # As if the line were in tests/test_x.py: two levels up is outside the repository.
    assert escapes(source, REPO / "tests" / "test_x.py")


def test_the_check_allows_paths_inside() -> None:
    source = (
        "REPO = Path(__file__).resolve().parents[1]\n"
        'DOC = Path(__file__).parent.parent / "docs"\n'
        'url = "/v1/../v1/chat/completions"\n'
    )
    assert escapes(source, REPO / "tests" / "test_x.py") == []
