"""The real Codex CLI and Claude Code, installed from npm, driven through the gateway to the fake.

Offline, loopback only, fake keys. Each run gets a fresh home/config directory. The tests are
skipped when the agents are not installed (they fail instead when ``CI=true``): install them with
``(cd tests/agents && npm ci --no-audit --no-fund)``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer

from gateway.appkeys import STORE
from gateway.fake_provider import FakeProviderConfig, ReceivedRequest, ToolCallSpec
from gateway.fake_provider.config import DEFAULT_REPLY
from gateway.store import SessionQuery, SessionRecord
from tests.agents.conftest import AgentDirs, AgentRun, base_env, run_agent
from tests.conftest import received
from tests.harness import MakeGateway

CODEX_MODEL = "gpt-5-codex"
Launch = tuple[list[str | Path], dict[str, str]]
LOOP_TURNS = 6
"""Requests to let a never-ending Codex loop make before the test stops it."""


# --- helpers ----------------------------------------------------------------------------------


def header(request: ReceivedRequest, name: str) -> str | None:
    """A received header, looked up case-insensitively."""
    wanted = name.lower()
    return next((value for key, value in request.headers.items() if key.lower() == wanted), None)


def body(request: ReceivedRequest) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(request.body)
    return data


def calls_to(fake_provider: TestServer, path: str) -> list[ReceivedRequest]:
    """Requests the fake received on ``path`` (query string ignored), in order."""
    return [r for r in received(fake_provider) if r.path.partition("?")[0] == path]


async def sessions(gateway: TestServer) -> list[SessionRecord]:
    return await gateway.app[STORE].find(SessionQuery())


def codex_config(gateway: TestServer) -> str:
    """config.toml for a throwaway CODEX_HOME: a custom provider aimed at the gateway.

    With its built-in ``openai`` provider, Codex 0.169.0 sent nothing to ``OPENAI_BASE_URL``: it
    dialled the Responses WebSocket of api.openai.com and kept reconnecting. A custom provider
    with ``supports_websockets = false`` sends plain HTTP + SSE to the gateway instead. The
    features that reach the network on start-up (curated plugin sync from GitHub/chatgpt.com,
    apps, update checks, analytics) are switched off.
    """
    base_url = str(gateway.make_url("/v1"))
    return f"""\
model = "{CODEX_MODEL}"
model_provider = "gateway"
check_for_update_on_startup = false

[model_providers.gateway]
name = "gateway"
base_url = "{base_url}"
env_key = "OPENAI_API_KEY"
wire_api = "responses"
supports_websockets = false
request_max_retries = 0
stream_max_retries = 0

[analytics]
enabled = false

[feedback]
enabled = false

[features]
plugins = false
remote_plugin = false
plugin_sharing = false
apps = false
tool_suggest = false
image_generation = false
in_app_updates = false
shell_snapshot = false
"""


def codex_setup(codex_bin: Path, gateway: TestServer, dirs: AgentDirs, prompt: str) -> Launch:
    codex_home = dirs.home / ".codex"
    codex_home.mkdir()
    (codex_home / "config.toml").write_text(codex_config(gateway))
    env = base_env(dirs.home) | {
        "CODEX_HOME": str(codex_home),
        "OPENAI_API_KEY": "sk-fake",
    }
    argv: list[str | Path] = [
        codex_bin,
        "exec",
        "--skip-git-repo-check",
        "--strict-config",
        "--color",
        "never",
        prompt,
    ]
    return argv, env


def claude_setup(claude_bin: Path, gateway: TestServer, dirs: AgentDirs, *args: str) -> Launch:
    env = base_env(dirs.home) | {
        "CLAUDE_CONFIG_DIR": str(dirs.home / ".claude"),
        "ANTHROPIC_BASE_URL": str(gateway.make_url("")).rstrip("/"),
        "ANTHROPIC_API_KEY": "sk-ant-fake",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
    }
    return [claude_bin, "-p", *args], env


def function_calls(request: ReceivedRequest) -> list[dict[str, Any]]:
    return [item for item in body(request)["input"] if item.get("type") == "function_call"]


def tool_uses(request: ReceivedRequest) -> list[dict[str, Any]]:
    return [
        block
        for message in body(request)["messages"]
        if message["role"] == "assistant" and isinstance(message["content"], list)
        for block in message["content"]
        if block.get("type") == "tool_use"
    ]


def assert_growing(sizes: list[int], what: str, run: AgentRun) -> None:
    assert all(a < b for a, b in itertools.pairwise(sizes)), (
        f"{what} did not grow: {sizes}\n{run.describe()}"
    )


# --- Codex CLI --------------------------------------------------------------------------------


async def test_codex_simple_prompt_is_one_session(
    codex_bin: Path, gateway: TestServer, fake_provider: TestServer, agent_dirs: AgentDirs
) -> None:
    argv, env = codex_setup(codex_bin, gateway, agent_dirs, "Say hello.")

    run = await run_agent(argv, env=env, cwd=agent_dirs.work, logs=agent_dirs.logs)

    assert run.returncode == 0 and not run.timed_out, run.describe()
    assert DEFAULT_REPLY in run.stdout, run.describe()
    calls = calls_to(fake_provider, "/v1/responses")
    assert calls, f"the fake saw no /v1/responses call\n{run.describe()}"
    assert {r.path.partition("?")[0] for r in received(fake_provider)} == {"/v1/responses"}
    session_ids = {header(r, "session-id") for r in calls}
    assert len(session_ids) == 1 and None not in session_ids, session_ids
    [session_id] = session_ids
    assert (header(calls[0], "User-Agent") or "").startswith("codex_exec/")
    assert body(calls[0])["prompt_cache_key"] == session_id

    [session] = await sessions(gateway)
    assert session.id == session_id
    assert (session.agent, session.source) == ("codex", "codex")
    assert session.turns == len(calls) >= 1
    assert session.tokens.input_tokens > 0
    assert session.tokens.output_tokens > 0


async def test_codex_tool_loop_counts_turns(
    codex_bin: Path,
    gateway: TestServer,
    fake_provider: TestServer,
    fake_config: FakeProviderConfig,
    agent_dirs: AgentDirs,
) -> None:
    """Codex never ends a runaway tool loop by itself: stop it after a few turns."""
    fake_config.tool_loop = ToolCallSpec("exec_command", {"cmd": "echo hi"})
    argv, env = codex_setup(codex_bin, gateway, agent_dirs, "Check the host name.")

    async def enough_turns() -> bool:
        return len(calls_to(fake_provider, "/v1/responses")) >= LOOP_TURNS

    run = await run_agent(
        argv, env=env, cwd=agent_dirs.work, logs=agent_dirs.logs, stop_when=enough_turns
    )

    assert run.stopped, f"Codex did not loop {LOOP_TURNS} times\n{run.describe()}"
    calls = calls_to(fake_provider, "/v1/responses")
    assert len({header(r, "session-id") for r in calls}) == 1
    finished = calls[: LOOP_TURNS - 1]  # the last one may have been cut by the kill
    assert [len(function_calls(r)) for r in finished] == list(range(len(finished)))
    assert all(
        (c["name"], json.loads(c["arguments"])) == ("exec_command", {"cmd": "echo hi"})
        for c in function_calls(finished[-1])
    )
    assert_growing([len(r.body) for r in finished], "Codex request bodies", run)

    [session] = await sessions(gateway)
    assert session.id == header(calls[0], "session-id")
    assert (session.agent, session.source) == ("codex", "codex")
    assert session.turns >= 3
    assert session.tokens.input_tokens > 0


# --- Claude Code ------------------------------------------------------------------------------


async def test_claude_code_simple_prompt_is_one_session(
    claude_bin: Path, gateway: TestServer, fake_provider: TestServer, agent_dirs: AgentDirs
) -> None:
    argv, env = claude_setup(claude_bin, gateway, agent_dirs, "Say hello.", "--max-turns", "2")

    run = await run_agent(argv, env=env, cwd=agent_dirs.work, logs=agent_dirs.logs)

    assert run.returncode == 0 and not run.timed_out, run.describe()
    assert DEFAULT_REPLY in run.stdout, run.describe()
    turns = calls_to(fake_provider, "/v1/messages")
    counts = calls_to(fake_provider, "/v1/messages/count_tokens")
    assert turns, f"the fake saw no /v1/messages call\n{run.describe()}"
    assert len(turns) + len(counts) == len(received(fake_provider)), [
        r.path for r in received(fake_provider)
    ]
    session_ids = {header(r, "X-Claude-Code-Session-Id") for r in turns + counts}
    assert len(session_ids) == 1 and None not in session_ids, session_ids
    [session_id] = session_ids
    assert (header(turns[0], "User-Agent") or "").startswith("claude-cli/")
    user_id = json.loads(body(turns[0])["metadata"]["user_id"])
    assert user_id["session_id"] == session_id

    [session] = await sessions(gateway)
    assert session.id == session_id
    assert (session.agent, session.source) == ("claude-code", "claude-code")
    assert session.turns == len(turns)
    assert session.aux_requests == len(counts)
    assert session.tokens.input_tokens > 0


async def test_claude_code_tool_loop_counts_turns(
    claude_bin: Path,
    gateway: TestServer,
    fake_provider: TestServer,
    fake_config: FakeProviderConfig,
    agent_dirs: AgentDirs,
) -> None:
    """Claude Code loops on the same Read until its own --max-turns ends the run."""
    notes = agent_dirs.work / "notes.txt"
    notes.write_text("hello from the loop test\n")
    fake_config.tool_loop = ToolCallSpec("Read", {"file_path": str(notes)})
    argv, env = claude_setup(claude_bin, gateway, agent_dirs, "Read notes.txt.", "--max-turns", "5")

    run = await run_agent(argv, env=env, cwd=agent_dirs.work, logs=agent_dirs.logs)

    assert not run.timed_out, run.describe()
    assert "max turns" in (run.stdout + run.stderr).lower(), run.describe()
    turns = calls_to(fake_provider, "/v1/messages")
    assert len(turns) >= 3, run.describe()
    assert len({header(r, "X-Claude-Code-Session-Id") for r in turns}) == 1
    assert [len(tool_uses(r)) for r in turns] == list(range(len(turns)))
    assert all(
        (use["name"], use["input"]) == ("Read", {"file_path": str(notes)})
        for use in tool_uses(turns[-1])
    )
    assert_growing([len(r.body) for r in turns], "Claude Code request bodies", run)

    [session] = await sessions(gateway)
    assert session.id == header(turns[0], "X-Claude-Code-Session-Id")
    assert (session.agent, session.source) == ("claude-code", "claude-code")
    assert session.turns == len(turns) >= 3
    assert session.tokens.input_tokens > 0


async def test_codex_runaway_loop_is_stopped_by_the_default_policy(
    codex_bin: Path,
    gateway: TestServer,
    fake_provider: TestServer,
    fake_config: FakeProviderConfig,
    agent_dirs: AgentDirs,
) -> None:
    """Codex never ends this loop by itself; the packaged policy (8 identical calls) does, with
    a 400 that Codex shows and stops on."""
    fake_config.tool_loop = ToolCallSpec("exec_command", {"cmd": "echo hi"})
    argv, env = codex_setup(codex_bin, gateway, agent_dirs, "Check the host name.")

    run = await run_agent(argv, env=env, cwd=agent_dirs.work, logs=agent_dirs.logs)

    assert not run.timed_out and not run.stopped, run.describe()
    assert run.returncode != 0, run.describe()
    assert "runaway loop" in run.stdout + run.stderr, run.describe()
    calls = calls_to(fake_provider, "/v1/responses")
    assert len(calls) == 8, f"{len(calls)} calls reached the provider\n{run.describe()}"
    [session] = await sessions(gateway)
    assert session.turns == 8 and session.rejected >= 1
    [detection] = session.detections
    assert detection["detector"] == "identical_tool_calls"
    assert detection["tool"] == "exec_command"


async def test_claude_code_runaway_loop_is_stopped_by_the_default_policy(
    claude_bin: Path,
    gateway: TestServer,
    fake_provider: TestServer,
    fake_config: FakeProviderConfig,
    agent_dirs: AgentDirs,
) -> None:
    """With its own turn limit far away, Claude Code is stopped by the gateway's loop rule."""
    notes = agent_dirs.work / "notes.txt"
    notes.write_text("hello from the loop test\n")
    fake_config.tool_loop = ToolCallSpec("Read", {"file_path": str(notes)})
    argv, env = claude_setup(
        claude_bin, gateway, agent_dirs, "Read notes.txt.", "--max-turns", "30"
    )

    run = await run_agent(argv, env=env, cwd=agent_dirs.work, logs=agent_dirs.logs)

    assert not run.timed_out and not run.stopped, run.describe()
    assert "runaway loop" in run.stdout + run.stderr, run.describe()
    assert len(calls_to(fake_provider, "/v1/messages")) == 8, run.describe()
    [session] = await sessions(gateway)
    assert session.turns == 8 and session.rejected >= 1
    assert session.detections[0]["tool"] == "Read"


# --- compaction -------------------------------------------------------------------------------

AGENT_WINDOW = 24_000
COMPACTING_POLICY = f"""
version: 1
defaults:
  loops: {{identical_tool_calls: 1000}}
  context:
    window: {AGENT_WINDOW}
    compact_at: 0.8
    target: 0.6
    keep_last: 2
    strategies: [elide_tool_output, truncate]
"""


async def test_claude_code_keeps_working_past_the_window_when_compacted(
    claude_bin: Path,
    make_gateway: MakeGateway,
    fake_provider: TestServer,
    fake_config: FakeProviderConfig,
    agent_dirs: AgentDirs,
) -> None:
    """Claude Code in a long tool loop: its history passes the window the fake enforces (its
    system prompt and tools alone are about half of it), and the gateway's compaction keeps
    every call valid and under it until Claude Code's own --max-turns ends the run."""
    notes = agent_dirs.work / "notes.txt"
    notes.write_text("".join(f"line {n}: the parser keeps its state here\n" for n in range(300)))
    fake_config.tool_loop = ToolCallSpec("Read", {"file_path": str(notes)})
    fake_config.context_window = AGENT_WINDOW
    gw = await make_gateway(COMPACTING_POLICY)
    argv, env = claude_setup(
        claude_bin, gw.server, agent_dirs, "Read notes.txt.", "--max-turns", "12"
    )

    run = await run_agent(argv, env=env, cwd=agent_dirs.work, logs=agent_dirs.logs)

    assert not run.timed_out, run.describe()
    assert "max turns" in (run.stdout + run.stderr).lower(), run.describe()
    turns = calls_to(fake_provider, "/v1/messages")
    [session] = await sessions(gw.server)
    assert session.turns == len(turns) >= 10, run.describe()
    assert session.upstream_errors == 0 and session.rejected == 0, run.describe()
    assert session.compacted_calls > 0 and session.tokens_saved > 0, run.describe()
    # Each compaction started past compact_at and ended under the window (under target when
    # the latest exchanges allow it); the fake, which refuses anything over its window,
    # accepted every call.
    for compaction in session.compactions:
        assert compaction["tokens_before"] >= 0.8 * AGENT_WINDOW
        assert compaction["tokens_after"] < AGENT_WINDOW
        assert set(compaction["strategies"]) <= {"elide_tool_output", "truncate"}


PROMPT_POLICY = """
version: 1
defaults:
  loops: {{identical_tool_calls: 1000}}
  context: {{window: {window}, strategies: [prompt]}}
"""


async def test_claude_code_recognises_the_overflow_handed_back_by_prompt(
    claude_bin: Path,
    make_gateway: MakeGateway,
    fake_provider: TestServer,
    fake_config: FakeProviderConfig,
    agent_dirs: AgentDirs,
) -> None:
    """``prompt`` answers Anthropic's own "prompt is too long": Claude Code reports it as such
    (in -p mode there is no human to compact with, so it stops)."""
    notes = agent_dirs.work / "notes.txt"
    notes.write_text("".join(f"line {n}: the parser keeps its state here\n" for n in range(300)))
    fake_config.tool_loop = ToolCallSpec("Read", {"file_path": str(notes)})
    gw = await make_gateway(PROMPT_POLICY.format(window=AGENT_WINDOW))
    argv, env = claude_setup(claude_bin, gw.server, agent_dirs, "Read notes.txt.")

    run = await run_agent(argv, env=env, cwd=agent_dirs.work, logs=agent_dirs.logs)

    assert not run.timed_out and run.returncode != 0, run.describe()
    assert "Prompt is too long" in run.stdout + run.stderr, run.describe()
    [session] = await sessions(gw.server)
    assert session.rejections[-1]["limit"] == "context_window"
    assert len(calls_to(fake_provider, "/v1/messages")) == session.turns


async def test_codex_recognises_the_overflow_handed_back_by_prompt(
    codex_bin: Path,
    make_gateway: MakeGateway,
    fake_provider: TestServer,
    fake_config: FakeProviderConfig,
    agent_dirs: AgentDirs,
) -> None:
    """On a stream, ``prompt`` answers with a ``response.failed`` event whose code is
    ``context_length_exceeded``: the only overflow Codex recognises."""
    fake_config.tool_loop = ToolCallSpec("exec_command", {"cmd": "seq 1 3000"})
    gw = await make_gateway(PROMPT_POLICY.format(window=16_000))
    argv, env = codex_setup(codex_bin, gw.server, agent_dirs, "Count to 3000.")

    run = await run_agent(argv, env=env, cwd=agent_dirs.work, logs=agent_dirs.logs)

    assert not run.timed_out and run.returncode != 0, run.describe()
    assert "ran out of room in the model's context window" in run.stdout + run.stderr
    [session] = await sessions(gw.server)
    assert session.rejections[-1]["limit"] == "context_window"
