"""The policy reference in docs/ is the one the schema generates: docs cannot drift."""

from __future__ import annotations

from pathlib import Path

from gateway.policy.reference import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "policy-reference.md"


def test_reference_doc_is_generated_from_the_models() -> None:
    assert DOC.read_text() == render(), "run: uv run gateway policy reference > " + str(DOC)


def test_every_setting_is_described() -> None:
    undocumented = [line for line in render().splitlines() if line.endswith("|  |")]
    assert undocumented == []
