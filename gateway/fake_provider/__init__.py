"""A fake LLM provider speaking OpenAI Chat Completions, OpenAI Responses and Anthropic Messages.

Shipped for trying the gateway offline (``gateway fake-provider --port N``) and used as the
upstream in tests and benchmarks. See ``app.py`` for the request path and ``scenario.py`` for the
``x-fake-scenario`` header.
"""

from .app import CONFIG, RECEIVED, ReceivedRequest, create_app, serve
from .config import FakeProviderConfig, ToolCallSpec

__all__ = [
    "CONFIG",
    "RECEIVED",
    "FakeProviderConfig",
    "ReceivedRequest",
    "ToolCallSpec",
    "create_app",
    "serve",
]
