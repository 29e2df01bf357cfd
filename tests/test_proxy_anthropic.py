"""Anthropic Messages through the gateway, with the official SDK."""

from __future__ import annotations

from typing import Any

import aiohttp
import anthropic
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.appkeys import STORE
from tests.conftest import ANTHROPIC_MODEL, received
from tests.test_failures import gateway_over

HELLO = [{"role": "user", "content": "Say hello."}]


async def test_messages_non_streaming_matches_direct(
    gateway: TestServer, fake_provider: TestServer, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    headers = {"X-Gateway-Session": "msg-1", "X-Gateway-Session-Name": "release-hardening"}
    message = await anthropic_client.messages.create(
        model=ANTHROPIC_MODEL,
        max_tokens=64,
        messages=HELLO,
        system="Be terse.",
        extra_headers=headers,
    )
    direct = anthropic.AsyncAnthropic(
        base_url=str(fake_provider.make_url("")).rstrip("/"), api_key="k"
    )
    plain = await direct.messages.create(
        model=ANTHROPIC_MODEL, max_tokens=64, messages=HELLO, system="Be terse."
    )
    await direct.close()
    assert message.content == plain.content
    assert message.usage == plain.usage

    via_gateway, direct_call = received(fake_provider)
    assert via_gateway.headers["anthropic-version"] == direct_call.headers["anthropic-version"]
    assert via_gateway.body == direct_call.body
    record = await gateway.app[STORE].get("msg-1")
    assert record is not None
    assert record.name == "release-hardening"
    assert record.agent == "anthropic-python"
    assert record.turns == 1
    assert record.tokens.input_tokens == message.usage.input_tokens
    assert record.tokens.output_tokens == message.usage.output_tokens


async def test_messages_streaming(
    gateway: TestServer, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    async with anthropic_client.messages.stream(
        model=ANTHROPIC_MODEL,
        max_tokens=64,
        messages=HELLO,
        extra_headers={"X-Gateway-Session": "msg-stream"},
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text
    record = await gateway.app[STORE].get("msg-stream")
    assert record is not None
    assert record.tokens.input_tokens == final.usage.input_tokens
    assert record.tokens.output_tokens == final.usage.output_tokens
    assert record.estimated_turns == 0


async def test_tool_use_round_trip_keeps_pairs_valid(
    gateway: TestServer, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    headers = {"X-Gateway-Session": "msg-tools", "x-fake-scenario": 'tool:Read:{"file":"a"}'}
    first = await anthropic_client.messages.create(
        model=ANTHROPIC_MODEL,
        max_tokens=64,
        messages=HELLO,
        extra_headers=headers,
    )
    tool_use = next(block for block in first.content if block.type == "tool_use")
    history = [
        *HELLO,
        {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "x"}],
        },
    ]
    second = await anthropic_client.messages.create(
        model=ANTHROPIC_MODEL,
        max_tokens=64,
        messages=history,
        extra_headers={"X-Gateway-Session": "msg-tools"},
    )
    assert second.stop_reason == "end_turn"
    record = await gateway.app[STORE].get("msg-tools")
    assert record is not None and record.turns == 2 and record.user_turns == 1


async def test_count_tokens_is_attributed_but_not_a_turn(
    gateway: TestServer, fake_provider: TestServer, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    headers = {"X-Claude-Code-Session-Id": "cc-count"}
    counted = await anthropic_client.messages.count_tokens(
        model=ANTHROPIC_MODEL,
        messages=HELLO,
        extra_headers=headers,
    )
    assert counted.input_tokens > 0
    assert received(fake_provider)[0].path == "/v1/messages/count_tokens"
    record = await gateway.app[STORE].get("cc-count")
    assert record is not None
    assert record.turns == 0 and record.aux_requests == 1


async def test_upstream_errors_pass_through_with_status_and_body(
    gateway: TestServer, fake_provider: TestServer, anthropic_client: anthropic.AsyncAnthropic
) -> None:
    headers = {"X-Gateway-Session": "msg-err", "x-fake-scenario": "error:529"}
    try:
        await anthropic_client.messages.create(
            model=ANTHROPIC_MODEL,
            max_tokens=64,
            messages=HELLO,
            extra_headers=headers,
        )
    except anthropic.APIStatusError as exc:
        assert exc.status_code == 529
        assert orjson.loads(exc.response.content)["error"]["type"] == "overloaded_error"
    else:
        raise AssertionError("expected the upstream's 529")
    record = await gateway.app[STORE].get("msg-err")
    assert record is not None
    assert record.turns == 1 and record.upstream_errors == 1
    assert record.tokens.total_tokens == 0


async def test_an_upstream_cookie_reaches_its_client_and_no_other(aiohttp_server: Any) -> None:
    """The gateway's one upstream session keeps no cookies: what an upstream sets for one
    client (a load balancer's cookie) goes back to that client, and never rides along on
    another client's calls."""
    seen: list[str | None] = []

    async def upstream(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        body = {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "m",
            "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 3, "output_tokens": 1},
        }
        response = web.json_response(body)
        response.set_cookie("__lb", "client-a", path="/")
        return response

    # By a name: aiohttp's cookie jar would drop a cookie from a bare IP address anyway.
    gateway = await gateway_over(aiohttp_server, upstream, host="localhost")
    call = orjson.dumps({"model": "m", "max_tokens": 5, "messages": []})
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        async with http.post(gateway.make_url("/v1/messages"), data=call) as first:
            assert first.status == 200
            assert "__lb=client-a" in first.headers.get("Set-Cookie", "")
        async with http.post(gateway.make_url("/v1/messages"), data=call) as other:
            assert other.status == 200
        headers = {"Cookie": "mine=1"}
        async with http.post(gateway.make_url("/v1/messages"), data=call, headers=headers) as own:
            assert own.status == 200
    assert seen == [None, None, "mine=1"]
