"""One redaction for every sink: the log formatter, the span exporter, the audit writer, the
error builder and the config dump all call ``REDACTOR.redact(text, sink)``.

It knows every loaded secret's exact value (each ``Secret`` registers itself) and the shapes
of common credentials: provider keys, gateway keys, JWTs, bearer tokens, PEM private keys. A
hit becomes ``[REDACTED]`` and is counted per sink (``gateway_redactions_total{sink}``), so a
sink that starts receiving secrets shows on a dashboard before it shows in an incident.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from functools import lru_cache

import orjson

REPLACEMENT = "[REDACTED]"
MIN_KNOWN = 8
"""Values shorter than this are not scrubbed by value (a 3-character "key" would blank every
word it appears in); such a secret is refused where it is configured."""
SINKS = ("log", "span", "audit", "error", "config", "claim")
"""``claim``: what a client asserts (session id and name, agent, User-Agent, model), redacted
where it comes in, since it is then stored, shown, echoed and used as a label."""

_PATTERNS = re.compile(
    "|".join(
        (
            r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?"
            r"(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|$)",
            r"(?<![A-Za-z0-9])gw_[A-Za-z0-9]{6,32}_[A-Za-z0-9]{40,}",  # gateway keys
            r"\bsk-(?:ant-|proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{16,}",  # OpenAI, Anthropic keys
            r"\beyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*",  # JWTs
            r"\b[Bb][Ee][Aa][Rr][Ee][Rr][ \t]+[A-Za-z0-9._~+/\-]{12,}=*",
            r"\bAKIA[0-9A-Z]{16}\b",  # cloud access key ids, as often pasted beside the rest
        )
    )
)


_MARKERS = ("-----BEGIN", "gw_", "sk-", "eyJ", "AKIA", "earer", "EARER")
"""Literal pieces every credential shape contains: text holding none of them is clean, found
by substring searches (C speed) instead of the patterns (about 0.1 µs a character)."""


class Redactor:
    """Thread-safe: the log writer and the span exporter call it from their own threads."""

    def __init__(self) -> None:
        self._known: tuple[str, ...] = ()
        """Longest first, so a secret that contains another is scrubbed whole."""
        self._escaped: tuple[str, ...] = ()
        """The known values and their JSON-escaped forms (``dirty`` looks for both)."""
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        """Redactions per sink since start (read by the metrics when scraped)."""

    def know(self, value: str) -> None:
        """A secret's exact value, scrubbed wherever it appears from now on."""
        value = value.strip()
        if len(value) < MIN_KNOWN or value in self._known:
            return
        if value.startswith("gw_") and _PATTERNS.fullmatch(value):
            # Gateway keys, thousands of them: their shape is scrubbed wherever it stands
            # (no letter or digit before it), so the list every redaction walks stays short.
            return
        with self._lock:
            self._known = tuple(sorted({*self._known, value}, key=len, reverse=True))
            escaped = orjson.dumps(value).decode()[1:-1]  # as a JSON line carries it
            self._escaped = tuple({*self._escaped, value, escaped})
            _claim.cache_clear()  # a claim cleaned before this secret was known: again

    def known(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """What it knows now, for ``forget_since`` (a process that builds many apps, the
        tests, forgets the secrets of the ones it closed)."""
        return self._known, self._escaped

    def forget_since(self, known: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
        with self._lock:
            self._known, self._escaped = known
        _claim.cache_clear()

    def dirty(self, text: str) -> bool:
        """Whether ``text`` may hold something to scrub: a known value (as is, or as JSON
        writes it) or a credential shape's marker. False: ``redact`` would change nothing."""
        for value in self._escaped:
            if value in text:
                return True
        return any(marker in text for marker in _MARKERS)

    def redact(self, text: str, sink: str) -> str:
        """``text`` with every known secret and every credential shape replaced."""
        hits = 0
        for value in self._known:  # a handful of secrets: one substring search each
            if value in text:
                hits += text.count(value)
                text = text.replace(value, REPLACEMENT)
        if any(marker in text for marker in _MARKERS):
            text, shaped = _PATTERNS.subn(REPLACEMENT, text)
            hits += shaped
        if hits:
            with self._lock:
                self.counts[sink] += hits
        return text

    def redact_value(self, value: object, sink: str) -> object:
        """A structured value (a log record's fields, an audit line) with its strings redacted."""
        if isinstance(value, str):
            return self.redact(value, sink)
        if isinstance(value, dict):
            return {k: self.redact_value(v, sink) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.redact_value(v, sink) for v in value]
        return value


REDACTOR = Redactor()
"""The process's one redactor: secrets are process-wide (they come from the environment and
files), so every app in the process scrubs every one of them."""


def claim(value: str) -> str:
    """A client's claim (a session id, an agent, a model name) with any secret in it
    replaced: claims repeat turn after turn, so each distinct short one is looked at once
    (a long one, which no real claim is, is looked at every time and never kept)."""
    if len(value) > MAX_CACHED_CLAIM:
        return REDACTOR.redact(value, "claim")
    return _claim(value)


MAX_CACHED_CLAIM = 512


@lru_cache(maxsize=8192)
def _claim(value: str) -> str:
    return REDACTOR.redact(value, "claim")
