"""Who is calling: the session, its source, the agent, and a short hash of the caller's key.

A session id is looked up in a fixed order, first match wins (see ``SOURCES``). Agent-native ids
come before body fields, and a fingerprint of the conversation's stable start is the last
resort, for clients (aider, bare SDK code) that send no id at all. An id that cleans down to
nothing (``%00``, a zero-width space) is no id: the next source decides.

A session belongs to the key that started it (``own_session``). Another key naming the same
id gets a session of its own, ``<id>~<its key hash>`` (``<id>~nokey`` without a key), so it
never sees or spends the owner's figures; ``~`` is reserved for that and is ``-`` in a
client's own ids. An agent whose login token is refreshed mid-session goes on the same way,
under the qualified id with fresh counts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING

import orjson

from gateway.credentials import NO_CREDENTIAL, Credential
from gateway.dialects.base import RequestFacts, as_dict
from gateway.errors import SessionTaken
from gateway.redact import claim

if TYPE_CHECKING:
    from gateway.store.records import SessionRecord

MAX_ID_LENGTH = 200
AGENT_LENGTH = 64
"""An agent's name is cleaned to this length here, so its readers need no cap of their own."""
QUALIFIER = "~"
"""Between a session id and the key hash of a caller that is not its owner."""

# (where, header or body hint) in order of trust. Headers are matched case-insensitively.
SOURCES: tuple[tuple[str, str], ...] = (
    ("explicit", "x-gateway-session"),
    ("path", ""),
    ("claude-code", "x-claude-code-session-id"),
    ("claude-code", "metadata.user_id"),
    ("codex", "session-id"),
    ("codex", "session_id"),
    ("codex", "prompt_cache_key"),
    ("header", "agent-session-id"),
    ("header", "x-session-id"),
    ("header", "x-session-affinity"),
    ("header", "helicone-session-id"),
    ("header", "x-litellm-session-id"),
    ("body", "metadata.session_id"),
    ("body", "user"),
)
_BODY_HINTS = frozenset({"metadata.user_id", "prompt_cache_key", "metadata.session_id", "user"})

# User-Agent prefixes of known agents and SDKs, lowercased, most specific first.
AGENTS: tuple[tuple[str, str], ...] = (
    ("claude-cli/", "claude-code"),
    ("claude-code/", "claude-code"),
    ("codex_exec/", "codex"),
    ("codex_cli_rs/", "codex"),
    ("codex", "codex"),
    ("opencode/", "opencode"),
    ("goose", "goose"),
    ("aider", "aider"),
    ("litellm/", "litellm"),
    ("anthropic/python", "anthropic-python"),
    ("asyncanthropic/python", "anthropic-python"),
    ("openai/python", "openai-python"),
    ("asyncopenai/python", "openai-python"),
    ("anthropic/js", "anthropic-node"),
    ("openai/js", "openai-node"),
)


@dataclass(slots=True, frozen=True)
class Identity:
    session_id: str
    source: str
    """Where the id came from: explicit, path, claude-code, codex, header, body, fingerprint."""
    agent: str
    """Printable, at most ``AGENT_LENGTH`` characters."""
    name: str | None = None
    key_hash: str | None = None
    """A short, non-reversible tag of the credential that goes upstream (``credentials``)."""
    drop_header: str | None = None
    """The credential header that does not go upstream."""
    team: str | None = None
    """The caller's team, from its credential (or the policy's ``keys`` and a trusted
    ``team_header`` in passthrough mode): never from what the client asserts."""
    principal: str | None = None
    """The principal's public id (``key:<id>``, ``jwt:<sub>``, ``passthrough:<hash>``)."""


def agent_name(headers: Mapping[str, str]) -> str:
    explicit = headers.get("x-gateway-agent")
    if explicit and (explicit := _clean(explicit, AGENT_LENGTH)):
        return explicit
    return _agent_of(headers.get("user-agent", ""))


@lru_cache(maxsize=1024)
def _agent_of(user_agent: str) -> str:
    user_agent = claim(user_agent).lower()  # redacted before a secret's case is lost
    for prefix, agent in AGENTS:
        if user_agent.startswith(prefix):
            return agent
    product = user_agent.split("/", 1)[0].split(" ", 1)[0]
    return _clean(product, AGENT_LENGTH) if product else "unknown"


def identify(
    headers: Mapping[str, str],
    facts: RequestFacts | None,
    path_session: str | None = None,
    credential: Credential = NO_CREDENTIAL,
    team: str | None = None,
    principal: str | None = None,
) -> Identity:
    hashed = credential.key_hash
    agent = agent_name(headers)
    name = headers.get("x-gateway-session-name")
    name = _clean(name, 120) if name else None
    hints = facts.session_hints if facts is not None else {}
    for source, where in SOURCES:
        if source == "path":
            value = path_session
        elif where in _BODY_HINTS:
            value = hints.get(where)
        else:
            value = headers.get(where)
        if value and (session_id := _clean(value, MAX_ID_LENGTH)):
            if QUALIFIER in session_id:  # reserved for the gateway's qualified ids
                session_id = session_id.replace(QUALIFIER, "-")
            return Identity(
                session_id, source, agent, name, hashed, credential.drop, team, principal
            )
    fingerprinted = fingerprint(hashed, facts)
    drop = credential.drop
    return Identity(fingerprinted, "fingerprint", agent, name, hashed, drop, team, principal)


def qualified(identity: Identity) -> Identity:
    """The caller's own session under an id another key started."""
    owner = identity.key_hash or "nokey"
    return replace(identity, session_id=f"{identity.session_id}{QUALIFIER}{owner}")


async def own_session(
    identity: Identity, get: Callable[[str], Awaitable[SessionRecord | None]]
) -> tuple[Identity, SessionRecord | None]:
    """The caller's session: the id it named when that is new or its key's, else the
    qualified id. The store checks again when the turn begins (``check_and_reserve``): two
    keys may start the same new id at once."""
    record = await get(identity.session_id)
    if record is None or record.key_hash == identity.key_hash:
        return identity, record
    identity = qualified(identity)
    record = await get(identity.session_id)
    if record is None or record.key_hash == identity.key_hash:
        return identity, record
    raise SessionTaken(identity.session_id)


def fingerprint(hashed_key: str | None, facts: RequestFacts | None) -> str:
    """Stable across turns: the start of a conversation is resent unchanged every turn.

    The first user message alone is not enough (Claude Code puts the project's instructions
    there, the same for every session in a project), so key, system prompt and tool names
    are mixed in.
    """
    digest = hashlib.sha256((hashed_key or "-").encode())
    if facts is not None:
        tool_names = sorted(
            str(tool.get("name") or as_dict(tool.get("function")).get("name"))
            for tool in facts.tools
            if isinstance(tool, dict)
        )
        for part in (facts.system, facts.first_user, tool_names):
            digest.update(b"\x00")
            digest.update(orjson.dumps(part, option=orjson.OPT_SORT_KEYS))
    return "fp_" + digest.hexdigest()[:20]


def _clean(value: str, limit: int) -> str:
    """Printable, bounded and without secrets: these values end up in the store, logs, the
    admin API and answer headers. Control and format characters (NUL, ESC, zero-width spaces)
    and any space but ' ' (tab, NBSP) are not printable, so they go; a secret a client put in
    its claim (``redact.claim``) is replaced."""
    # Printable first (a zero-width space inside a secret must not hide it), redacted with
    # room to spare (a secret cut at the limit would leave most of itself), then cut.
    value = value[: limit + _SPARE]
    if not value.isprintable():
        value = "".join(ch for ch in value if ch.isprintable())
    return claim(value)[:limit].strip()


_SPARE = 512
"""Characters past a claim's limit looked at by the redactor, so a secret the limit cuts
through is still recognised whole."""
