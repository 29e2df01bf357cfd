"""Provider dialects and the route table: which path speaks which API.

A new provider API is one module implementing ``Dialect`` and one line here.
"""

from __future__ import annotations

from gateway.dialects.anthropic_messages import AnthropicMessages
from gateway.dialects.base import (
    Dialect,
    ErrorKind,
    ProviderError,
    RequestFacts,
    ResponseFacts,
    StreamObserver,
    Usage,
    prompt_parts,
)
from gateway.dialects.openai_chat import OpenAIChat
from gateway.dialects.openai_responses import OpenAIResponses

OPENAI_CHAT = OpenAIChat()
OPENAI_RESPONSES = OpenAIResponses()
ANTHROPIC_MESSAGES = AnthropicMessages()

# LLM calls, by the path the client uses (always below /v1, as the SDKs send it).
ROUTES: dict[str, Dialect] = {
    "/v1/chat/completions": OPENAI_CHAT,
    "/v1/responses": OPENAI_RESPONSES,
    "/v1/messages": ANTHROPIC_MESSAGES,
}

__all__ = [
    "ANTHROPIC_MESSAGES",
    "OPENAI_CHAT",
    "OPENAI_RESPONSES",
    "ROUTES",
    "AnthropicMessages",
    "Dialect",
    "ErrorKind",
    "OpenAIChat",
    "OpenAIResponses",
    "ProviderError",
    "RequestFacts",
    "ResponseFacts",
    "StreamObserver",
    "Usage",
    "prompt_parts",
]
