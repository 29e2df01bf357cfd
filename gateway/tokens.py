"""Token estimates with tiktoken, offline and incremental.

The rank tables ship inside the package (``gateway/data/tiktoken``, under the cache file names
tiktoken looks for), so counting never touches the network. Counts are cached per message: an
agent resends its whole history every turn, and only the new messages cost anything.
"""

from __future__ import annotations

import functools
import itertools
import os
from collections.abc import Iterable
from importlib import resources
from typing import Any

import msgspec
import orjson
import tiktoken

O200K = "o200k_base"
CL100K = "cl100k_base"

# Older OpenAI models use cl100k; everything else (current OpenAI models, and other providers,
# for which o200k is only an estimate) uses o200k.
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "text-embedding-3", "text-embedding-ada")
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5")

# Per-message framing tokens (role markers and separators) that the text alone does not show.
MESSAGE_OVERHEAD = 3


def use_bundled_tables() -> None:
    """Point tiktoken at the bundled rank tables unless the operator chose a cache dir."""
    if "TIKTOKEN_CACHE_DIR" not in os.environ:
        folder = resources.files("gateway") / "data" / "tiktoken"
        os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)


@functools.lru_cache(maxsize=4096)
def encoding_for(model: str | None) -> str:
    if model:
        name = model.rsplit("/", 1)[-1].lower()
        if name.startswith(_O200K_PREFIXES):
            return O200K
        if name.startswith(_CL100K_PREFIXES):
            return CL100K
    return O200K


class TokenCounter:
    """Counts tokens of messages, remembering each message's count by its content hash."""

    def __init__(self, max_entries: int = 100_000) -> None:
        use_bundled_tables()
        self._encodings: dict[str, tiktoken.Encoding] = {}
        # Per encoding: an item's count by the hash of its JSON bytes (64-bit: at 100,000
        # entries a collision is a one-in-a-billion event, and would misjudge one message).
        self._cache: dict[str, dict[int, int]] = {O200K: {}, CL100K: {}}
        self._max_entries = max_entries
        self.hits = 0
        self.misses = 0

    def load(self) -> None:
        """Load both tables (about a second of CPU): call from a thread at start-up."""
        for name in (O200K, CL100K):
            self._encoding(name)

    def _encoding(self, name: str) -> tiktoken.Encoding:
        enc = self._encodings.get(name)
        if enc is None:
            enc = self._encodings[name] = tiktoken.get_encoding(name)
        return enc

    def count_text(self, text: str, model: str | None = None) -> int:
        enc = self._encoding(encoding_for(model))
        return len(enc.encode(text, disallowed_special=()))

    def count_content(self, parts: Iterable[Any], model: str | None = None) -> int:
        """Tokens of generated content (stream deltas, answer blocks): uncached, no framing."""
        total = 0
        texts: list[str] = []
        for part in parts:
            text, extra = _text_of(part)
            texts.append(text)
            total += extra
        return total + self.count_text("".join(texts), model)

    def count_items(self, items: Iterable[Any], model: str | None = None) -> int:
        """Tokens of a list of messages (or system blocks, or tool definitions)."""
        name = encoding_for(model)
        get = self._cache[name].get
        total = hits = seen = 0
        for item in items:
            seen += 1
            # The common case, inlined: an agent's history, all of it seen before.
            kind = type(item)
            if kind is msgspec.Raw or kind is bytes:
                count = get(hash(bytes(item)))
                if count is not None:
                    hits += 1
                    total += count
                    continue
            total += self._count_item(name, item)
        self.hits += hits
        return total + MESSAGE_OVERHEAD * seen

    def count_item(self, item: Any, model: str | None = None) -> int:
        """Tokens of one message with its framing, as ``count_items`` counts each."""
        return self._count_item(encoding_for(model), item) + MESSAGE_OVERHEAD

    def _count_item(self, encoding: str, item: Any) -> int:
        if isinstance(item, msgspec.Raw | bytes):
            # An element as JSON (lazily decoded, or written by compaction): its bytes are the
            # key, decoded only on a miss.
            raw = bytes(item)
            item = None
        elif isinstance(item, str):
            raw = item.encode()
        else:
            raw = orjson.dumps(item)
        cache = self._cache[encoding]
        key = hash(raw)
        cached = cache.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        text, extra = _text_of(orjson.loads(raw) if item is None else item)
        count = len(self._encoding(encoding).encode(text, disallowed_special=())) + extra
        if len(cache) >= self._max_entries:
            # Oldest first (dicts keep insertion order): a history's early messages come back
            # with every turn, and cost one count each when they do after an eviction.
            for old in list(itertools.islice(cache, len(cache) // 2)):
                del cache[old]
        cache[key] = count
        return count


def _text_of(item: Any) -> tuple[str, int]:
    """The text a model reads from a message, plus tokens for inline images and documents."""
    parts: list[str] = []
    extra = _collect(item, parts)
    return "\n".join(parts), extra


_SKIP_KEYS = frozenset(
    {"type", "id", "call_id", "tool_use_id", "tool_call_id", "cache_control", "signature", "status"}
)
# A base64 image or document is billed by its pixels or pages, not its characters; this is the
# providers' typical figure for one image.
INLINE_MEDIA_TOKENS = 1600
_MEDIA_KEYS = frozenset({"data", "image_url", "file_data"})


def _collect(value: Any, parts: list[str]) -> int:
    extra = 0
    if isinstance(value, str):
        parts.append(value)
    elif isinstance(value, dict):
        for key, child in value.items():
            if key in _SKIP_KEYS:
                continue
            if key in _MEDIA_KEYS and isinstance(child, str) and len(child) > 1024:
                extra += INLINE_MEDIA_TOKENS
                continue
            extra += _collect(child, parts)
    elif isinstance(value, list):
        for child in value:
            extra += _collect(child, parts)
    elif value is not None and not isinstance(value, bool):
        parts.append(str(value))
    return extra
