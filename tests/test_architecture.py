"""``docs/architecture.md`` stays true: its code map names every module and package of the
gateway, and every path it names exists."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "architecture.md").read_text()
GATEWAY = REPO / "gateway"


def test_the_code_map_names_every_module_and_package() -> None:
    modules = [
        f"gateway/{path.name}"
        for path in GATEWAY.glob("*.py")
        if path.name not in ("__init__.py", "__main__.py")
    ]
    packages = [
        f"gateway/{path.name}/" for path in GATEWAY.iterdir() if (path / "__init__.py").exists()
    ]
    missing = [name for name in modules + packages if f"`{name}" not in DOC]
    assert not missing, f"docs/architecture.md's code map does not name: {missing}"


def test_every_path_the_document_names_exists() -> None:
    named = set(re.findall(r"`((?:gateway|dashboards|deploy|bench|docs|tests)/[\w./-]*)", DOC))
    assert named
    gone = sorted(path for path in named if not (REPO / path.rstrip("/")).exists())
    assert not gone, f"docs/architecture.md names paths that do not exist: {gone}"
