"""Context window enforcement: each API's real overflow error, counted like the usage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import openai
import pytest

from gateway.fake_provider import CONFIG
from gateway.fake_provider.chat import prompt_parts as chat_parts
from gateway.fake_provider.messages import prompt_parts as messages_parts
from gateway.fake_provider.responses import prompt_parts as responses_parts
from gateway.fake_provider.usage import input_tokens

from .conftest import ANTHROPIC_HEADERS, AUTH, CLAUDE_MODEL

CHAT_BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "word " * 200}]}
RESPONSES_BODY = {"model": "gpt-5", "input": "word " * 200}
MESSAGES_BODY = {
    "model": CLAUDE_MODEL,
    "max_tokens": 10,
    "system": "be brief",
    "messages": [{"role": "user", "content": "word " * 200}],
}
PromptParts = Callable[[dict[str, Any]], list[object]]
ROUTES = [
    ("/v1/chat/completions", CHAT_BODY, AUTH, chat_parts),
    ("/v1/responses", RESPONSES_BODY, AUTH, responses_parts),
    ("/v1/messages", MESSAGES_BODY, ANTHROPIC_HEADERS, messages_parts),
]


def _tokens(body: dict[str, Any], parts: PromptParts, factor: float = 1.0) -> int:
    """The count the fake checks the window with (bytes mode, the default)."""
    return input_tokens(parts(body), "bytes", factor)


def _reported(answer: dict[str, Any]) -> int:
    usage = answer["usage"]
    tokens: int = usage["prompt_tokens"] if "prompt_tokens" in usage else usage["input_tokens"]
    return tokens


def _expected_error(path: str, tokens: int, window: int) -> dict[str, Any]:
    if path == "/v1/chat/completions":
        return {
            "message": f"This model's maximum context length is {window} tokens. However, your "
            f"messages resulted in {tokens} tokens. Please reduce the length of the messages.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    if path == "/v1/responses":
        return {
            "message": "Your input exceeds the context window of this model. Please adjust your "
            "input and try again.",
            "type": "invalid_request_error",
            "param": "input",
            "code": "context_length_exceeded",
        }
    return {
        "type": "invalid_request_error",
        "message": f"prompt is too long: {tokens} tokens > {window} maximum",
    }


async def _assert_overflow(response: Any, path: str, tokens: int, window: int) -> None:
    assert response.status == 400
    assert response.content_type == "application/json"
    answer = await response.json()
    if path == "/v1/messages":
        request_id = response.headers["request-id"]
        assert request_id.startswith("req_011C")
        assert answer == {
            "type": "error",
            "error": _expected_error(path, tokens, window),
            "request_id": request_id,
        }
    else:
        assert response.headers["x-request-id"].startswith("req_")
        assert answer == {"error": _expected_error(path, tokens, window)}


@pytest.mark.parametrize(("path", "body", "headers", "parts"), ROUTES)
@pytest.mark.parametrize("stream", [False, True])
async def test_over_the_window_is_refused(fake, path, body, headers, parts, stream) -> None:
    tokens = _tokens(body, parts)
    fake.app[CONFIG].context_window = tokens - 1
    response = await fake.post(path, json={**body, "stream": stream}, headers=headers)
    await _assert_overflow(response, path, tokens, tokens - 1)


@pytest.mark.parametrize(("path", "body", "headers", "parts"), ROUTES)
async def test_at_the_window_is_answered_with_the_same_count(
    fake, path, body, headers, parts
) -> None:
    tokens = _tokens(body, parts)
    fake.app[CONFIG].context_window = tokens
    response = await fake.post(path, json=body, headers=headers)
    assert response.status == 200
    assert _reported(await response.json()) == tokens


@pytest.mark.parametrize(("path", "body", "headers", "parts"), ROUTES)
async def test_scenario_overrides_the_configured_window(fake, path, body, headers, parts) -> None:
    tokens = _tokens(body, parts)
    fake.app[CONFIG].context_window = tokens - 1
    wide = {**headers, "x-fake-scenario": f"context_window:{tokens}"}
    assert (await fake.post(path, json=body, headers=wide)).status == 200
    fake.app[CONFIG].context_window = None
    narrow = {**headers, "x-fake-scenario": "context_window:100"}
    await _assert_overflow(await fake.post(path, json=body, headers=narrow), path, tokens, 100)


@pytest.mark.parametrize(("path", "body", "headers", "parts"), ROUTES)
async def test_token_factor_counts_against_the_window(fake, path, body, headers, parts) -> None:
    tokens = _tokens(body, parts)
    scaled = _tokens(body, parts, 2.5)
    assert scaled > tokens
    fake.app[CONFIG].context_window = tokens
    doubled = {**headers, "x-fake-scenario": "token_factor:2.5"}
    await _assert_overflow(await fake.post(path, json=body, headers=doubled), path, scaled, tokens)
    fake.app[CONFIG].token_factor = 2.5
    fake.app[CONFIG].context_window = scaled
    response = await fake.post(path, json=body, headers=headers)
    assert response.status == 200
    assert _reported(await response.json()) == scaled


async def test_window_is_checked_without_usage_and_in_tiktoken_mode(fake) -> None:
    fake.app[CONFIG].usage_mode = "tiktoken"
    answer = await (await fake.post("/v1/chat/completions", json=CHAT_BODY, headers=AUTH)).json()
    tokens = _reported(answer)
    assert tokens == input_tokens(chat_parts(CHAT_BODY), "tiktoken", 1.0)
    headers = {**AUTH, "x-fake-scenario": f"no_usage;context_window:{tokens - 1}"}
    response = await fake.post("/v1/chat/completions", json=CHAT_BODY, headers=headers)
    await _assert_overflow(response, "/v1/chat/completions", tokens, tokens - 1)


async def test_no_window_by_default(fake) -> None:
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "word " * 100_000}]}
    assert (await fake.post("/v1/chat/completions", json=big, headers=AUTH)).status == 200


async def test_sdks_see_the_overflow(
    fake_app, oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic
) -> None:
    fake_app[CONFIG].context_window = 10
    text = "word " * 200
    with pytest.raises(openai.BadRequestError) as chat_error:
        await oai.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": text}]
        )
    assert chat_error.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as responses_error:
        await oai.responses.create(model="gpt-5", input=text)
    assert responses_error.value.code == "context_length_exceeded"
    assert responses_error.value.param == "input"
    with pytest.raises(anthropic.BadRequestError) as messages_error:
        await claude.messages.create(
            model=CLAUDE_MODEL, max_tokens=10, messages=[{"role": "user", "content": text}]
        )
    assert "prompt is too long" in messages_error.value.message
