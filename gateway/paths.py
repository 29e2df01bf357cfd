"""The one path of a request: what routing matches and what is sent upstream are the same.

An upstream that normalises paths (most servers do: they decode ``%2F``, drop ``/./``, resolve
``/../``, fold case or a trailing slash) would answer ``/v1/chat%2Fcompletions`` as the chat
endpoint. If the gateway routed such a spelling as an unknown path, it would pass it through
untouched: no policy, no accounting. So every path below ``/v1`` is checked once, here, before
anything routes it, and a path is accepted only in the one spelling that cannot mean anything
else to any server:

- no empty, ``.`` or ``..`` segment, no backslash, no ``;`` (path parameters, which some
  servers strip);
- percent-encoding only for bytes that need it: an encoded separator (``%2F``, ``%5C``,
  ``%3F``, ``%23``), an encoded unreserved character (``%2E``, ``%63``...), an encoded control
  character or white space is refused;
- no case variant of an LLM route (``/v1/Chat/Completions``, nor one spelled with letters that
  upper-case to ASCII, as U+0131 and U+017F do), no segment ending in a dot (Windows servers drop
  it), no ``%25`` (a second decoding by a proxy in front of the upstream).

What is accepted is routed by its raw text and sent upstream as that same raw text, appended
below the upstream's base path: with no dot segment and no encoded separator it cannot climb
out of the base, whatever the upstream decodes.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote

from gateway.dialects import ROUTES

COUNT_TOKENS = "/v1/messages/count_tokens"
LLM_PATHS = frozenset(ROUTES) | {COUNT_TOKENS}
_FOLDED = frozenset(path.lower() for path in LLM_PATHS)
_SESSION_PREFIX = "/s/"
_API_PREFIX = "/v1/"
# Characters that never appear in a valid path as sent (literally or encoded).
_FORBIDDEN = frozenset("/\\?#;")
_UNRESERVED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~")
# A quick screen for the common case: a raw path without any of these needs no further look.
_SUSPECT = ("%", ".", "//", "\\", ";")


class PathRefused(ValueError):
    """A path spelled so that a server could read it as another path (the message says how)."""


@dataclass(slots=True, frozen=True)
class ProviderPath:
    path: str
    """The provider path (``/v1/...``), exactly as sent: routing matches it and the upstream
    receives it (below its base path)."""
    session: str | None = None
    """The ``/s/<session>/`` prefix's session id, decoded."""


def provider_path(raw: str) -> ProviderPath:
    """The checked path of a request, from its raw (still percent-encoded) path, without the
    query. Raises ``PathRefused``."""
    exact = _EXACT.get(raw)
    if exact is not None:
        return exact  # an LLM route as it is spelled: nothing to check (most calls)
    session = None
    if raw[:3] == _SESSION_PREFIX:
        end = raw.find("/", 3)
        if end < 0:
            raise PathRefused("the path has no API path after the session id")
        session = _segment(raw[3:end], "session id")
        raw = raw[end:]
    if raw[:4] != _API_PREFIX:
        raise PathRefused("the API path must start with /v1/")
    if any(mark in raw for mark in _SUSPECT):
        for segment in raw[4:].split("/"):
            _segment(segment, "path segment")
    elif raw[-1] == "/":
        raise PathRefused("the path has an empty segment (a trailing or doubled slash)")
    if raw not in LLM_PATHS and (raw.lower() in _FOLDED or ("%" in raw and _folds_to_route(raw))):
        raise PathRefused(f"the API path is a different spelling of {_fold(unquote(raw))}")
    return ProviderPath(raw, session)


_EXACT = {path: ProviderPath(path) for path in LLM_PATHS}


def _fold(text: str) -> str:
    # upper() first: it maps letters such as U+0131 and U+017F to ASCII ones, as case-insensitive
    # comparisons on some servers do; NFKC folds compatibility forms (full-width letters).
    return unicodedata.normalize("NFKC", text).upper().lower()


def _folds_to_route(raw: str) -> bool:
    return _fold(unquote(raw)) in _FOLDED


def _segment(segment: str, what: str) -> str:
    """One raw segment, decoded, or ``PathRefused``."""
    if segment in ("", ".", ".."):
        raise PathRefused(f"a {what} is empty, '.' or '..': send the path without dot segments")
    if segment[-1] == ".":
        raise PathRefused(f"a {what} ends with a dot")
    if "\\" in segment or ";" in segment:
        raise PathRefused(f"a {what} holds a backslash or ';'")
    if "%" not in segment:
        return segment
    index = segment.find("%")
    while index >= 0:
        code = segment[index + 1 : index + 3]
        if len(code) != 2 or not _is_hex(code):
            raise PathRefused(f"a {what} has a malformed percent-encoding")
        char = chr(int(code, 16))
        if (
            char in _FORBIDDEN
            or char in _UNRESERVED
            or char == "%"
            or int(code, 16) <= 0x20
            or code.upper() == "7F"
        ):
            raise PathRefused(
                f"a {what} percent-encodes {char!r}: send separators, dots and letters as they are"
            )
        index = segment.find("%", index + 3)
    try:
        decoded = unquote(segment, errors="strict")
    except UnicodeDecodeError as exc:
        raise PathRefused(f"a {what} is not UTF-8 once decoded") from exc
    if any(ch in _FORBIDDEN or ch <= " " or ch == "\x7f" for ch in decoded):
        raise PathRefused(f"a {what} decodes to a separator, control or space character")
    return decoded


def _is_hex(code: str) -> bool:
    return all(ch in "0123456789abcdefABCDEF" for ch in code)
