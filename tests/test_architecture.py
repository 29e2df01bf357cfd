"""``docs/architecture.md`` stays true: its code map names every module and package of the
gateway, and every path it names exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "architecture.md").read_text()
GATEWAY = REPO / "gateway"


def test_the_code_map_names_every_module_and_package() -> None:
    packages = [f"gateway/{path.relative_to(GATEWAY)}/" for path in _packages()]
    missing = [name for name in [*_modules(), *packages] if not _named(name)]
    assert not missing, f"docs/architecture.md's code map does not name: {missing}"


def _packages() -> list[Path]:
    return [path.parent for path in GATEWAY.rglob("__init__.py") if path.parent != GATEWAY]


def _modules() -> list[str]:
    """Every module of the gateway; the fake provider is a test double, named as a whole."""
    return [
        f"gateway/{path.relative_to(GATEWAY)}"
        for path in GATEWAY.rglob("*.py")
        if path.name not in ("__init__.py", "__main__.py") and "fake_provider" not in path.parts
    ]


def _named(name: str) -> bool:
    """By its path (from the repository or from ``gateway/``), or by its file name in a row
    of its package's or a parent package's (``| `gateway/compaction/` | ... `windows.py```)."""
    short = name.removeprefix("gateway/")
    if f"`{name}" in DOC or f"`{short}`" in DOC:
        return True
    package, _, file = name.rstrip("/").rpartition("/")
    while package != "gateway":  # a nested package's modules may sit in its parent's row
        rows = [line for line in DOC.splitlines() if line.startswith(f"| `{package}/")]
        if any(f"`{file}" in row for row in rows):
            return True
        package = package.rpartition("/")[0]
    return False


def test_every_path_the_document_names_exists() -> None:
    named = set(re.findall(r"`((?:gateway|dashboards|deploy|bench|docs|tests)/[\w./-]*)", DOC))
    assert named
    gone = sorted(path for path in named if not (REPO / path.rstrip("/")).exists())
    assert not gone, f"docs/architecture.md names paths that do not exist: {gone}"
