"""The policy file: schema (``model``), loading (``loader``), the compiled form the hot path
reads (``compiled``), the decision on values (``decide``), the pipeline's policy step
(``step``) and the live, reloading holder (``live``).
"""

from __future__ import annotations

from gateway.policy.compiled import Caller, CompiledPolicy, Effective
from gateway.policy.live import LivePolicy
from gateway.policy.loader import PolicyError, packaged_default, parse_policy
from gateway.policy.model import PolicyFile, PolicySettings

__all__ = [
    "Caller",
    "CompiledPolicy",
    "Effective",
    "LivePolicy",
    "PolicyError",
    "PolicyFile",
    "PolicySettings",
    "packaged_default",
    "parse_policy",
]
