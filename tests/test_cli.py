"""The ``gateway`` command: sessions list and show against a running gateway."""

from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.appkeys import STORE
from gateway.cli import SESSION_STATUSES, _parser, main
from gateway.fake_provider.__main__ import build_parser as fake_provider_parser
from gateway.secret import Secret
from gateway.settings import Settings
from gateway.store import INTERNAL_FIELDS, records
from tests.conftest import GatewayTestServer
from tests.harness import ADMIN_TOKEN
from tests.policy.hostile import HOSTILE
from tests.test_sessions import chat

TOKEN = "op-Vb8Kq3Rw6Tz1Yx4Nm7Pd2Lc9Hf5Gs0Ja"
"""An operator's own admin token, other than the harness's."""


async def run_cli(*argv: str) -> int:
    # The CLI is synchronous (urllib): run it off the event loop the gateway serves on.
    return await asyncio.to_thread(main, list(argv))


@pytest.fixture
def admin_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The CLI shows the test gateway's admin token (``GATEWAY_ADMIN_TOKEN``); and looks for a
    generated one in an empty directory, never a ``./gateway-state`` of the developer's."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    monkeypatch.setenv("GATEWAY_STATE_DIR", str(tmp_path / "cli-state"))


@pytest.mark.usefixtures("admin_env")
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


@pytest.mark.usefixtures("admin_env")
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
    # Its history holds 267 identical calls: counted up to the bound, and said to be more.
    assert "loop             identical_tool_calls exec_command x100+" in shown


@pytest.mark.usefixtures("admin_env")
async def test_show_json_is_the_operator_view(
    gateway: TestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):
        await chat(gateway, body, **{"X-Gateway-Session": "cli-view"})
    url = str(gateway.make_url("")).rstrip("/")
    assert await run_cli("sessions", "--url", url, "--json", "show", "cli-view") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["turns"] == 2 and data["in_flight"] == 0 and data["idle_seconds"] >= 0
    assert not INTERNAL_FIELDS & data.keys(), "what the gateway keeps for itself stays there"
    record = await gateway.app[STORE].get("cli-view")
    assert record is not None and record.body_repeats == 2  # kept, for the loop detector


def listed(out: str) -> list[str]:
    return [session["id"] for session in json.loads(out)["sessions"]]


@pytest.mark.usefixtures("admin_env")
async def test_connection_options_go_before_or_after_the_command(
    gateway: TestServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    await chat(gateway, body, **{"X-Gateway-Session": "cli-order"})
    url = str(gateway.make_url("")).rstrip("/")
    nowhere = "http://127.0.0.1:9"
    for argv in (
        ("sessions", "list", "--json", "--url", url),  # as users type it
        ("sessions", "--json", "--url", url, "list"),  # as it always worked
        ("sessions", "--url", url, "list", "--json"),  # a value before is kept
        ("sessions", "--url", nowhere, "list", "--url", url, "--json"),  # the later one wins
    ):
        assert await run_cli(*argv) == 0, argv
        assert listed(capsys.readouterr().out) == ["cli-order"], argv
    monkeypatch.setenv("GATEWAY_URL", url)
    assert await run_cli("sessions", "list", "--json") == 0
    assert listed(capsys.readouterr().out) == ["cli-order"]


def test_status_must_be_one_the_store_knows(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["sessions", "list", "--status", "bogus"])
    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in error
    assert all(f"'{status}'" in error for status in SESSION_STATUSES)
    # The CLI keeps its own copy (importing the store would slow every command down).
    assert SESSION_STATUSES == records.SESSION_STATUSES


@pytest.mark.usefixtures("admin_env")
async def test_status_filters_the_list(
    gateway: TestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    for session in ("cli-on", "cli-off"):
        await chat(gateway, body, **{"X-Gateway-Session": session})
    url = str(gateway.make_url("")).rstrip("/")
    assert await run_cli("sessions", "end", "cli-off", "--reason", "done", "--url", url) == 0
    assert "cli-off" in capsys.readouterr().out
    for status, ids in (("ended", ["cli-off"]), ("active", ["cli-on"]), ("paused", [])):
        assert await run_cli("sessions", "list", "--status", status, "--json", "--url", url) == 0
        assert listed(capsys.readouterr().out) == ids, status


def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """A parser and every subcommand's, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def test_every_command_and_option_has_help() -> None:
    for parser in (*parsers(_parser()), fake_provider_parser()):
        assert parser.description, parser.prog
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                listed_help = {a.dest: a.help for a in action._choices_actions}
                assert listed_help.keys() == action.choices.keys(), parser.prog
                assert all(listed_help.values()), f"{parser.prog}: a command without help"
            else:
                assert action.help and action.help != argparse.SUPPRESS, (parser.prog, action)


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["serve", "--help"],
        ["fake-provider", "--help"],
        ["sessions", "--help"],
        ["sessions", "list", "--help"],
        ["sessions", "grant", "--help"],
        ["policy", "reference", "--help"],
        ["config", "reference", "--help"],
    ],
)
def test_help_is_plain_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: gateway")
    assert "``" not in shown and ":func:" not in shown, "reStructuredText in --help"
    if argv[0] in ("--help", "sessions"):  # where the admin token is needed, it is named
        assert "GATEWAY_ADMIN_TOKEN" in shown


@pytest.fixture
async def locked_gateway(settings: Settings) -> AsyncIterator[TestServer]:
    locked = settings.model_copy(update={"admin_token": Secret(TOKEN)})
    server = GatewayTestServer(create_app(locked))
    await server.start_server()
    yield server
    await server.close()


async def test_the_admin_token_comes_from_the_environment_or_the_flag(
    locked_gateway: TestServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    url = str(locked_gateway.make_url("")).rstrip("/")
    monkeypatch.delenv("GATEWAY_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("GATEWAY_STATE_DIR", str(tmp_path / "nothing-generated"))
    with pytest.raises(SystemExit) as caught:
        await run_cli("sessions", "list", "--url", url)
    assert str(caught.value.code).startswith(
        "gateway: admin token required: set GATEWAY_ADMIN_TOKEN or pass --token"
    )
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    assert await run_cli("sessions", "list", "--url", url, "--json") == 0
    assert listed(capsys.readouterr().out) == []
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "wrong")
    with pytest.raises(SystemExit) as refused:
        await run_cli("sessions", "list", "--url", url)
    message = str(refused.value.code)
    assert "the admin token was refused: check GATEWAY_ADMIN_TOKEN or --token" in message
    assert "wrong" not in message.replace("the admin token was refused", "")
    assert await run_cli("sessions", "list", "--url", url, "--token", TOKEN) == 0


@pytest.mark.parametrize("found_by", ["GATEWAY_STATE_DIR", "GATEWAY_STORE"])
async def test_the_cli_reads_the_token_the_gateway_generated(
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    found_by: str,
) -> None:
    """Without a configured token the gateway writes one into its state directory; the CLI,
    run by the same user with the same settings, finds it there. A token given wins."""
    state = tmp_path / "data" / "gateway-state"  # the default beside sqlite:///data/gateway.db
    generating = settings.model_copy(update={"admin_token": None, "state_dir": state})
    server = GatewayTestServer(create_app(generating))
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        monkeypatch.delenv("GATEWAY_ADMIN_TOKEN", raising=False)
        monkeypatch.delenv("GATEWAY_STATE_DIR", raising=False)
        if found_by == "GATEWAY_STATE_DIR":
            monkeypatch.setenv("GATEWAY_STATE_DIR", str(state))
        else:
            monkeypatch.setenv("GATEWAY_STORE", f"sqlite:///{tmp_path / 'data' / 'gateway.db'}")
        assert await run_cli("sessions", "list", "--url", url, "--json") == 0
        assert listed(capsys.readouterr().out) == []
        monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)  # not this gateway's
        with pytest.raises(SystemExit) as refused:
            await run_cli("sessions", "list", "--url", url)
        assert "the admin token was refused" in str(refused.value.code)
    finally:
        await server.close()


@pytest.mark.usefixtures("admin_env")
async def test_grant_refusals_exit_non_zero(
    gateway: TestServer, capsys: pytest.CaptureFixture[str]
) -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    await chat(gateway, body, **{"X-Gateway-Session": "cli-grant"})
    url = str(gateway.make_url("")).rstrip("/")

    assert await run_cli("sessions", "grant", "cli-grant", "--url", url) == 2
    assert "--turns and/or --tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit) as negative:
        await run_cli("sessions", "grant", "cli-grant", "--turns", "-3", "--url", url)
    assert negative.value.code == 2
    # A message (exit status 1) for what the gateway refuses.
    with pytest.raises(SystemExit) as unknown:
        await run_cli("sessions", "grant", "nobody", "--turns", "5", "--url", url)
    assert unknown.value.code == "gateway: no such session (the gateway answered 404)"

    assert await run_cli("sessions", "grant", "cli-grant", "--turns", "5", "--url", url) == 0
    assert capsys.readouterr().out.startswith("granted 5 turns and 0 tokens to cli-grant")
    assert await run_cli("sessions", "end", "cli-grant", "--url", url) == 0
    with pytest.raises(SystemExit) as ended:
        await run_cli("sessions", "grant", "cli-grant", "--turns", "5", "--url", url)
    assert isinstance(ended.value.code, str) and "(the gateway answered 409)" in ended.value.code


def test_the_cli_starts_without_the_server() -> None:
    """``gateway --help`` and the sessions commands stay quick: the server's modules (aiohttp,
    pydantic, the store, the tokenizer) are imported by ``serve`` only."""
    code = (
        "import sys, gateway.cli; "
        "print([m for m in ('aiohttp', 'pydantic', 'gateway.store', 'gateway.app', 'tiktoken')"
        " if m in sys.modules])"
    )
    shown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert shown.strip() == "[]"


def test_the_admin_token_never_follows_a_redirect(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """urllib follows a redirect with every header it was given: the admin token would go to
    whatever host a redirect names. The admin API never redirects, so one is an error."""
    seen: list[str | None] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"sessions": []}')

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), Elsewhere)

    class Redirect(Elsewhere):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"http://localhost:{other.server_port}/gateway/sessions")
            self.end_headers()

    first = http.server.HTTPServer(("127.0.0.1", 0), Redirect)
    for server in (first, other):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "supersecret-admin")
        url = f"http://127.0.0.1:{first.server_port}"
        with pytest.raises(SystemExit) as refused:
            main(["sessions", "--url", url, "list"])
        assert "302" in str(refused.value) and "supersecret" not in str(refused.value)
        assert seen == []
    finally:
        for server in (first, other):
            server.shutdown()
            server.server_close()


# ``gateway config check FILE``: the config as ``serve --config`` reads it, every problem at
# its line, as ``policy check`` says a policy's.

GOOD_CONFIG = """\
port: 9000
upstreams:
  anthropic:
    retry: {attempts: 4}
    fallback: {upstream: anthropic-backup}
  anthropic-backup:
    url: https://backup.example
    provider: anthropic
    pass_client_credentials: true
drain_timeout: 45
"""
BAD_CONFIG = """\
port: 9000
upstreams:
  openai:
    url: https://api.openai.com/v1
    fallback: {upstream: spare}
  anthropic:
    fallback: {upstream: nowhere}
  spare: {url: "https://spare.example/v1", provider: openai}
  local: http://localhost:8000/v1
"""


def config_check(
    tmp_path: Path, content: str | bytes, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str, str]:
    path = tmp_path / "gateway.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    code = main(["config", "check", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_config_check_a_valid_file_says_ok_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = config_check(tmp_path, GOOD_CONFIG, capsys)
    assert (code, err) == (0, "")
    assert out == (
        f"{tmp_path / 'gateway.yaml'}: ok (upstreams: openai, anthropic, anthropic-backup;"
        " fallbacks: anthropic -> anthropic-backup; drain 45 s)\n"
    )


def test_config_check_an_empty_file_is_the_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = config_check(tmp_path, "", capsys)
    assert code == 0 and "upstreams: openai, anthropic; fallbacks: none; drain 30 s" in out


def test_config_check_says_every_upstream_mistake_at_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = config_check(tmp_path, BAD_CONFIG, capsys)
    assert (code, out) == (1, "")
    path = tmp_path / "gateway.yaml"
    lines = err.splitlines()
    assert all(line.startswith(f"{path}: line ") for line in lines), err
    assert lines[0] == (
        f"{path}: line 5: upstreams.openai.fallback.upstream: spare is on another host"
        " (spare.example), and a fallback call carries the client's own credential there."
        " Write pass_client_credentials: true on upstreams.spare if that host may receive it."
    )
    assert lines[1] == (
        f"{path}: line 7: upstreams.anthropic.fallback.upstream: no upstream named 'nowhere'"
        " (there are: anthropic, local, openai, spare)"
    )
    assert lines[2] == (
        f"{path}: line 9: upstreams.local: say which API it speaks: provider: openai or anthropic"
    )
    assert len(lines) == 3


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            "upstreams:\n  openai:\n    url: https://x.io\n    fallback: {upstream: anthropic}\n",
            "line 4: upstreams.openai.fallback.upstream: anthropic speaks the anthropic API,"
            " openai the openai API",
        ),
        (
            "upstreams:\n  anthropic:\n    concurrency:\n      min: 10\n      max: 5\n",
            "line 3: upstreams.anthropic.concurrency: ",
        ),
        ("port: high\n", "line 1: port: Input should be a valid integer"),
        ("timeouts:\n  connect: 5\n  total: 9\n", "line 3: timeouts.total: Extra inputs"),
        ("upstreams:\n  openai: ftp://x\n", "line 2: upstreams.openai.url: "),
        ("- a\n- b\n", "line 1: expected a mapping of settings"),
        ("port: [unclosed\n", "line 2: not valid YAML"),
    ],
)
def test_config_check_errors_name_the_line(
    tmp_path: Path, content: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = config_check(tmp_path, content, capsys)
    assert (code, out) == (1, "")
    assert f"{tmp_path / 'gateway.yaml'}: {expected}" in err, err
    assert "Traceback" not in err


def test_config_check_the_floor_above_the_ceiling_says_both(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    content = "upstreams:\n  anthropic:\n    concurrency: {min: 10, max: 5}\n"
    _, _, err = config_check(tmp_path, content, capsys)
    assert "concurrency.min (10) is above concurrency.max (5)" in err


@pytest.mark.parametrize("name", [n for n in HOSTILE if n != "too-many-rules"])
def test_config_check_hostile_files_are_refused_quickly_and_plainly(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    content, where, message = HOSTILE[name]
    started = time.monotonic()
    code, out, err = config_check(tmp_path, content, capsys)
    assert time.monotonic() - started < 5
    assert (code, out) == (1, "")
    assert message in err and where in err, err
    assert "Traceback" not in err and len(err) < 2000


def test_config_check_a_file_that_cannot_be_read_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["config", "check", str(tmp_path / "nope.yaml")]) == 2
    assert "cannot read the file" in capsys.readouterr().err
    assert main(["config", "check", str(tmp_path)]) == 2  # a directory
    assert "cannot read the file" in capsys.readouterr().err


def test_config_check_reads_the_file_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a variable would change is not the file's problem: the file is checked as written."""
    monkeypatch.setenv("GATEWAY_PORT", "not-a-port")
    monkeypatch.setenv("GATEWAY_ANTHROPIC_UPSTREAM", "https://elsewhere.example")
    code, out, _ = config_check(tmp_path, GOOD_CONFIG, capsys)
    assert code == 0 and "ok" in out


def test_config_check_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["config", "check", "--help"])
    assert caught.value.code == 0
    shown = capsys.readouterr().out
    assert shown.startswith("usage: gateway config check") and "exit 2" in shown
