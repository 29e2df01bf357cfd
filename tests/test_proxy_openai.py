"""OpenAI Chat Completions and Responses through the gateway, with the official SDK."""

from __future__ import annotations

import json

import openai
import orjson
from aiohttp.test_utils import TestServer

from gateway.appkeys import STORE
from tests.conftest import received

MESSAGES: list[dict[str, str]] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello."},
]


async def session(gateway: TestServer, session_id: str):  # type: ignore[no-untyped-def]
    record = await gateway.app[STORE].get(session_id)
    assert record is not None, f"no session {session_id}"
    return record


async def test_chat_non_streaming_matches_direct(
    gateway: TestServer, fake_provider: TestServer, openai_client: openai.AsyncOpenAI
) -> None:
    headers = {"X-Gateway-Session": "chat-1"}
    via = await openai_client.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=MESSAGES,
        extra_headers=headers,
    )
    direct = openai.AsyncOpenAI(base_url=str(fake_provider.make_url("/v1")), api_key="k")
    plain = await direct.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    await direct.close()

    completion = via.parse()
    assert completion.choices[0].message.content == plain.choices[0].message.content
    assert completion.usage is not None and plain.usage is not None
    assert completion.usage.model_dump() == plain.usage.model_dump()
    assert via.headers["X-Gateway-Session-Id"] == "chat-1"
    assert via.headers["X-Gateway-Turn"] == "1"

    # The body reached the upstream byte for byte, the gateway's own headers did not.
    sent = received(fake_provider)[0]
    assert orjson.loads(sent.body) == {"model": "gpt-4o", "messages": MESSAGES}
    assert "x-gateway-session" not in {k.lower() for k in sent.headers}
    assert sent.headers["Authorization"] == "Bearer sk-test-openai"

    record = await session(gateway, "chat-1")
    assert record.turns == 1 and record.user_turns == 1
    assert record.tokens.input_tokens == plain.usage.prompt_tokens
    assert record.tokens.output_tokens == plain.usage.completion_tokens
    assert record.models["gpt-4o"].turns == 1
    assert record.estimated_turns == 0
    assert record.agent == "openai-python"


async def test_chat_stream_without_usage_is_counted_exactly_and_hidden(
    gateway: TestServer, fake_provider: TestServer, openai_client: openai.AsyncOpenAI
) -> None:
    stream = await openai_client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        extra_headers={"X-Gateway-Session": "chat-stream"},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    # The client did not ask for usage: it sees no usage chunk and no usage field.
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert all("usage" not in c.model_dump(exclude_unset=True) for c in chunks)

    # The gateway asked upstream for it, splicing one field into otherwise unchanged bytes.
    sent = received(fake_provider)[0]
    assert sent.body.startswith(b'{"stream_options":{"include_usage":true},')
    assert orjson.loads(sent.body)["messages"] == MESSAGES

    record = await session(gateway, "chat-stream")
    assert record.turns == 1 and record.estimated_turns == 0
    assert record.tokens.input_tokens > 0 and record.tokens.output_tokens > 0


async def test_chat_stream_with_usage_requested_is_untouched(
    gateway: TestServer, fake_provider: TestServer, openai_client: openai.AsyncOpenAI
) -> None:
    stream = await openai_client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Gateway-Session": "chat-usage"},
    )
    chunks = [chunk async for chunk in stream]
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    sent = received(fake_provider)[0]
    assert json.loads(sent.body)["stream_options"] == {"include_usage": True}
    record = await session(gateway, "chat-usage")
    assert record.tokens.input_tokens == usage.prompt_tokens
    assert record.tokens.output_tokens == usage.completion_tokens


async def test_responses_non_streaming_and_streaming(
    gateway: TestServer, fake_provider: TestServer, openai_client: openai.AsyncOpenAI
) -> None:
    headers = {"X-Gateway-Session": "resp-1"}
    response = await openai_client.responses.create(
        model="gpt-5", input="Say hello.", instructions="Be terse.", extra_headers=headers
    )
    assert response.output_text
    assert response.usage is not None

    events = []
    stream = await openai_client.responses.create(
        model="gpt-5", input="Say hello again.", stream=True, extra_headers=headers
    )
    async for event in stream:
        events.append(event)
    completed = [e for e in events if e.type == "response.completed"]
    assert len(completed) == 1
    final_usage = completed[0].response.usage
    assert final_usage is not None

    record = await session(gateway, "resp-1")
    assert record.turns == 2 and record.user_turns == 2
    assert record.tokens.input_tokens == response.usage.input_tokens + final_usage.input_tokens
    assert record.tokens.output_tokens == response.usage.output_tokens + final_usage.output_tokens
    # Responses bodies go upstream untouched.
    assert [orjson.loads(r.body)["input"] for r in received(fake_provider)] == [
        "Say hello.",
        "Say hello again.",
    ]


async def test_tool_call_turns_are_not_user_turns(
    gateway: TestServer, openai_client: openai.AsyncOpenAI
) -> None:
    headers = {"X-Gateway-Session": "tools", "x-fake-scenario": 'tool:read_file:{"path":"a"}'}
    first = await openai_client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        extra_headers=headers,
    )
    call = first.choices[0].message.tool_calls
    assert call is not None
    history = [
        *MESSAGES,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call[0].id, "content": "file contents"},
    ]
    await openai_client.chat.completions.create(
        model="gpt-4o",
        messages=history,
        extra_headers={"X-Gateway-Session": "tools"},
    )
    record = await session(gateway, "tools")
    assert record.turns == 2
    assert record.user_turns == 1


async def test_other_paths_pass_through(
    gateway: TestServer, fake_provider: TestServer, openai_client: openai.AsyncOpenAI
) -> None:
    models = await openai_client.models.list()
    assert [m.id async for m in models]
    embedding = await openai_client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert embedding.data[0].embedding
    paths = [r.path for r in received(fake_provider)]
    assert paths == ["/v1/models", "/v1/embeddings"]
