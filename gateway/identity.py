"""Who is calling: the session, its source, the agent, and a short hash of the caller's key.

A session id is looked up in a fixed order, first match wins (see ``SOURCES``). Agent-native ids
come before body fields, and a fingerprint of the conversation's stable start is the last
resort, for clients (aider, bare SDK code) that send no id at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import orjson

from gateway.dialects.base import RequestFacts, as_dict

MAX_ID_LENGTH = 200

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
    name: str | None = None
    key_hash: str | None = None


def key_hash(headers: Mapping[str, str]) -> str | None:
    """A short, non-reversible tag for the caller's API key; the key itself is never kept."""
    key = headers.get("x-api-key")
    if not key:
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        key = token.strip() if scheme.lower() == "bearer" else ""
    return _hash_key(key) if key else None


@lru_cache(maxsize=4096)
def _hash_key(key: str) -> str:
    """Callers reuse a handful of keys: one hash each, not one per request."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def agent_name(headers: Mapping[str, str]) -> str:
    explicit = _clean(headers.get("x-gateway-agent", ""), 64)
    if explicit:
        return explicit
    return _agent_of(headers.get("user-agent", ""))


@lru_cache(maxsize=1024)
def _agent_of(user_agent: str) -> str:
    user_agent = user_agent.lower()
    for prefix, agent in AGENTS:
        if user_agent.startswith(prefix):
            return agent
    product = user_agent.split("/", 1)[0].split(" ", 1)[0]
    return _clean(product, 64) if product else "unknown"


def identify(
    headers: Mapping[str, str], facts: RequestFacts | None, path_session: str | None = None
) -> Identity:
    hashed = key_hash(headers)
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
        if value:
            return Identity(_clean(value, MAX_ID_LENGTH), source, agent, name, hashed)
    return Identity(fingerprint(hashed, facts), "fingerprint", agent, name, hashed)


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
    """Printable and bounded: these values end up in logs and the admin API."""
    value = value[:limit]
    if not value.isprintable():
        value = "".join(ch for ch in value if ch.isprintable())
    return value.strip()
