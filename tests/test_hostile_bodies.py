"""Bodies a broken or hostile client sends: a 400 in the provider's shape, never a 5xx; the
provider never receives a call that skipped the policy; unusual valid bodies pass unchanged."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.fake_provider import RECEIVED, FakeProviderConfig
from gateway.fake_provider import create_app as create_fake_app
from gateway.settings import Settings
from tests.conftest import received

ROUTES = ("/v1/chat/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens")
HEADERS = {
    "Content-Type": "application/json",
    "Authorization": "Bearer sk-test-openai",
    "anthropic-version": "2023-06-01",
}
GATEWAY_FAILED = "The gateway failed"


def deep(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def bodies_of(route: str) -> dict[str, bytes]:
    """Bodies the gateway itself must refuse, for one route."""
    start = b'{"model":"gpt-4o","max_tokens":5,'
    field = b'"input":' if route == "/v1/responses" else b'"messages":'
    message = b'[{"role":"user","content":"caf\xe9 \xff"}]'
    return {
        "nested array in the history": start + field + deep(1000) + b"}",
        "nested object in metadata": start + b'"metadata":' + b'{"a":' * 1000 + b"1" + b"}" * 1001,
        "nested everywhere": deep(100_000),
        "invalid UTF-8 in the history": start + field + message + b"}",
        "invalid UTF-8 in the model": b'{"model":"gpt-\xff","messages":[]}',
        "a lone surrogate": start + field + b'[{"role":"user","content":"\\ud800"}]}',
        "not JSON": b'{"model": "gpt-4o",',
    }


def is_provider_400(route: str, status: int, body: Any) -> bool:
    if status != 400 or not isinstance(body, dict):
        return False
    error = body.get("error")
    if not isinstance(error, dict) or error.get("type") != "invalid_request_error":
        return False
    return body.get("type") == "error" if route.startswith("/v1/messages") else True


async def post(gateway: TestServer, route: str, body: bytes) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.post(gateway.make_url(route), data=body, headers=HEADERS) as resp,
    ):
        raw = await resp.read()
        try:
            return resp.status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return resp.status, raw


@pytest.mark.parametrize("route", ROUTES)
async def test_unreadable_bodies_are_a_provider_shaped_400(
    route: str, gateway: TestServer, fake_provider: TestServer
) -> None:
    for name, body in bodies_of(route).items():
        status, answer = await post(gateway, route, body)
        if route.endswith("count_tokens"):
            # Not a turn: what the gateway cannot read goes to the provider to judge.
            assert status < 500 and GATEWAY_FAILED not in str(answer), name
            continue
        assert is_provider_400(route, status, answer), (name, status, answer)
        assert GATEWAY_FAILED not in str(answer), name
    if not route.endswith("count_tokens"):
        assert received(fake_provider) == []


ODD_TYPES: dict[str, list[Any]] = {
    "/v1/responses": [
        {"model": "gpt-5", "input": [{"role": "user", "content": "hi"}, {"type": {"a": 1}}]},
        {"model": "gpt-5", "input": [{"role": "user", "content": "hi"}, {"type": [1]}]},
        {
            "model": "gpt-5",
            "input": [
                {"role": "user", "content": "hi"},
                {"type": "function_call", "call_id": [1], "name": {"x": 1}, "arguments": 5},
                {"type": "function_call_output", "call_id": {"y": 2}, "output": 1e300},
            ],
        },
        {"model": "gpt-5", "input": [1, "x", None, [], True]},
        {"model": {"a": 1}, "input": "hi", "metadata": "x", "instructions": 5},
        {"model": "gpt-5", "input": 12, "stream": "yes"},
    ],
    "/v1/chat/completions": [
        {"model": "gpt-4o", "messages": ["x", 1, None, []]},
        {"model": "gpt-4o", "messages": [{"role": {"a": 1}, "content": 5}]},
        {
            "model": "gpt-4o",
            "messages": [{"role": "assistant", "tool_calls": [1, {"function": 2}]}],
        },
        {"model": "gpt-4o", "messages": [{"role": "assistant", "tool_calls": "x"}]},
        {"model": 5, "messages": 5, "stream": True, "stream_options": "x", "max_tokens": "x"},
        {"model": "gpt-4o", "messages": {"role": "user"}, "user": ["x"], "metadata": [1]},
    ],
    "/v1/messages": [
        {"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": ["x", 1, None]},
        {
            "model": "claude-sonnet-4-6",
            "max_tokens": 5,
            "messages": [
                {"role": "user", "content": [1, "x", {"type": {"t": 1}}]},
                {"role": "assistant", "content": [{"type": "tool_use", "name": [1], "input": 1}]},
                {"role": "user", "content": [{"type": "tool_result", "content": {"a": 1}}]},
            ],
        },
        {
            "model": "claude-sonnet-4-6",
            "max_tokens": "x",
            "messages": [{"role": "user", "content": "x"}],
            "system": [1, {"x": 2}],
            "metadata": {"user_id": 5, "session_id": ["x"]},
        },
        {"model": ["x"], "messages": "x", "system": 5, "metadata": "x"},
    ],
}
TOOLS = {
    "/v1/responses": [{"type": "function", "name": "f", "parameters": {}}, 1, "x"],
    "/v1/chat/completions": [{"type": "function", "function": {"name": "f"}}, 1, "x"],
    "/v1/messages": [{"name": "f", "input_schema": {}}, 1, "x"],
}


@pytest.mark.parametrize("route", list(ODD_TYPES))
async def test_unexpected_types_are_answered_not_failed(
    route: str, gateway: TestServer, fake_provider: TestServer
) -> None:
    """A body of the wrong shape is the provider's to refuse: forwarded as sent, never a 5xx
    (a Responses item whose ``type`` is an object was a 500: ``TypeError: unhashable``). With
    tools, loop detection reads the history too."""
    for body in ODD_TYPES[route]:
        for tools in (None, TOOLS[route]):
            sent = orjson.dumps(body if tools is None else {**body, "tools": tools})
            before = len(received(fake_provider))
            status, answer = await post(gateway, route, sent)
            assert status < 500 and GATEWAY_FAILED not in str(answer), (sent, status, answer)
            forwarded = [r.body for r in received(fake_provider)[before:]]
            if forwarded:  # as sent (stream_options aside, which the gateway adds to a stream)
                assert forwarded == [sent] or b"stream_options" in forwarded[0]
            else:  # a field of a type the gateway cannot even hold: its own 400
                assert is_provider_400(route, status, answer), (sent, status, answer)


async def test_unusual_valid_bodies_go_upstream_byte_for_byte(
    gateway: TestServer, fake_provider: TestServer
) -> None:
    """What the APIs accept (escapes, surrogate pairs, big and huge numbers, odd spacing,
    repeated keys) is read, and forwarded exactly as sent."""
    chat = (
        b' {\n "model" : "gpt-4o", "model": "gpt-4o",\t"messages":[ {"role":"user",'
        b'"content":"\\u00e9\\ud83d\\ude00 \xe2\x9c\x93 \\"q\\" \\/"} ,'
        b'{"role":"user","content":"n","x_big":123456789012345678901234567890,"x_huge":1e400}],'
        b'"max_tokens":5 } '
    )
    status, answer = await post(gateway, "/v1/chat/completions", chat)
    assert GATEWAY_FAILED not in str(answer) and status < 500
    assert [r.body for r in received(fake_provider)] == [chat]


# -- fuzz: the three dialects' bodies through a running gateway -------------------------------
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
ROLES = st.sampled_from(["user", "assistant", "system", "developer", "tool", "model"]) | JSON
KINDS = st.sampled_from(
    ["message", "function_call", "function_call_output", "reasoning", "tool_use", "tool_result"]
)
BLOCK = st.fixed_dictionaries(
    {"type": KINDS | JSON},
    optional={
        "text": st.text(max_size=30) | JSON,
        "name": st.text(max_size=10) | JSON,
        "input": JSON,
        "content": st.text(max_size=30) | JSON,
        "call_id": st.sampled_from(["c1", "c2"]) | JSON,
        "arguments": st.sampled_from(['{"a": 1}', "{}"]) | JSON,
        "output": st.text(max_size=30) | JSON,
    },
)
MESSAGE = st.fixed_dictionaries(
    {"role": ROLES},
    optional={
        "content": st.text(max_size=40) | st.lists(BLOCK, max_size=3) | JSON,
        "tool_calls": st.lists(
            st.fixed_dictionaries(
                {"id": st.just("c1") | JSON, "type": st.just("function") | JSON},
                optional={"function": st.fixed_dictionaries({"name": JSON, "arguments": JSON})},
            ),
            max_size=2,
        )
        | JSON,
        "type": KINDS | JSON,
        "call_id": st.sampled_from(["c1", "c2"]) | JSON,
    },
)
HISTORY = st.lists(MESSAGE | BLOCK | JSON, max_size=6) | JSON
FIELDS = {
    "model": st.sampled_from(["gpt-4o", "gpt-5", "claude-sonnet-4-6"]) | JSON,
    "stream": st.booleans() | JSON,
    "tools": st.lists(
        st.fixed_dictionaries({"type": st.just("function") | JSON, "name": JSON}) | JSON,
        max_size=2,
    )
    | JSON,
    "metadata": st.fixed_dictionaries(
        {}, optional={"user_id": st.text(max_size=30) | JSON, "session_id": JSON}
    )
    | JSON,
    "max_tokens": st.integers(-5, 100) | JSON,
    "max_output_tokens": st.integers(-5, 100) | JSON,
    "stream_options": JSON,
    "system": st.text(max_size=20) | st.lists(BLOCK, max_size=2) | JSON,
    "instructions": st.text(max_size=20) | JSON,
    "user": JSON,
    "prompt_cache_key": JSON,
    "previous_response_id": JSON,
    "temperature": JSON,
    "stop": JSON,
}


@st.composite
def raw_bodies(draw: st.DrawFn, route: str) -> bytes:
    history = "input" if route == "/v1/responses" else "messages"
    keys = draw(st.lists(st.sampled_from(sorted(FIELDS)), unique=True, max_size=6))
    body = {key: draw(FIELDS[key]) for key in keys}
    body[history] = draw(HISTORY)
    raw = orjson.dumps(body)
    damage = draw(st.sampled_from(["none", "none", "utf8", "truncate", "nest", "number"]))
    if damage == "utf8":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + raw[at:]
    elif damage == "truncate":
        raw = raw[: draw(st.integers(0, len(raw)))]
    elif damage == "nest":
        depth = draw(st.integers(200, 1500))
        raw = raw[:-1] + b',"x_nested":' + deep(depth) + b"}"
    elif damage == "number":
        raw = raw[:-1] + b',"x_number":[1e400,-1e999,' + b"9" * 400 + b"]}"
    return raw


class Running:
    """A gateway and the fake provider on an event loop of their own (hypothesis drives
    examples from a plain function), with a small turn limit per session."""

    def __init__(self, tmp: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        policy = tmp / "policy.yaml"
        policy.write_text("version: 1\ndefaults: {limits: {max_turns: 1}}\n")
        self.fake, self.gateway, self.http = self.run(self._start(policy, tmp / "state"))
        self.sessions = 0

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=60)

    async def _start(
        self, policy: Any, state: Any
    ) -> tuple[TestServer, TestServer, aiohttp.ClientSession]:
        fake = TestServer(create_fake_app(FakeProviderConfig()))
        await fake.start_server()
        configured = Settings(
            store="memory://",
            policy=policy,
            state_dir=state,  # the generated admin token goes there, not to the working directory
            upstreams=dict(
                openai=str(fake.make_url("/v1")),
                anthropic=str(fake.make_url("")).rstrip("/"),
            ),
        )
        gateway = TestServer(create_app(configured))
        await gateway.start_server()
        return fake, gateway, aiohttp.ClientSession()

    async def _send(self, route: str, body: bytes, session: str) -> tuple[int, bytes]:
        headers = {**HEADERS, "X-Gateway-Session": session}
        if route.startswith("/v1/messages"):
            del headers["Authorization"]
            headers["x-api-key"] = "sk-ant-test"
        async with self.http.post(self.gateway.make_url(route), data=body, headers=headers) as r:
            return r.status, await r.read()

    def send(self, route: str, body: bytes) -> tuple[int, bytes, int]:
        """Sends ``body`` twice in a session of its own (``max_turns: 1``): the first status
        and answer, and how many LLM calls the provider received."""
        self.sessions += 1
        session = f"fuzz-{self.sessions}"
        before = len(self.fake.app[RECEIVED])
        status, answer = self.run(asyncio.wait_for(self._send(route, body, session), 20))
        again, answer_again = self.run(asyncio.wait_for(self._send(route, body, session), 20))
        assert again < 500 and GATEWAY_FAILED.encode() not in answer_again, answer_again
        calls = [r for r in list(self.fake.app[RECEIVED])[before:] if r.path == route]
        return status, answer, len(calls)

    def close(self) -> None:
        async def stop() -> None:
            await self.http.close()
            await self.gateway.close()
            await self.fake.close()

        self.run(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = Running(tmp_path_factory.mktemp("fuzz"))
    yield running
    running.close()


@pytest.mark.parametrize("route", ROUTES[:3])
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzzed_bodies_never_fail_and_never_skip_the_policy(
    running: Running, route: str, data: st.DataObject
) -> None:
    body = data.draw(raw_bodies(route))
    status, answer, calls = running.send(route, body)
    assert status < 500 and GATEWAY_FAILED.encode() not in answer, (status, answer[:300])
    # Sent twice in a session allowed one turn: the provider saw at most one of them (a call
    # that skipped the policy would be a second).
    assert calls <= 1, (calls, body[:300])


# -- what the tests above do not try: bombs and literals in every field, any JSON at all -------
DIALECT_ROUTES = ROUTES[:3]
HISTORY_FIELD = {
    "/v1/chat/completions": "messages",
    "/v1/responses": "input",
    "/v1/messages": "messages",
}
BOMB_DEPTH = 10_000


def bombs(route: str) -> dict[str, bytes]:
    """Bodies built to hurt a parser, each aimed at one field the gateway reads or skips."""
    history = HISTORY_FIELD[route].encode()
    start = b'{"model":"gpt-4o","max_tokens":5,"' + history + b'":[{"role":"user","content":"hi"}]'
    nested_objects = b'{"a":' * BOMB_DEPTH + b"1" + b"}" * BOMB_DEPTH
    mixed = b'[{"a":' * (BOMB_DEPTH // 2) + b"1" + b"}]" * (BOMB_DEPTH // 2)
    bodies: dict[str, bytes] = {}
    for name in (history.decode(), "metadata", "tools", "system", "x_unknown"):
        bodies[f"{name}: arrays {BOMB_DEPTH} deep"] = (
            start + b',"' + name.encode() + b'":' + deep(BOMB_DEPTH) + b"}"
        )
        bodies[f"{name}: objects {BOMB_DEPTH} deep"] = (
            start + b',"' + name.encode() + b'":' + nested_objects + b"}"
        )
        bodies[f"{name}: arrays and objects {BOMB_DEPTH} deep"] = (
            start + b',"' + name.encode() + b'":' + mixed + b"}"
        )
    bodies["a message's content, deep"] = (
        b'{"model":"gpt-4o","max_tokens":5,"' + history + b'":[{"role":"user","content":'
        + deep(BOMB_DEPTH) + b"}]}"
    )  # fmt: skip
    for literal in (b"NaN", b"Infinity", b"-Infinity", b"nan", b"inf", b"undefined"):
        for where in (b"temperature", b"max_tokens", b"x_unknown"):
            bodies[f"{literal.decode()} in {where.decode()}"] = (
                start + b',"' + where + b'":' + literal + b"}"
            )
        bodies[f"{literal.decode()} in the history"] = (
            b'{"model":"gpt-4o","' + history + b'":[{"role":"user","content":' + literal + b"}]}"
        )
    huge_int, huge_exp = b"9" * 100_000, b"1e999999999"
    for number in (huge_int, b"-" + huge_int, huge_exp, b"-" + huge_exp, b"0." + huge_int):
        for where in (b"max_tokens", b"temperature", b"x_unknown", b"model"):
            bodies[f"a {len(number)}-character number in {where.decode()}"] = (
                start + b',"' + where + b'":' + number + b"}"
            )
        bodies[f"a {len(number)}-character number in the history"] = (
            b'{"model":"gpt-4o","' + history + b'":[{"role":"user","content":"x","n":'
            + number + b"}]}"
        )  # fmt: skip
    for name, text in {
        "a lone high surrogate": b"\\ud800",
        "a lone low surrogate": b"\\udc00",
        "two high surrogates": b"\\ud800\\ud800",
        "a surrogate pair reversed": b"\\udc00\\ud800",
        "an escape cut short": b"\\ud8",
    }.items():
        bodies[f"{name} in the model"] = start + b',"model":"' + text + b'"}'
        bodies[f"{name} in a key"] = start + b',"' + text + b'":1}'
        bodies[f"{name} in the history"] = (
            b'{"model":"gpt-4o","' + history + b'":[{"role":"user","content":"' + text + b'"}]}'
        )
    for name, raw in {
        "an overlong slash": b"\xc0\xaf",
        "a five-byte sequence": b"\xf8\x88\x80\x80\x80",
        "an encoded surrogate": b"\xed\xa0\x80",
        "a code point past U+10FFFF": b"\xf4\x90\x80\x80",
        "a sequence cut short": b"\xe2\x82",
    }.items():
        bodies[f"{name} in a key"] = start + b',"k' + raw + b'":1}'
        bodies[f"{name} in an unknown field"] = start + b',"x_unknown":"' + raw + b'"}'
        bodies[f"{name} in the history"] = (
            b'{"model":"gpt-4o","' + history + b'":[{"role":"user","content":"' + raw + b'"}]}'
        )
    bodies["a body cut in the middle of a bomb"] = start + b',"metadata":' + b'{"a":' * 5000
    bodies["a BOM first"] = b"\xef\xbb\xbf" + start + b"}"
    bodies["a NUL in the body"] = start + b',"x_unknown":"\x00"}'
    bodies["two bodies"] = start + b"}" + start + b"}"
    return bodies


def is_provider_shaped(route: str, status: int, body: Any) -> bool:
    """An error in the route's provider shape (any status)."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return False
    if not isinstance(body["error"].get("message"), str):
        return False
    return body.get("type") == "error" if route.startswith("/v1/messages") else True


async def post_within(
    gateway: TestServer, route: str, body: bytes, seconds: float = 20
) -> tuple[int, dict[str, str], Any]:
    """One call that must be answered within ``seconds`` (a hang fails the test)."""
    async with (
        asyncio.timeout(seconds),
        aiohttp.ClientSession() as http,
        http.post(gateway.make_url(route), data=body, headers=HEADERS) as resp,
    ):
        raw = await resp.read()
        try:
            return resp.status, dict(resp.headers), orjson.loads(raw)
        except orjson.JSONDecodeError:
            return resp.status, dict(resp.headers), raw


@pytest.mark.parametrize("route", DIALECT_ROUTES)
async def test_bombs_and_odd_literals_are_answered_in_shape_never_failed(
    route: str, gateway: TestServer, fake_provider: TestServer
) -> None:
    """Depth bombs in every field (read or skipped), NaN and Infinity, numbers of 100k digits,
    lone surrogates, malformed UTF-8 in keys: never a 5xx or a hang; what the gateway refuses
    is a 400 in the provider's shape and never reaches the provider."""
    for name, body in bombs(route).items():
        before = len(received(fake_provider))
        status, headers, answer = await post_within(gateway, route, body)
        assert status < 500 and GATEWAY_FAILED not in str(answer), (name, status, answer)
        if "X-Gateway-Error" in headers:  # the gateway's own answer
            assert status == 400 and is_provider_shaped(route, status, answer), (name, answer)
            assert len(received(fake_provider)) == before, name
        else:  # the provider's to judge: forwarded byte for byte
            assert [r.body for r in received(fake_provider)[before:]] == [body], name


ANY_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["\ud800", "a\udc00b", "\udbff\udbff", "\x00", "\u2028", "\ufeff"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from([*sorted(FIELDS), "messages", "input"]) | st.text(max_size=8),
            children,
            max_size=5,
        )
    ),
    max_leaves=16,
)


def any_json(value: Any) -> bytes:
    """``value`` as JSON; NaN and infinities as their (invalid) JavaScript literals."""
    return json.dumps(value, allow_nan=True).encode()


@pytest.mark.parametrize("route", DIALECT_ROUTES)
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(value=ANY_JSON)
def test_any_json_at_all_is_answered_in_shape(running: Running, route: str, value: Any) -> None:
    """Any JSON value as the body (not only objects), its keys often the fields the gateway
    reads and its values anything: never a 5xx, and a refusal in the provider's shape."""
    status, answer, _calls = running.send(route, any_json(value))
    assert status < 500 and GATEWAY_FAILED.encode() not in answer, (status, answer[:300])
    if status >= 400:  # the gateway's refusal, or the provider's (the fake's, in its shape)
        assert is_provider_shaped(route, status, orjson.loads(answer)), answer[:300]
