"""OpenTelemetry traces of calls through the gateway, read back from an in-memory exporter.

The official SDKs call the gateway, which calls the fake provider; each test's gateway has its
own TracerProvider (nothing global), so spans never leak between tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.appkeys import TRACING
from gateway.compaction.transcript import INSTRUCTIONS
from gateway.fake_provider import CONFIG, RECEIVED
from gateway.fake_provider.config import DEFAULT_REPLY
from gateway.telemetry import content, otel_env
from tests.compaction.test_sessions import POLICY as COMPACTION_POLICY
from tests.compaction.test_sessions import WINDOW, file_contents
from tests.conftest import ANTHROPIC_MODEL
from tests.harness import ANTHROPIC_KEY, OPENAI_KEY, Gateway, MakeGateway, session_headers
from tests.policy.apis import APIS, AgentLoop, Api, call

PROMPT = "Tell me about the violet heron of Quillmarsh."
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


async def traced(
    make_gateway: MakeGateway, provider: TracerProvider, policy: str | None = None
) -> Gateway:
    return await make_gateway(policy, tracer_provider=provider)


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is kind]


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def one_call(spans: tuple[ReadableSpan, ...]) -> tuple[ReadableSpan, ReadableSpan]:
    """The SERVER span and its one CLIENT span, checked to form one tree."""
    (server,) = by_kind(spans, SpanKind.SERVER)
    (client,) = by_kind(spans, SpanKind.CLIENT)
    assert client.parent is not None and server.context is not None
    assert client.parent.span_id == server.context.span_id
    assert client.context is not None and client.context.trace_id == server.context.trace_id
    return server, client


def everything(spans: tuple[ReadableSpan, ...]) -> str:
    """Every name, attribute and event of every span, as one string to search."""
    parts: list[str] = []
    for span in spans:
        parts.append(span.name)
        parts += [f"{k}={v}" for k, v in attrs(span).items()]
        for event in span.events:
            parts.append(event.name)
            parts += [f"{k}={v}" for k, v in (event.attributes or {}).items()]
    return "\n".join(parts)


async def sdk_call(gw: Gateway, api: Api, stream: bool, headers: dict[str, str]) -> dict[str, Any]:
    """One call with sampling settings; returns what the SDK saw (id, model, usage)."""
    sampling: dict[str, Any] = {"temperature": 0.5, "top_p": 0.9, "extra_headers": headers}
    if api == "chat":
        chat = {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 64,
            **sampling,
        }
        if stream:
            chunks = await gw.openai.chat.completions.create(
                **chat, stream=True, stream_options={"include_usage": True}
            )
            seen = [c async for c in chunks]
            usage = next(c.usage for c in seen if c.usage is not None)
            return {
                "id": seen[0].id,
                "input": usage.prompt_tokens,
                "output": usage.completion_tokens,
            }
        completion = await gw.openai.chat.completions.create(**chat)
        assert completion.usage is not None
        return {
            "id": completion.id,
            "input": completion.usage.prompt_tokens,
            "output": completion.usage.completion_tokens,
        }
    if api == "responses":
        call = {"model": "gpt-4o", "input": PROMPT, "max_output_tokens": 64, **sampling}
        if stream:
            async with gw.openai.responses.stream(**call) as events:
                response = await events.get_final_response()
        else:
            response = await gw.openai.responses.create(**call)
        assert response.usage is not None
        return {
            "id": response.id,
            "input": response.usage.input_tokens,
            "output": response.usage.output_tokens,
        }
    arguments: dict[str, Any] = {
        "model": ANTHROPIC_MODEL,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": PROMPT}],
        "stop_sequences": ["END"],
        # Sampling settings this SDK no longer names, as older clients still send them.
        "extra_body": {"temperature": 0.5, "top_k": 5},
        "extra_headers": headers,
    }
    if stream:
        async with gw.anthropic.messages.stream(**arguments) as events:
            message = await events.get_final_message()
    else:
        message = await gw.anthropic.messages.create(**arguments)
    usage = message.usage
    return {
        "id": message.id,
        "input": usage.input_tokens
        + (usage.cache_read_input_tokens or 0)
        + (usage.cache_creation_input_tokens or 0),
        "output": usage.output_tokens,
    }


ROUTES = {
    "chat": "/v1/chat/completions",
    "responses": "/v1/responses",
    "messages": "/v1/messages",
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", APIS)
async def test_a_call_is_a_server_span_with_one_genai_client_span(
    make_gateway: MakeGateway,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    api: Api,
    stream: bool,
) -> None:
    gw = await traced(make_gateway, provider)
    seen = await sdk_call(gw, api, stream, session_headers(f"trace-{api}"))
    server, client = one_call(exporter.get_finished_spans())
    model = ANTHROPIC_MODEL if api == "messages" else "gpt-4o"

    assert server.name == f"POST {ROUTES[api]}"
    s = attrs(server)
    assert s["http.request.method"] == "POST" and s["http.route"] == ROUTES[api]
    assert s["http.response.status_code"] == 200 and s["gateway.outcome"] == "ok"
    assert s["gen_ai.conversation.id"] == f"trace-{api}"
    assert s["gateway.turn"] == 1
    assert server.status.status_code is StatusCode.UNSET
    (decision,) = [e for e in server.events if e.name == "gateway.policy.decision"]
    assert decision.attributes is not None and decision.attributes["gateway.policy.rules"]

    assert client.name == f"chat {model}"
    c = attrs(client)
    assert c["gen_ai.operation.name"] == "chat"
    assert c["gen_ai.provider.name"] == ("anthropic" if api == "messages" else "openai")
    assert c["gen_ai.request.model"] == model
    assert c["gen_ai.response.model"] == model
    assert c["gen_ai.response.id"] == seen["id"]
    assert c["gen_ai.response.finish_reasons"]
    assert c["gen_ai.usage.input_tokens"] == seen["input"]
    assert c["gen_ai.usage.output_tokens"] == seen["output"]
    assert c["gen_ai.usage.cache_read.input_tokens"] >= 0
    assert c["gen_ai.usage.cache_creation.input_tokens"] >= 0
    assert c["gen_ai.request.stream"] is stream
    assert c["gen_ai.request.max_tokens"] == 64
    assert c["gen_ai.request.temperature"] == 0.5
    assert c["gen_ai.conversation.id"] == f"trace-{api}"
    agent = "anthropic-python" if api == "messages" else "openai-python"
    assert c["gen_ai.agent.name"] == agent
    assert c["server.address"] == "127.0.0.1" and c["server.port"] == gw.fake.port
    assert c["http.response.status_code"] == 200
    if api == "messages":
        assert c["gen_ai.request.top_k"] == 5
        assert c["gen_ai.request.stop_sequences"] == ("END",)
    else:
        assert c["gen_ai.request.top_p"] == 0.9
        assert c["openai.api.type"] == ("chat_completions" if api == "chat" else "responses")
    if stream:
        assert 0 < c["gen_ai.response.time_to_first_chunk"] < client_seconds(client)
    else:
        assert "gen_ai.response.time_to_first_chunk" not in c
    assert "error.type" not in c and client.status.status_code is StatusCode.UNSET
    # The client span lies inside the server span.
    assert server.start_time is not None and client.start_time is not None
    assert server.end_time is not None and client.end_time is not None
    assert server.start_time <= client.start_time <= client.end_time <= server.end_time


def client_seconds(span: ReadableSpan) -> float:
    assert span.start_time is not None and span.end_time is not None
    return (span.end_time - span.start_time) / 1e9


@pytest.mark.parametrize("api", APIS)
async def test_the_callers_traceparent_is_continued_and_passed_upstream(
    make_gateway: MakeGateway, provider: TracerProvider, exporter: InMemorySpanExporter, api: Api
) -> None:
    gw = await traced(make_gateway, provider)
    headers = session_headers("tp", traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01")
    assert (await call(gw, api, headers)).ok
    server, client = one_call(exporter.get_finished_spans())

    assert server.context is not None and client.context is not None
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert server.parent is not None and format(server.parent.span_id, "016x") == PARENT_ID
    assert server.parent.is_remote
    # The upstream sees the gateway's CLIENT span as its parent, in the caller's trace.
    (sent,) = gw.fake.app[RECEIVED]
    received = {k.lower(): v for k, v in sent.headers.items()}
    span_id = format(client.context.span_id, "016x")
    assert received["traceparent"] == f"00-{TRACE_ID}-{span_id}-01"


async def test_without_a_traceparent_the_server_span_is_a_root(
    make_gateway: MakeGateway, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    gw = await traced(make_gateway, provider)
    assert (await call(gw, "chat", session_headers("root"))).ok
    server, client = one_call(exporter.get_finished_spans())
    assert server.parent is None
    (sent,) = gw.fake.app[RECEIVED]
    assert client.context is not None
    trace_id = format(client.context.trace_id, "032x")
    assert sent.headers["traceparent"].startswith(f"00-{trace_id}-")


async def test_a_rejection_is_an_event_and_no_upstream_call(
    make_gateway: MakeGateway, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    policy = """
    version: 1
    defaults:
      limits: {max_turns: 1}
    """
    gw = await traced(make_gateway, provider, policy)
    assert (await call(gw, "messages", session_headers("once"))).ok
    exporter.clear()
    refused = await call(gw, "messages", session_headers("once"))
    assert not refused.ok

    spans = exporter.get_finished_spans()
    assert by_kind(spans, SpanKind.CLIENT) == []
    (server,) = by_kind(spans, SpanKind.SERVER)
    (auth,) = by_kind(spans, SpanKind.INTERNAL)  # the gateway.auth span, the server's child
    assert auth.name == "gateway.auth" and auth.parent is not None
    assert server.context is not None and auth.parent.span_id == server.context.span_id
    a = attrs(auth)
    assert a["gateway.auth.method"] == "passthrough" and a["gateway.auth.outcome"] == "ok"
    assert a["gateway.principal.id"].startswith("passthrough:")
    assert "sk-" not in str(a)  # the principal's public id, never the key
    s = attrs(server)
    assert s["gateway.outcome"] == "rejected" and s["error.type"] == "rejected"
    assert s["http.response.status_code"] == refused.status == 400
    assert server.status.status_code is StatusCode.UNSET  # the caller's error, not the gateway's
    (rejection,) = [e for e in server.events if e.name == "gateway.policy.rejection"]
    assert rejection.attributes is not None
    assert rejection.attributes["gateway.policy.limit"] == "max_turns"
    assert rejection.attributes["gateway.policy.rule"] == refused.headers["x-gateway-policy-rule"]


async def test_an_upstream_error_is_recorded_on_the_client_span(
    make_gateway: MakeGateway, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    gw = await traced(make_gateway, provider)
    outcome = await call(gw, "chat", session_headers("err", **{"x-fake-scenario": "error:503"}))
    assert outcome.status == 503
    server, client = one_call(exporter.get_finished_spans())
    assert attrs(client)["error.type"] == "503"
    assert client.status.status_code is StatusCode.ERROR
    assert attrs(server)["http.response.status_code"] == 503


async def test_a_cut_stream_is_an_error_on_the_client_span(
    make_gateway: MakeGateway, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    gw = await traced(make_gateway, provider)
    headers = session_headers("cut", **{"x-fake-scenario": "cut_stream:2"})
    with pytest.raises(Exception):  # noqa: B017 - whichever error the SDK makes of a cut stream
        chunks = await gw.openai.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": PROMPT}],
            stream=True,
            extra_headers=headers,
        )
        async for _ in chunks:
            pass
    server, client = one_call(exporter.get_finished_spans())
    c = attrs(client)
    assert c["error.type"] == "upstream_cut" and c["gen_ai.response.finish_reasons"] == ("error",)
    assert client.status.status_code is StatusCode.ERROR
    assert attrs(server)["gateway.outcome"] == "upstream_cut"


async def test_an_unreachable_upstream_is_an_error_type(
    make_gateway: MakeGateway, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:

    # Port 9 on loopback (discard): nothing listens, the connection is refused at once.
    dead = dict(openai="http://127.0.0.1:9/v1", anthropic="http://127.0.0.1:9")
    gw = await make_gateway(None, tracer_provider=provider, upstreams=dead, upstream_retries=0)
    outcome = await call(gw, "chat", session_headers("dead"))
    assert outcome.status == 502
    server, client = one_call(exporter.get_finished_spans())
    assert attrs(client)["error.type"] == "ClientConnectorError"
    assert client.status.status_code is StatusCode.ERROR
    assert attrs(server)["error.type"] == "upstream_unavailable"
    assert server.status.status_code is StatusCode.ERROR


async def test_count_tokens_is_traced_too(
    make_gateway: MakeGateway, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    gw = await traced(make_gateway, provider)
    counted = await gw.anthropic.messages.count_tokens(
        model=ANTHROPIC_MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        extra_headers=session_headers("count"),
    )
    assert counted.input_tokens > 0
    server, client = one_call(exporter.get_finished_spans())
    assert server.name == "POST /v1/messages/count_tokens"
    assert client.name == f"count_tokens {ANTHROPIC_MODEL}"
    assert attrs(client)["gen_ai.provider.name"] == "anthropic"


async def test_passthrough_calls_make_no_spans(
    make_gateway: MakeGateway, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    gw = await traced(make_gateway, provider)
    page = await gw.openai.models.list()
    assert page.data
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize("api", APIS)
async def test_compaction_is_an_event_and_the_summary_call_a_client_span(
    make_gateway: MakeGateway, provider: TracerProvider, exporter: InMemorySpanExporter, api: Api
) -> None:
    gw = await traced(
        make_gateway, provider, COMPACTION_POLICY.format(window=WINDOW, strategies="summarize")
    )
    gw.fake.app[CONFIG].context_window = WINDOW
    loop = AgentLoop(gw, api, session_headers("long"), "Refactor the parser module.")
    loop.tool_output = file_contents
    for turn in range(30):
        args = json.dumps({"path": f"src/file{turn}.py"})
        outcome = await loop.turn({"x-fake-scenario": f"tool:read_file:{args}"})
        assert outcome.ok
        if outcome.headers.get("x-gateway-compacted", "").startswith("summarize;"):
            break
    else:
        raise AssertionError("no compaction in 30 turns")

    spans = exporter.get_finished_spans()
    server = by_kind(spans, SpanKind.SERVER)[-1]
    assert server.context is not None
    children = [
        s for s in spans
        if s.parent and s.parent.span_id == server.context.span_id and s.name != "gateway.auth"
    ]  # fmt: skip
    summary = [s for s in children if attrs(s).get("gateway.compaction.summary")]
    call_spans = [s for s in children if not attrs(s).get("gateway.compaction.summary")]
    assert len(summary) == 1 and len(call_spans) == 1
    (summary_span,) = summary
    s = attrs(summary_span)
    assert summary_span.kind is SpanKind.CLIENT
    assert s["gen_ai.operation.name"] == "chat" and s["gen_ai.conversation.id"] == "long"
    assert summary_span.name == f"chat {s['gen_ai.request.model']}"
    assert s["gen_ai.usage.input_tokens"] > 0 and s["gen_ai.usage.output_tokens"] > 0
    assert attrs(call_spans[0])["gen_ai.conversation.compacted"] is True

    (event,) = [e for e in server.events if e.name == "gateway.compaction"]
    assert event.attributes is not None
    assert event.attributes["gateway.compaction.strategies"] == ("summarize",)
    before = event.attributes["gateway.compaction.tokens_before"]
    after = event.attributes["gateway.compaction.tokens_after"]
    assert isinstance(before, int) and isinstance(after, int) and after < before
    assert event.attributes["gateway.compaction.reused"] is False
    # The summary call carried its own span's traceparent upstream.
    (summary_request,) = [r for r in gw.fake.app[RECEIVED] if INSTRUCTIONS.encode() in r.body]
    assert summary_span.context is not None
    span_id = format(summary_span.context.span_id, "016x")
    assert summary_request.headers["traceparent"].split("-")[2] == span_id


async def test_loop_detections_are_events(
    make_gateway: MakeGateway, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    policy = """
    version: 1
    defaults:
      loops: {identical_tool_calls: 3, action: flag}
    """
    gw = await traced(make_gateway, provider, policy)
    loop = AgentLoop(gw, "chat", session_headers("loopy"), "Read the file.")
    for _ in range(4):
        outcome = await loop.turn({"x-fake-scenario": 'tool:read_file:{"path": "a.py"}'})
        assert outcome.ok
    events = [
        e
        for s in exporter.get_finished_spans()
        for e in s.events
        if e.name == "gateway.loop.detection"
    ]
    assert events
    assert events[-1].attributes is not None
    assert events[-1].attributes["gateway.loop.detector"] == "identical_tool_calls"
    assert events[-1].attributes["gateway.loop.tool"] == "read_file"


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", APIS)
async def test_no_key_and_no_content_by_default(
    make_gateway: MakeGateway,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    api: Api,
    stream: bool,
) -> None:
    gw = await traced(make_gateway, provider)
    await sdk_call(gw, api, stream, session_headers("private"))
    text = everything(exporter.get_finished_spans())
    assert "gen_ai.request.model" in text
    for secret in (OPENAI_KEY, ANTHROPIC_KEY, PROMPT, "violet heron", DEFAULT_REPLY[:20]):
        assert secret not in text
    assert "gen_ai.input.messages" not in text and "gen_ai.output.messages" not in text


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("api", APIS)
async def test_content_is_recorded_when_opted_in(
    make_gateway: MakeGateway,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    api: Api,
    stream: bool,
) -> None:
    monkeypatch.setenv(otel_env.CAPTURE_ENV, "true")
    gw = await traced(make_gateway, provider)
    assert gw.server.app[TRACING].capture_content
    await sdk_call(gw, api, stream, session_headers("open"))
    _, client = one_call(exporter.get_finished_spans())
    c = attrs(client)
    sent = json.loads(c["gen_ai.input.messages"])
    assert sent[-1]["role"] == "user"
    assert sent[-1]["parts"] == [{"type": "text", "content": PROMPT}]
    answer = json.loads(c["gen_ai.output.messages"])
    assert answer[0]["role"] == "assistant" and answer[0]["finish_reason"]
    assert DEFAULT_REPLY in "".join(p.get("content", "") for p in answer[0]["parts"])
    assert OPENAI_KEY not in everything(exporter.get_finished_spans())
    assert ANTHROPIC_KEY not in everything(exporter.get_finished_spans())


def test_input_messages_keep_the_newest_within_the_limit() -> None:
    history = [{"role": "user", "content": f"message {i} " + "x" * 100} for i in range(100)]
    history.append({"role": "assistant", "content": "y" * 5000})
    recorded = content.input_messages(history, 1000)
    messages = json.loads(recorded)
    assert len(messages) == 1  # the newest alone, clipped
    assert len(messages[0]["parts"][0]["content"]) == 1000
    recorded = content.input_messages(history[:-1], 1000)
    assert len(recorded) <= 1000
    messages = json.loads(recorded)
    assert messages[-1]["parts"][0]["content"].startswith("message 99 ")
    assert 1 < len(messages) < 100


def test_tool_calls_and_results_take_the_conventions_shapes() -> None:
    chat = [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    responses = [
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "42"},
    ]
    messages = [
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "c1", "name": "f", "input": {}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "42"}],
        },
    ]
    for history in (chat, responses, messages):
        call_message, result_message = json.loads(content.input_messages(history, 10_000))
        (call_part,) = [p for p in call_message["parts"] if p["type"] == "tool_call"]
        assert call_part["id"] == "c1" and call_part["name"] == "f"
        (result,) = result_message["parts"]
        assert result == {"type": "tool_call_response", "id": "c1", "response": "42"}


# -- configuration from the environment (the variables themselves: test_otel_env.py) ------
async def test_the_environment_configures_an_apps_tracing(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    gw = await make_gateway(None)
    assert gw.server.app[TRACING].enabled


async def test_tracing_is_off_without_a_provider_or_environment(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(None)
    assert not gw.server.app[TRACING].enabled
    assert (
        await call(gw, "chat", session_headers("dark", traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01"))
    ).ok
    # Off, the caller's own traceparent goes upstream as it came.
    (sent,) = gw.fake.app[RECEIVED]
    assert sent.headers["traceparent"] == f"00-{TRACE_ID}-{PARENT_ID}-01"
