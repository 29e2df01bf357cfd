"""Parsing the x-fake-scenario header."""

from __future__ import annotations

import pytest

from gateway.fake_provider import ToolCallSpec
from gateway.fake_provider.scenario import Scenario, ScenarioError, parse_scenario


def test_no_header_means_defaults() -> None:
    assert parse_scenario([]) == Scenario()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            'tool_loop:Read:{"file_path": "/x"}',
            Scenario(tool_call=ToolCallSpec("Read", {"file_path": "/x"})),
        ),
        ("tool:ls:", Scenario(tool_call=ToolCallSpec("ls", {}))),
        ("tool:ls", Scenario(tool_call=ToolCallSpec("ls", {}))),
        ("error:429", Scenario(error_status=429)),
        ("cut_stream:3", Scenario(cut_after=3)),
        ("no_usage", Scenario(no_usage=True)),
        ("slow:1.5", Scenario(delay=1.5)),
        ("token_factor:1.2", Scenario(token_factor=1.2)),
        ("context_window:5000", Scenario(context_window=5000)),
        ("context_window:100;no_usage", Scenario(context_window=100, no_usage=True)),
        ("slow:0.1; error:500", Scenario(delay=0.1, error_status=500)),
    ],
)
def test_values(value: str, expected: Scenario) -> None:
    assert parse_scenario([value]) == expected


def test_semicolon_inside_tool_arguments_is_kept() -> None:
    scenario = parse_scenario(['tool:sh:{"cmd": "a; b"};no_usage'])
    assert scenario.tool_call == ToolCallSpec("sh", {"cmd": "a; b"})
    assert scenario.no_usage


def test_several_header_values_combine() -> None:
    assert parse_scenario(["no_usage", "cut_stream:1"]) == Scenario(no_usage=True, cut_after=1)


@pytest.mark.parametrize(
    "value",
    [
        "boom",
        "error:200",
        "error:abc",
        "cut_stream:-1",
        "tool::{}",
        "tool:x:[1]",
        "tool:x:{",
        "no_usage:1",
        "context_window:",
        "context_window:-1",
        "context_window:1.5",
    ],
)
def test_malformed_values_raise(value: str) -> None:
    with pytest.raises(ScenarioError):
        parse_scenario([value])
