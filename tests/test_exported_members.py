"""Each package's ``__all__`` names what it exports, and nothing in it is missing."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = [
    "gateway",
    "gateway.dialects",
    "gateway.store",
    "gateway.policy",
    "gateway.fake_provider",
]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_honest(name: str) -> None:
    module = importlib.import_module(name)
    exported = set(module.__all__)
    assert exported, f"{name} exports nothing"
    missing = [member for member in exported if not hasattr(module, member)]
    assert missing == []
    public = {
        member
        for member, value in vars(module).items()
        if not member.startswith("_")
        and getattr(value, "__module__", "").startswith(name)
        and not isinstance(value, type(importlib))
    }
    assert public <= exported, f"public but not in __all__: {sorted(public - exported)}"
