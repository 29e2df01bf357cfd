"""Policy files made to hurt a loader: not UTF-8, too deep, alias bombs, too big, too many
rules; each with where its error is and what it says."""

from __future__ import annotations


def deep(levels: int) -> bytes:
    return ("version: 1\nx: " + "[" * levels + "]" * levels + "\n").encode()


def alias_bomb() -> bytes:
    lines = ["version: 1", "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, 10):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return ("\n".join(lines) + "\n").encode()


def rules(count: int) -> bytes:
    listed = "".join(
        f"  - name: rule-{i}\n    match: {{agent: agent-{i}, model: 'gpt-{i}*'}}\n"
        f"    limits: {{max_turns: {i % 50 + 1}}}\n"
        for i in range(count)
    )
    return f"version: 1\nrules:\n{listed}".encode()


HOSTILE = {
    "not-utf8": (
        b"version: 1\ndefaults:\n  limits: {max_turns: 3}\n# caf\xff\n",
        "line 4: ",
        "UTF-8",
    ),
    "deep-flow": (deep(100), "line 2: ", "nested more than 64 levels deep"),
    "deep-block": (
        b"version: 1\n" + "".join("  " * i + f"k{i}:\n" for i in range(100)).encode(),
        "line 66: ",
        "nested more than 64 levels deep",
    ),
    "very-deep": (deep(100_000), "line 2: ", "nest"),  # libyaml stops it first
    "alias-bomb": (alias_bomb(), "line ", "alias bomb"),
    "oversized": (b"version: 1\n" + b"#" * (2 * 1024 * 1024) + b"\n", "", "larger than 1024 KiB"),
    "too-many-rules": (
        b"version: 1\nrules:\n" + b"  - {match: {agent: a}}\n" * 10_001,
        "line 2: ",
        "10001 rules, more than the 10000 allowed",
    ),
}
