"""The ``gateway`` command: sessions list and show against a running gateway."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp.test_utils import TestServer

from gateway.cli import main
from tests.test_sessions import chat


async def run_cli(*argv: str) -> int:
    # The CLI is synchronous (urllib): run it off the event loop the gateway serves on.
    return await asyncio.to_thread(main, list(argv))


async def test_sessions_list_and_show(
    gateway: TestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    await chat(gateway, body, **{"X-Gateway-Session": "cli-1", "X-Gateway-Session-Name": "nightly"})
    await chat(gateway, body, **{"X-Gateway-Session": "cli-1"})
    url = str(gateway.make_url("")).rstrip("/")

    assert await run_cli("sessions", "--url", url, "list") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:5] == ["SESSION", "NAME", "AGENT", "STATUS", "TURNS"]
    row = table[1].split()
    assert row[:5] == ["cli-1", "nightly", "python", "active", "2"]

    assert await run_cli("sessions", "--url", url, "show", "cli-1") == 0
    shown = capsys.readouterr().out
    assert "nightly" in shown and "2 (2 user, 0 estimated)" in shown and "gpt-4o" in shown

    assert await run_cli("sessions", "--url", url, "--json", "show", "cli-1") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["id"] == "cli-1" and data["turns"] == 2


async def test_unreachable_gateway_is_a_clear_message(unused_tcp_port: int) -> None:
    with pytest.raises(SystemExit) as caught:
        await run_cli("sessions", "--url", f"http://127.0.0.1:{unused_tcp_port}", "list")
    assert "cannot reach" in str(caught.value.code)


async def test_show_tells_what_the_policy_did(
    gateway: TestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """A recorded Codex loop, refused by the packaged policy, shows up in `sessions show`."""
    from tests.conftest import load_fixture
    from tests.test_sessions import replay

    fixture = load_fixture("codex-0.169.0-responses-turn268.json")
    assert (await replay(gateway, fixture)).status == 400
    url = str(gateway.make_url("")).rstrip("/")
    assert await run_cli("sessions", "--url", url, "show", fixture["headers"]["session-id"]) == 0
    shown = capsys.readouterr().out
    assert "rejected         1 (last: loop_identical_tool_calls, rule defaults)" in shown
    assert "loop             identical_tool_calls exec_command x9" in shown
