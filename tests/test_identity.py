"""Identity: the order session ids are looked up in, agent names, key hashes, fingerprints."""

from __future__ import annotations

import re
from typing import Any

import pytest
from multidict import CIMultiDict

from gateway.credentials import credential
from gateway.dialects import ANTHROPIC_MESSAGES, OPENAI_CHAT, OPENAI_RESPONSES, RequestFacts
from gateway.errors import SessionTaken
from gateway.identity import (
    Identity,
    agent_name,
    fingerprint,
    identify,
    own_session,
    qualified,
)
from gateway.store import SessionRecord
from tests.conftest import load_fixture


def _facts(hints: dict[str, str] | None = None, **fields: Any) -> RequestFacts:
    facts = RequestFacts(model="m", stream=False, items=[], **fields)
    facts.session_hints.update(hints or {})
    return facts


# Every source at once, most trusted first: (source, header or hint, value).
ALL_SOURCES: list[tuple[str, str, str]] = [
    ("explicit", "X-Gateway-Session", "explicit-1"),
    ("path", "", "path-1"),
    ("claude-code", "X-Claude-Code-Session-Id", "cc-header-1"),
    ("claude-code", "metadata.user_id", "cc-meta-1"),
    ("codex", "session-id", "codex-dash-1"),
    ("codex", "session_id", "codex-underscore-1"),
    ("codex", "prompt_cache_key", "codex-pck-1"),
    ("header", "agent-session-id", "goose-1"),
    ("header", "x-session-id", "opencode-1"),
    ("body", "metadata.session_id", "meta-session-1"),
    ("body", "user", "user-1"),
]
BODY_HINTS = {"metadata.user_id", "prompt_cache_key", "metadata.session_id", "user"}


def _identify_from(sources: list[tuple[str, str, str]]) -> Any:
    headers: CIMultiDict[str] = CIMultiDict()
    hints: dict[str, str] = {}
    path_session = None
    for source, where, value in sources:
        if source == "path":
            path_session = value
        elif where in BODY_HINTS:
            hints[where] = value
        else:
            headers[where] = value
    return identify(headers, _facts(hints), path_session)


def test_sources_are_tried_in_order() -> None:
    for i, (source, _, value) in enumerate(ALL_SOURCES):
        ident = _identify_from(ALL_SOURCES[i:])
        assert (ident.session_id, ident.source) == (value, source)
    ident = _identify_from([])
    assert ident.source == "fingerprint"
    assert ident.session_id.startswith("fp_")


@pytest.mark.parametrize(("source", "where", "value"), ALL_SOURCES)
def test_each_source_alone(source: str, where: str, value: str) -> None:
    ident = _identify_from([(source, where, value)])
    assert (ident.session_id, ident.source) == (value, source)


def test_explicit_header_beats_everything() -> None:
    ident = _identify_from([*ALL_SOURCES[1:], ALL_SOURCES[0]])
    assert (ident.session_id, ident.source) == ("explicit-1", "explicit")


def test_headers_match_case_insensitively() -> None:
    headers = CIMultiDict({"x-claude-code-session-id": "abc", "SESSION-ID": "def"})
    assert identify(headers, None).session_id == "abc"


def test_empty_values_are_skipped() -> None:
    headers = CIMultiDict({"X-Gateway-Session": "", "x-session-id": "oc-1"})
    ident = identify(headers, None, path_session="")
    assert (ident.session_id, ident.source) == ("oc-1", "header")


def test_session_id_is_cleaned_and_bounded() -> None:
    headers = CIMultiDict({"X-Gateway-Session": "  a\x1bb\tc " + "x" * 500})
    ident = identify(headers, None)
    assert ident.session_id.startswith("abc")
    assert len(ident.session_id) <= 200
    assert ident.session_id.isprintable()


def test_session_name_header() -> None:
    headers = CIMultiDict({"X-Gateway-Session": "s", "X-Gateway-Session-Name": " fix the bug\n"})
    assert identify(headers, None).name == "fix the bug"
    assert identify(CIMultiDict({"X-Gateway-Session": "s"}), None).name is None


# -- recorded agents -----------------------------------------------------------------------------


def test_claude_code_request() -> None:
    recorded = load_fixture("claude-code-2.1.197-messages-turn4.json")
    headers = CIMultiDict(recorded["headers"])
    ident = identify(headers, ANTHROPIC_MESSAGES.read_request(recorded["body"]))
    assert ident.session_id == recorded["headers"]["X-Claude-Code-Session-Id"]
    assert ident.source == "claude-code"
    assert ident.agent == "claude-code"
    # Without the header, metadata.user_id gives the same id.
    del headers["X-Claude-Code-Session-Id"]
    ident = identify(headers, ANTHROPIC_MESSAGES.read_request(recorded["body"]))
    assert (ident.session_id, ident.source) == (
        recorded["headers"]["X-Claude-Code-Session-Id"],
        "claude-code",
    )


@pytest.mark.parametrize(
    "name",
    [
        "codex-0.169.0-responses-turn1.json",
        "codex-0.169.0-responses-turn3.json",
        "codex-0.169.0-responses-turn268.json",
    ],
)
def test_codex_request(name: str) -> None:
    recorded = load_fixture(name)
    headers = CIMultiDict(recorded["headers"])
    facts = OPENAI_RESPONSES.read_request(recorded["body"])
    ident = identify(headers, facts)
    assert ident.session_id == recorded["headers"]["session-id"]
    assert (ident.source, ident.agent) == ("codex", "codex")
    del headers["session-id"]
    assert identify(headers, facts).session_id == recorded["body"]["prompt_cache_key"]


# -- agent names ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user_agent", "agent"),
    [
        ("claude-cli/2.1.197 (external, sdk-cli)", "claude-code"),
        ("codex_exec/0.169.0 (Debian 12.0.0; x86_64) xterm (codex_exec; 0.169.0)", "codex"),
        ("codex_cli_rs/0.50.0 (Mac OS 15.1.0; arm64)", "codex"),
        ("opencode/1.18.33", "opencode"),
        ("OpenAI/Python 2.3.0", "openai-python"),
        ("Anthropic/Python 0.70.0", "anthropic-python"),
        ("Anthropic/JS 0.94.0", "anthropic-node"),
        ("goose/1.0", "goose"),
        ("curl/8.5.0", "curl"),
        ("", "unknown"),
    ],
)
def test_agent_from_user_agent(user_agent: str, agent: str) -> None:
    assert agent_name(CIMultiDict({"User-Agent": user_agent})) == agent


def test_agent_without_user_agent() -> None:
    assert agent_name(CIMultiDict()) == "unknown"


def test_agent_header_overrides_user_agent() -> None:
    headers = CIMultiDict({"User-Agent": "OpenAI/Python 2.3.0", "X-Gateway-Agent": "my-bot"})
    assert agent_name(headers) == "my-bot"
    assert identify(headers, None).agent == "my-bot"


# -- key hash ------------------------------------------------------------------------------------


def test_identity_carries_the_key_hash_only() -> None:
    headers = CIMultiDict({"x-api-key": "sk-ant-secret", "X-Gateway-Session": "s"})
    who = credential(headers, "anthropic")
    ident = identify(headers, None, None, who)
    assert ident.key_hash == who.key_hash is not None
    assert "sk-ant-secret" not in repr(ident)


# -- ids that clean down to nothing ----------------------------------------------------------------

EMPTY_IDS = ["\x00", "\u200b", "\xa0", "   ", "\u200b\xa0 \t\u2060\ufeff", "\x1b"]


@pytest.mark.parametrize("value", EMPTY_IDS)
def test_an_id_that_cleans_to_nothing_falls_through(value: str) -> None:
    """Once, all of these were the one shared session ``""``."""
    headers = CIMultiDict({"X-Gateway-Session": value, "x-session-id": "next-1"})
    assert identify(headers, None).session_id == "next-1"
    ident = identify(CIMultiDict({"X-Gateway-Session": value}), None, path_session=value)
    assert ident.source == "fingerprint"
    assert ident.session_id.startswith("fp_")


def test_format_characters_and_other_spaces_are_dropped() -> None:
    headers = CIMultiDict({"X-Gateway-Session": "\xa0\u200bab\u200bc\u2028\xa0"})
    assert identify(headers, None).session_id == "abc"


def test_the_qualifier_is_reserved() -> None:
    """A client cannot name another key's qualified session."""
    headers = CIMultiDict({"X-Gateway-Session": "victim~0123456789ab"})
    assert identify(headers, None).session_id == "victim-0123456789ab"


# -- sessions belong to their key ------------------------------------------------------------------


def _record(session: str, key: str | None) -> SessionRecord:
    return SessionRecord(
        id=session, source="explicit", agent="a", first_seen=0, last_seen=0, key_hash=key
    )


async def _own(
    ident: Identity, records: list[SessionRecord]
) -> tuple[Identity, SessionRecord | None]:
    by_id = {r.id: r for r in records}

    async def get(session: str) -> SessionRecord | None:
        return by_id.get(session)

    return await own_session(ident, get)


async def test_own_session_new_and_own() -> None:
    mine = Identity("s", "explicit", "a", key_hash="aaaaaaaaaaaa")
    assert await _own(mine, []) == (mine, None)
    owned = _record("s", "aaaaaaaaaaaa")
    assert await _own(mine, [owned]) == (mine, owned)


async def test_own_session_of_another_key_is_qualified() -> None:
    mine = Identity("s", "explicit", "a", key_hash="bbbbbbbbbbbb")
    ident, record = await _own(mine, [_record("s", "aaaaaaaaaaaa")])
    assert (ident.session_id, record) == ("s~bbbbbbbbbbbb", None)
    assert ident == qualified(mine)
    later = _record("s~bbbbbbbbbbbb", "bbbbbbbbbbbb")
    assert await _own(mine, [_record("s", "aaaaaaaaaaaa"), later]) == (ident, later)
    # Without a key, a namespace of its own too.
    anonymous = Identity("s", "explicit", "a")
    ident, _ = await _own(anonymous, [_record("s", "aaaaaaaaaaaa")])
    assert ident.session_id == "s~nokey"


async def test_own_session_taken_twice_is_refused() -> None:
    mine = Identity("s", "explicit", "a", key_hash="bbbbbbbbbbbb")
    records = [_record("s", "aaaaaaaaaaaa"), _record("s~bbbbbbbbbbbb", "cccccccccccc")]
    with pytest.raises(SessionTaken):
        await _own(mine, records)


# -- fingerprint ---------------------------------------------------------------------------------


def _chat_body(
    messages: list[dict[str, Any]], system: str = "be brief", tool: str = "ls"
) -> dict[str, Any]:
    return {
        "model": "gpt-4o",
        "messages": [{"role": "system", "content": system}, *messages],
        "tools": [{"type": "function", "function": {"name": tool, "parameters": {}}}],
    }


TURN1 = [{"role": "user", "content": "list files"}]
TURN2 = [
    *TURN1,
    {"role": "assistant", "tool_calls": [{"id": "c1"}]},
    {"role": "tool", "tool_call_id": "c1", "content": "a.txt"},
]
KEY = CIMultiDict({"Authorization": "Bearer sk-1"})


def _fp(body: dict[str, Any], headers: CIMultiDict[str] = KEY) -> str:
    ident = identify(headers, OPENAI_CHAT.read_request(body), None, credential(headers, "openai"))
    assert ident.source == "fingerprint"
    return ident.session_id


def test_fingerprint_is_stable_as_history_grows() -> None:
    assert re.fullmatch(r"fp_[0-9a-f]{20}", _fp(_chat_body(TURN1)))
    assert _fp(_chat_body(TURN1)) == _fp(_chat_body(TURN2))


def test_fingerprint_differs_by_system_prompt_key_and_tools() -> None:
    base = _fp(_chat_body(TURN1))
    assert _fp(_chat_body(TURN1, system="be verbose")) != base
    assert _fp(_chat_body(TURN1), CIMultiDict({"Authorization": "Bearer sk-2"})) != base
    assert _fp(_chat_body(TURN1), CIMultiDict()) != base
    assert _fp(_chat_body(TURN1, tool="cat")) != base
    assert _fp(_chat_body([{"role": "user", "content": "other task"}])) != base


def test_fingerprint_ignores_tool_order() -> None:
    a = _facts(tools=[{"name": "Read"}, {"name": "Bash"}])
    b = _facts(tools=[{"name": "Bash"}, {"name": "Read"}])
    assert fingerprint("k", a) == fingerprint("k", b)


def test_fingerprint_of_anthropic_conversation_is_stable() -> None:
    recorded = load_fixture("claude-code-2.1.197-messages-turn4.json")
    body = recorded["body"]
    earlier = {**body, "messages": body["messages"][:2]}
    full = ANTHROPIC_MESSAGES.read_request(body)
    start = ANTHROPIC_MESSAGES.read_request(earlier)
    assert fingerprint("k", full) == fingerprint("k", start)
