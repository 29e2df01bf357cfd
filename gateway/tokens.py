"""Token estimates with tiktoken, offline and incremental.

The rank tables ship inside the package (``gateway/data/tiktoken``, under the cache file names
tiktoken looks for), so counting never touches the network. Counts are cached per message: an
agent resends its whole history every turn, and only the new messages cost anything.

Counting runs on the event loop (policy, compaction and accounting call it synchronously), so
its cost is bounded whatever the body, in two ways:

- Text reaches BPE in pieces of at most ``PIECE`` characters. tiktoken's BPE is superlinear in
  the length of one pre-token, and a run without whitespace (one character repeated, digits,
  base64) is one pre-token: 10 MB of one character held the loop for 9.5 s. Cut into pieces,
  every text costs linear time; a cut may add a token at a boundary (well under 1%).
- The counter spends at most ``BUDGET`` seconds encoding before the event loop gets to run
  again (a ``call_soon`` callback renews the budget when the loop turns), so counting never
  holds the loop for more than a few milliseconds at a stretch. Past the budget the rest of
  a text is estimated from what was counted, at its own tokens per character (or the
  counter's running figure for a text not begun), never below ``MIN_RATIO``: text that
  runs sparser (repeated characters, plain English prose) is then over-counted (an upper
  bound for decisions), denser text (code, data, other scripts) is estimated at its own
  rate. Estimates are not cached, so a long history is counted exactly over the next turns
  as it comes back. Off an event loop (the CLI, plain functions in tests) nothing is held
  up, and everything is counted.

Counting off the loop (a thread) was not chosen: policy, compaction and accounting decide
synchronously, and a thread hop on every counted call would pay for a case that only a hostile
or broken client makes.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import os
import time
from collections.abc import Iterable
from importlib import resources
from typing import Any

import msgspec
import orjson
import tiktoken
from xxhash import xxh3_64_intdigest

from gateway.dialects.envelope import load_json
from gateway.dialects.text import count_texts

O200K = "o200k_base"
CL100K = "cl100k_base"

# Older OpenAI models use cl100k; everything else (current OpenAI models, and other providers,
# for which o200k is only an estimate) uses o200k.
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "text-embedding-3", "text-embedding-ada")
_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5")

# Per-message framing tokens (role markers and separators) that the text alone does not show.
MESSAGE_OVERHEAD = 3

PIECE = 2048
"""Characters handed to BPE at once: worst case (one character repeated) about 0.3 ms each."""
BUDGET = 0.004
"""Seconds of encoding allowed before the event loop runs again; past it, texts are estimated."""
MIN_RATIO = 0.25
"""Tokens per character an estimate never goes below (English prose runs about 0.22-0.25)."""


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

    def __init__(self, max_entries: int = 100_000, budget: float = BUDGET) -> None:
        use_bundled_tables()
        self._encodings: dict[str, tiktoken.Encoding] = {}
        # Per encoding: an item's count by the XXH3 hash of its JSON bytes (64-bit: at 100,000
        # entries a collision is a one-in-a-billion event, and would misjudge one message).
        # XXH3 reads the buffer where it lies; ``hash()`` would need a bytes copy of each
        # message, and hashes at a tenth of the speed.
        self._cache: dict[str, dict[int, int]] = {O200K: {}, CL100K: {}}
        self._max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self.estimated = 0
        """Texts only partly counted for want of budget (their counts are estimates)."""
        self._budget = budget
        self._spent = 0.0
        self._armed: asyncio.AbstractEventLoop | None = None
        """The loop whose next turn renews the budget (None: renewed)."""
        self._ratio = MIN_RATIO
        """Tokens per character of what was counted lately: the guess for a text not begun."""

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
        return self._tokens(encoding_for(model), text)[0]

    def _tokens(self, encoding: str, text: str) -> tuple[int, bool]:
        """Tokens of ``text``, and whether that is a count (not an estimate): in bounded pieces,
        within the time budget (see the module's docstring)."""
        enc = self._encoding(encoding)
        length = len(text)
        budget = self._left()
        started = now = time.perf_counter()
        tokens = done = 0
        while done < length and now - started < budget:
            piece = text[done : done + PIECE] if length > PIECE else text
            tokens += len(enc.encode(piece, disallowed_special=()))
            done += len(piece)
            now = time.perf_counter()
        self._spent += now - started
        if done >= length:
            if length >= PIECE:
                self._ratio = max(MIN_RATIO, tokens / length)
            return tokens, True
        self.estimated += 1
        ratio = max(MIN_RATIO, tokens / done if done else self._ratio)
        return tokens + math.ceil((length - done) * ratio), False

    def _left(self) -> float:
        """Seconds of encoding left before the loop must run again."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return math.inf  # not on an event loop: nothing to hold up
        if self._armed is not loop:
            self._armed, self._spent = loop, 0.0
            loop.call_soon(self._renew)
        return self._budget - self._spent

    def _renew(self) -> None:
        self._armed = None

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
                count = get(xxh3_64_intdigest(item))
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
            raw: msgspec.Raw | bytes = item
            item = None
        elif isinstance(item, str):
            raw = item.encode()
        else:
            raw = orjson.dumps(item)
        cache = self._cache[encoding]
        key = xxh3_64_intdigest(raw)
        cached = cache.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        text, extra = _text_of(load_json(raw) if item is None else item)
        count, exact = self._tokens(encoding, text)
        count += extra
        if not exact:
            return count  # not cached: counted properly when it comes back with budget
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
    extra = count_texts(item, parts)
    return "\n".join(parts), extra
