"""Context windows of current models, in input tokens.

The table holds what the providers publish; a policy's ``windows`` map overrides it, and a model
in neither uses ``context.default_window``. Agents still send retired model ids, so old ones
stay listed. Entries are globs, matched on the model id without any ``provider/`` prefix; the
most specific (longest) matching glob wins.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from fnmatch import fnmatchcase

BUILTIN: dict[str, int] = {
    # Anthropic: 200K for every current model (1M needs a beta header the client sends).
    "claude-*": 200_000,
    # OpenAI. GPT-5 models have a 400K window of which 272K may be input.
    "gpt-5*": 272_000,
    "gpt-4.1*": 1_047_576,
    "gpt-4o*": 128_000,
    "gpt-4-turbo*": 128_000,
    "gpt-4-32k*": 32_768,
    "gpt-4": 8_192,
    "gpt-4-0613": 8_192,
    "gpt-3.5-turbo*": 16_385,
    "o1*": 200_000,
    "o3*": 200_000,
    "o4-mini*": 200_000,
    "codex-mini*": 200_000,
    "gpt-oss-*": 131_072,
}


Table = tuple[tuple[str, int], ...]
BUILTIN_TABLE: Table = tuple(BUILTIN.items())


def window_of(model: str | None, overrides: Mapping[str, int] | Table, default: int) -> int:
    """The model's window: the policy's ``windows`` first, then the built-in table."""
    if not model:
        return default
    name = model.rsplit("/", 1)[-1].lower()
    if overrides:
        table = tuple(overrides.items()) if isinstance(overrides, Mapping) else overrides
        found = _lookup(name, table)
        if found is not None:
            return found
    found = _lookup(name, BUILTIN_TABLE)
    return default if found is None else found


@functools.lru_cache(maxsize=1024)
def _lookup(name: str, table: Table) -> int | None:
    matches = [(len(glob), window) for glob, window in table if fnmatchcase(name, glob.lower())]
    return max(matches)[1] if matches else None
