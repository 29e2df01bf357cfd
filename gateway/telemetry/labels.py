"""Open-valued metric labels (model, agent, team, budget owner), bounded in number.

Each value is capped in length (``gateway.caps``) and, past the label's cap, counted as
``other`` (the folding itself in ``gateway_label_overflow_total``). Recognised values
(``Names``: the agents the gateway knows, the models of its window table and those the policy
names) keep their own label ahead of the made-up ones a client could send to fill the cap.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.caps import LIMIT, cap
from gateway.identity import AGENTS
from gateway.telemetry.instruments import Counter

if TYPE_CHECKING:
    from gateway.policy.model import PolicyFile

OTHER = "other"

UNKNOWN, MATCHED, NAMED = 0, 1, 2
"""How well a label value is recognised: not at all, by a glob (``claude-*``), by its name."""


@dataclass(slots=True, frozen=True, eq=False)
class Names:
    """The values of one label the gateway recognises: exact names (always their own label
    value: there are only so many) and globs (which any made-up name can match, so what they
    match shares a cap of its own). Compared in lower case; a model without its provider
    prefix, as the window table matches it."""

    exact: frozenset[str]
    globs: re.Pattern[str] | None = None
    model: bool = False

    @classmethod
    def of(cls, names: Iterable[str], model: bool = False) -> Names:
        exact, globs = set[str](), list[str]()
        for name in names:
            name = name.lower()
            if any(c in name for c in "*?["):
                if name[0] not in "*?[":  # ``*`` (allow everything) recognises nothing
                    globs.append(fnmatch.translate(name))
                stem = name.rstrip("*-")
                if name.endswith("*") and not any(c in stem for c in "*?["):
                    exact.add(stem)  # ``gpt-4o*`` names gpt-4o itself
            else:
                exact.add(name)
        pattern = re.compile("|".join(globs)) if globs else None
        return cls(frozenset(exact | {"unknown"}), pattern, model)

    def recognise(self, value: str) -> int:
        name = value.lower()
        if self.model:
            name = name.rsplit("/", 1)[-1]
        if name in self.exact:
            return NAMED
        if self.globs is not None and self.globs.match(name):
            return MATCHED
        return UNKNOWN


NO_NAMES = Names.of(())
AGENT_NAMES = frozenset(agent for _, agent in AGENTS)
"""The agents the gateway recognises by their User-Agent (``identity.AGENTS``)."""


def policy_names(file: PolicyFile) -> tuple[list[str], list[str], list[str]]:
    """The models, agents and teams a policy file names (globs included)."""
    models = [*file.prices, *file.windows]
    models += [*file.defaults.limits.models.allow, *file.defaults.limits.models.deny]
    agents: list[str] = []
    teams = [info.team for info in file.keys.values() if info.team]
    for rule in file.rules:
        match = rule.match
        models += [match.model] if match.model else []
        agents += [match.agent] if match.agent else []
        teams += [match.team] if match.team else []
        allowed = (rule.limits or {}).get("models")
        if isinstance(allowed, dict):
            for key in ("allow", "deny"):
                listed = allowed.get(key)
                if isinstance(listed, list):
                    models += [m for m in listed if isinstance(m, str)]
    return models, agents, teams


class LabelCap:
    """One open-valued label: each value capped in length; recognised values (``Names``)
    always kept by name, those a glob matches up to ``limit`` of them, and the first ``limit``
    others; later ones are ``other``. A caller may say a value is not ``proven`` (a model the
    provider refused, which is how made-up names end): it is then ``other`` unless already
    kept, and takes no place in the cap."""

    def __init__(
        self,
        name: str,
        limit: int,
        overflow: Counter,
        names: Callable[[], Names] | None = None,
    ) -> None:
        self.name, self.limit, self.seen = name, limit, set[str]()
        self.names = names or (lambda: NO_NAMES)
        self._kept = [0, 0]
        """Values kept, by recognition (unknown, matched): each kind has its own cap."""
        self._overflow, self._labels = overflow, (name,)
        overflow.touch(self._labels)

    def __call__(self, value: str | None, proven: bool = True) -> str:
        value = value or "unknown"
        if len(value) > LIMIT:
            value = cap(value)
        if value in self.seen:
            return value
        kind = self.names().recognise(value)
        if kind == NAMED:
            self.seen.add(value)
            return value
        if proven and self._kept[kind] < self.limit:
            self._kept[kind] += 1
            self.seen.add(value)
            return value
        self._overflow.inc(self._labels)
        return OTHER
