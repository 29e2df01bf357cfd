"""Token estimates and the CLI's configuration."""

from __future__ import annotations

import os

import orjson

from gateway.fake_provider import FakeProviderConfig, ToolCallSpec
from gateway.fake_provider.__main__ import parse_args
from gateway.fake_provider.usage import input_tokens, output_tokens


def test_bytes_mode_is_json_length_over_four() -> None:
    parts: list[object] = [[{"role": "user", "content": "x" * 400}], None]
    assert input_tokens(parts, "bytes", 1.0) == len(orjson.dumps(parts)) // 4
    assert input_tokens(parts, "bytes", 2.0) == 2 * (len(orjson.dumps(parts)) // 4)


def test_tiktoken_mode_skips_ids_and_counts_schemas() -> None:
    messages = [{"role": "user", "id": "msg_" + "z" * 80, "content": "hello world"}]
    assert input_tokens([messages], "tiktoken", 1.0) == 2
    tools = [{"name": "f", "parameters": {"type": "object", "properties": {}}}]
    assert input_tokens([messages, tools], "tiktoken", 1.0) > 2
    assert os.environ["TIKTOKEN_CACHE_DIR"]


def test_output_tokens_at_least_one() -> None:
    assert output_tokens("", "bytes") == 1
    assert output_tokens("hello world", "tiktoken") == 2


def test_cli_arguments_make_a_config() -> None:
    host, port, config = parse_args(
        ["--port", "9000", "--tool-loop", 'Read:{"file_path": "/x"}', "--usage-mode", "tiktoken"]
    )
    assert (host, port) == ("127.0.0.1", 9000)
    assert config.tool_loop == ToolCallSpec("Read", {"file_path": "/x"})
    assert config.usage_mode == "tiktoken"
    assert config.context_window is None
    assert parse_args(["--context-window", "5000"])[2].context_window == 5000
    assert parse_args([])[2] == FakeProviderConfig()
