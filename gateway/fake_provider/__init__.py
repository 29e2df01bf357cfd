"""A fake LLM provider speaking OpenAI Chat Completions, OpenAI Responses and Anthropic Messages.

Shipped for trying the gateway offline (``gateway fake-provider --port N``) and used as the
upstream in tests and benchmarks. See ``app.py`` for the request path, ``scenario.py`` for the
``x-fake-scenario`` header (one request's behaviour) and ``faults.py`` for the fault rules in
``app[FAULTS]`` (every request's, for a while: outages, resets, hangs).
"""

from .app import CONFIG, RECEIVED, ReceivedRequest, create_app, serve
from .config import FakeProviderConfig, ToolCallSpec
from .faults import FAULTS, Fault, Faults

__all__ = [
    "CONFIG",
    "FAULTS",
    "RECEIVED",
    "FakeProviderConfig",
    "Fault",
    "Faults",
    "ReceivedRequest",
    "ToolCallSpec",
    "create_app",
    "serve",
]
