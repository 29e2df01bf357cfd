"""The layout rules no linter checks: every module of the gateway has tests that a reader can
find (``tests/README.md``), and background tasks start only where they are kept and cancelled.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GATEWAY = REPO / "gateway"
MAP = (REPO / "tests" / "README.md").read_text()
ROW = re.compile(r"^\| `(gateway/[\w/]+\.py)` \| (.+) \|$", re.MULTILINE)


def modules() -> list[str]:
    """Every module under ``gateway/``, read from the tree as it is now."""
    return sorted(
        path.relative_to(REPO).as_posix()
        for path in GATEWAY.rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    )


def mirror(module: str) -> Path:
    """``gateway/a/b.py`` -> ``tests/a/test_b.py``."""
    folder, _, name = module.removeprefix("gateway/").rpartition("/")
    return REPO / "tests" / folder / f"test_{name}"


def mapped() -> dict[str, list[str]]:
    return {
        module: re.findall(r"`(tests/[\w/]+\.py)`", covered) for module, covered in ROW.findall(MAP)
    }


def test_every_module_has_a_mirror_or_a_row_in_the_map() -> None:
    rows = mapped()
    missing = [m for m in modules() if not mirror(m).exists() and not rows.get(m)]
    assert not missing, f"no test module mirrors these, and tests/README.md maps none: {missing}"


def test_the_map_names_modules_and_test_files_that_exist() -> None:
    rows = mapped()
    assert rows
    gone = sorted(m for m in rows if not (REPO / m).exists())
    assert not gone, f"tests/README.md maps modules that do not exist: {gone}"
    absent = sorted({t for tests in rows.values() for t in tests if not (REPO / t).exists()})
    assert not absent, f"tests/README.md names test files that do not exist: {absent}"


_STARTERS = {"create_task", "ensure_future"}


def _owns_tasks(function: ast.AsyncFunctionDef | ast.FunctionDef) -> bool:
    """A cleanup context (an async generator: the task is cancelled after its ``yield``), or
    the ``open()`` of a resource one opens (its ``close()`` cancels it)."""
    if function.name == "open":
        return True
    return isinstance(function, ast.AsyncFunctionDef) and any(
        isinstance(node, ast.Yield) for node in ast.walk(function)
    )


def _task_starts(tree: ast.AST) -> list[tuple[int, bool, bool]]:
    """Each ``.create_task(`` / ``.ensure_future(`` call: its line, whether a cleanup context
    (or ``open``) encloses it, and whether the task is kept (not a bare statement)."""
    found: list[tuple[int, bool, bool]] = []

    def visit(node: ast.AST, owned: bool, parent: ast.AST | None) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            owned = owned or _owns_tasks(node)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _STARTERS
        ):
            found.append((node.lineno, owned, not isinstance(parent, ast.Expr)))
        for child in ast.iter_child_nodes(node):
            visit(child, owned, node)

    visit(tree, False, None)
    return found


def test_tasks_start_only_where_they_are_kept_and_cancelled() -> None:
    """ruff bans ``asyncio.create_task``; ``loop.create_task`` is a method call ruff's banned-API
    list cannot see, so this is the same rule for it (``pyproject.toml`` has the wording)."""
    wrong: list[str] = []
    for path in sorted(GATEWAY.rglob("*.py")):
        for line, owned, kept in _task_starts(ast.parse(path.read_text())):
            if not (owned and kept):
                wrong.append(f"{path.relative_to(REPO)}:{line}")
    assert not wrong, f"a task started outside a cleanup context, or not kept: {wrong}"


def test_the_task_check_sees_what_it_should() -> None:
    loose = "async def handler():\n    asyncio.get_running_loop().create_task(work())\n"
    kept = (
        "async def _ctx(app):\n    task = asyncio.get_running_loop().create_task(work())\n"
        "    yield\n    task.cancel()\n"
    )
    dropped = "async def _ctx(app):\n    loop.create_task(work())\n    yield\n"
    assert _task_starts(ast.parse(loose)) == [(2, False, False)]
    assert _task_starts(ast.parse(kept)) == [(2, True, True)]
    assert _task_starts(ast.parse(dropped)) == [(2, True, False)]
