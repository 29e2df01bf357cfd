"""The real Claude Code and Codex CLI with gateway keys: the key is their API key, the
gateway's pool credential is what reaches the provider, and a refusal reads as the
gateway's own (Claude Code prints a 401 after "Failed to authenticate")."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestServer

from gateway.fake_provider.config import DEFAULT_REPLY
from tests.agents.conftest import AgentDirs, run_agent
from tests.agents.test_real_agents import calls_to, claude_setup, codex_setup, header, sessions
from tests.conftest import received
from tests.harness import POOL_ANTHROPIC, POOL_OPENAI, MakeGateway, create_key, keys_mode


async def test_claude_code_works_with_a_gateway_key_and_never_sends_it_upstream(
    claude_bin: Path,
    make_gateway: MakeGateway,
    fake_provider: TestServer,
    agent_dirs: AgentDirs,
    tmp_path: Path,
) -> None:
    gw = await make_gateway(None, **keys_mode(fake_provider, tmp_path))
    made = await create_key(gw, team="platform", name="claude")
    argv, env = claude_setup(claude_bin, gw.server, agent_dirs, "Say hello.", "--max-turns", "2")
    env["ANTHROPIC_API_KEY"] = made["key"]

    run = await run_agent(argv, env=env, cwd=agent_dirs.work, logs=agent_dirs.logs)

    assert run.returncode == 0 and not run.timed_out, run.describe()
    assert DEFAULT_REPLY in run.stdout, run.describe()
    turns = calls_to(fake_provider, "/v1/messages")
    assert turns, run.describe()
    for request in received(fake_provider):
        assert header(request, "x-api-key") == POOL_ANTHROPIC
        assert made["key"] not in str(request.headers)
    [session] = await sessions(gw.server)
    assert (session.principal, session.team) == (f"key:{made['id']}", "platform")
    assert session.key_hash == made["id"]  # the session belongs to the key, by its public id


async def test_claude_code_shows_that_the_gateway_refused_a_provider_key(
    claude_bin: Path,
    make_gateway: MakeGateway,
    fake_provider: TestServer,
    agent_dirs: AgentDirs,
    tmp_path: Path,
) -> None:
    gw = await make_gateway(None, **keys_mode(fake_provider, tmp_path))
    argv, env = claude_setup(claude_bin, gw.server, agent_dirs, "Say hello.", "--max-turns", "2")
    env["ANTHROPIC_API_KEY"] = "sk-ant-api03-someones-real-key"

    run = await run_agent(argv, env=env, cwd=agent_dirs.work, logs=agent_dirs.logs)

    assert run.returncode != 0 and not run.timed_out, run.describe()
    shown = run.stdout + run.stderr
    # Claude Code's own words, then the gateway's: who refused, and what to do. At once: the
    # answer's x-should-retry: false (without it Claude Code retried the 401 for minutes).
    assert "Failed to authenticate" in shown and "gateway (not Anthropic)" in shown, shown
    assert received(fake_provider) == [], "a provider key in keys mode must reach nothing"


async def test_codex_works_with_a_gateway_key(
    codex_bin: Path,
    make_gateway: MakeGateway,
    fake_provider: TestServer,
    agent_dirs: AgentDirs,
    tmp_path: Path,
) -> None:
    gw = await make_gateway(None, **keys_mode(fake_provider, tmp_path))
    made = await create_key(gw, team="platform", name="codex")
    argv, env = codex_setup(codex_bin, gw.server, agent_dirs, "Say hello.")
    env["OPENAI_API_KEY"] = made["key"]

    run = await run_agent(argv, env=env, cwd=agent_dirs.work, logs=agent_dirs.logs)

    assert run.returncode == 0 and not run.timed_out, run.describe()
    assert DEFAULT_REPLY in run.stdout, run.describe()
    calls = calls_to(fake_provider, "/v1/responses")
    assert calls, run.describe()
    for request in received(fake_provider):
        assert header(request, "Authorization") == f"Bearer {POOL_OPENAI}"
    [session] = await sessions(gw.server)
    assert session.principal == f"key:{made['id']}"
