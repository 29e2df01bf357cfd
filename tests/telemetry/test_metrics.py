"""``GET /metrics`` after real traffic through the gateway: the families the dashboards read."""

from __future__ import annotations

from types import SimpleNamespace

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.fake_provider import CONFIG, ToolCallSpec
from gateway.policy.compiled import CompiledPolicy
from gateway.policy.model import PolicyFile
from gateway.telemetry.metrics import Metrics
from tests.conftest import ANTHROPIC_MODEL
from tests.harness import Gateway, MakeGateway, session_headers
from tests.policy.apis import AgentLoop, call

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(gw: Gateway, accept: str | None = None) -> tuple[str, str]:
    headers = {"Accept": accept} if accept else {}
    async with aiohttp.ClientSession() as http, http.get(gw.url("/metrics"), headers=headers) as r:
        assert r.status == 200
        return r.headers["Content-Type"], await r.text()


async def samples(gw: Gateway) -> Samples:
    _, text = await scrape(gw)
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in found.items() if n == name and wanted <= ls)


async def test_traffic_is_counted_by_route_source_and_tokens(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(None)
    for api in ("chat", "responses", "messages"):
        assert (await call(gw, api, session_headers(f"m-{api}"))).ok
    async with gw.anthropic.messages.stream(
        model=ANTHROPIC_MODEL,
        max_tokens=32,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers=session_headers("m-stream"),
    ) as stream:
        await stream.get_final_message()

    found = await samples(gw)
    requests = "gateway_requests_total"
    assert value(found, requests, route="openai.chat", status_class="2xx", source="upstream") == 1
    assert value(found, requests, route="anthropic.messages", agent="anthropic-python") == 2
    record = await gw.record("m-chat")
    assert value(found, "gateway_tokens_total", type="input", model="gpt-4o") == (
        record.tokens.input_tokens + (await gw.record("m-responses")).tokens.input_tokens
    )
    usage = "gen_ai_client_token_usage_count"
    assert value(found, usage, gen_ai_token_type="output", gen_ai_provider_name="anthropic") == 2
    assert value(found, "gen_ai_client_operation_duration_seconds_count") == 4
    ttfc = "gen_ai_client_operation_time_to_first_chunk_seconds_count"
    assert value(found, ttfc, gen_ai_provider_name="anthropic") == 1  # the streamed one
    assert value(found, "gateway_overhead_seconds_count") == 4
    assert value(found, "gateway_overhead_seconds_bucket", route="openai.chat", le="0.01") >= 0
    assert value(found, "gateway_session_turn_count") == 4
    assert value(found, "gateway_sessions_started_total") == 4
    assert value(found, "gateway_active_sessions") == 4
    assert value(found, "gateway_policy_decisions_total", decision="allowed") == 4
    assert value(found, "gateway_in_flight_requests") == 0
    assert value(found, "gateway_policy_reloads_total", outcome="ok") == 1
    assert value(found, "gateway_policy_info") == 1
    assert value(found, "gateway_build_info") == 1


async def test_no_session_id_or_key_is_ever_a_label(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(None)
    assert (await call(gw, "chat", session_headers("secret-session-4711"))).ok
    _, text = await scrape(gw)
    assert "secret-session-4711" not in text
    assert "sk-test" not in text and "sk-ant" not in text


async def test_rejections_and_loops_are_counted_by_limit_rule_and_detector(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(
        "version: 1\n"
        "defaults: {loops: {identical_tool_calls: 3}}\n"
        "rules: [{name: tiny, match: {model: 'gpt-4o-mini'}, limits: {max_turns: 1}}]\n"
    )
    headers = session_headers("limited")
    assert (await call(gw, "chat", headers, model="gpt-4o-mini")).ok
    assert not (await call(gw, "chat", headers, model="gpt-4o-mini")).ok
    gw.fake.app[CONFIG].tool_loop = ToolCallSpec("read_file", {"path": "notes.txt"})
    loop = AgentLoop(gw, "chat", session_headers("looping"), "Read the file.")
    await loop.until_refused(turns=6)

    found = await samples(gw)
    rejections = "gateway_rejections_total"
    assert value(found, rejections, limit="max_turns", rule="tiny") == 1
    assert value(found, rejections, limit="loop_identical_tool_calls") == 1
    assert value(found, "gateway_requests_total", source="policy", status_class="4xx") == 2
    detections = "gateway_loop_detections_total"
    assert value(found, detections, agent="openai-python", detector="identical_tool_calls") == 1
    # Bounded label sets start at 0, so increase() sees the first loop.
    assert ("gateway_loop_detections_total", frozenset(
        {("agent", "other"), ("detector", "repeated_requests")}
    )) in found  # fmt: skip


async def test_compactions_and_tokens_saved(make_gateway: MakeGateway) -> None:
    from tests.compaction.test_sessions import POLICY, WINDOW, run_session

    gw = await make_gateway(POLICY.format(window=WINDOW, strategies="summarize"))
    await run_session(gw, "chat", "compacted", 18)
    record = await gw.record("compacted")

    found = await samples(gw)
    compactions = "gateway_compactions_total"
    assert value(found, compactions, strategy="summarize", outcome="applied") == 1
    assert value(found, compactions, strategy="summarize", outcome="reused") == (
        record.compacted_calls - 1
    )
    saved = value(found, "gateway_compaction_tokens_saved_total", strategy="summarize")
    assert saved == record.tokens_saved
    assert value(found, "gateway_context_fill_ratio_count", provider="openai") == 18
    # The duration is observed once for each series the counter counts: the counts match.
    duration = "gateway_compaction_duration_seconds"
    for outcome in ("applied", "reused"):
        labels = {"strategy": "summarize", "outcome": outcome}
        assert value(found, duration + "_count", **labels) == value(found, compactions, **labels)
    assert value(found, duration + "_sum", strategy="summarize", outcome="applied") > 0
    assert value(found, duration + "_count") == value(found, compactions)


async def test_the_process_cpu_and_memory_are_exported(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(None)
    found = await samples(gw)  # read from /proc on a thread: blockbuster watches the loop
    assert value(found, "process_resident_memory_bytes") > 0
    assert value(found, "process_virtual_memory_bytes") > 0
    assert value(found, "process_cpu_seconds_total") > 0
    assert 0 < value(found, "process_open_fds") <= value(found, "process_max_fds")
    assert value(found, "process_start_time_seconds") > 1_700_000_000
    _, text = await scrape(gw, "application/openmetrics-text; version=1.0.0")
    assert "\nprocess_cpu_seconds_total " in text


async def test_without_proc_the_process_families_are_left_out(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    import prometheus_client.process_collector

    class NoProc(prometheus_client.process_collector.ProcessCollector):
        def __init__(self, registry: None) -> None:
            super().__init__(proc="/nonexistent", registry=registry)

    monkeypatch.setattr("gateway.telemetry.collectors.ProcessCollector", NoProc)
    gw = await make_gateway(None)
    found = await samples(gw)
    assert not [name for name, _ in found if name.startswith("process_")]
    assert value(found, "gateway_build_info") == 1


async def test_open_valued_labels_fold_into_other_past_their_cap() -> None:
    metrics = Metrics(max_label_values=2)
    assert [metrics.model(m) for m in ("a", "b", "c", "a", "d")] == [
        "a",
        "b",
        "other",
        "a",
        "other",
    ]
    assert metrics.model(None) == "unknown"  # the gateway's own word: never folded
    overflow = metrics.registry.get_sample_value("gateway_label_overflow_total", {"label": "model"})
    assert overflow == 2


async def test_openmetrics_when_asked_for(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(None)
    content_type, text = await scrape(gw, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")


async def test_store_errors_are_counted() -> None:
    from types import SimpleNamespace

    metrics = Metrics()
    store = SimpleNamespace(errors={"load": 1, "write": 0})
    metrics.watch_store(store)
    store.errors["write"] += 2
    value = metrics.registry.get_sample_value
    assert value("gateway_store_errors_total", {"operation": "load"}) == 1
    assert value("gateway_store_errors_total", {"operation": "write"}) == 2


async def test_an_unreachable_upstream_is_retried_and_counted(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        None, upstreams=dict(openai="http://127.0.0.1:9/v1", anthropic="http://127.0.0.1:9")
    )
    assert (await call(gw, "chat", session_headers("down"))).status == 502
    found = await samples(gw)
    assert value(found, "gateway_upstream_retries_total", provider="openai") == 2
    assert (
        value(found, "gateway_upstream_errors_total", provider="openai", reason="unreachable") == 1
    )
    assert value(found, "gateway_requests_total", source="gateway", status_class="5xx") == 1


async def test_budgets_are_exported_with_their_window(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        "version: 1\n"
        "team_header: X-Gateway-Team\n"
        "prices: {'gpt-4o*': {input: 2.5, output: 10.0}}\n"
        "defaults:\n"
        "  budgets: [{per: team, window: day, max_tokens: 1000000}, "
        "{per: team, window: month, max_cost: 50}]\n",
        trusted_proxies=["127.0.0.1/32"],
    )
    headers = session_headers("budgeted", **{"X-Gateway-Team": "platform"})
    assert (await call(gw, "chat", headers)).ok
    record = await gw.record("budgeted")

    found = await samples(gw)
    day = {"scope": "team", "owner": "platform", "window": "day"}
    assert value(found, "gateway_budget_limit_tokens", **day) == 1_000_000
    assert value(found, "gateway_budget_spent_tokens", **day) == record.tokens.total_tokens
    assert value(found, "gateway_budget_window_seconds", **day) == 86400
    assert value(found, "gateway_budget_window_end_timestamp_seconds", **day) % 86400 == 0
    month = {"scope": "team", "owner": "platform", "window": "month"}
    assert value(found, "gateway_budget_limit_cost", **month) == 50
    assert 0 < value(found, "gateway_budget_spent_cost", **month) == record.cost
    assert value(found, "gateway_budget_window_seconds", **month) in {
        d * 86400 for d in (28, 29, 30, 31)
    }


async def test_a_huge_model_name_adds_a_bounded_amount_to_metrics(
    make_gateway: MakeGateway,
) -> None:
    """One 200 KB model name once grew /metrics by 17 MB (it is in many series)."""
    gw = await make_gateway(None)
    assert (await call(gw, "chat", session_headers("before"))).ok
    _, before = await scrape(gw)
    huge = "gpt-" + "x" * 200_000
    for api in ("chat", "responses", "messages"):
        await call(gw, api, session_headers(f"huge-{api}"), model=huge)
    _, after = await scrape(gw)
    assert len(after) - len(before) < 60_000
    assert "x" * 200 not in after
    assert ("gpt-" + "x" * 123 + "\u2026") in after  # capped with the marker


async def test_made_up_agents_do_not_push_out_a_known_agent(make_gateway: MakeGateway) -> None:
    """Fifty made-up agent names fill the cap; a later real Claude Code call keeps its name."""
    gw = await make_gateway(None)
    for n in range(60):
        headers = session_headers(f"made-up-{n}", **{"X-Gateway-Agent": f"bot-{n}"})
        assert (await call(gw, "chat", headers)).ok
    claude = session_headers("claude", **{"User-Agent": "claude-cli/2.1.80 (external, cli)"})
    assert (await call(gw, "messages", claude)).ok
    found = await samples(gw)
    assert value(found, "gateway_requests_total", agent="claude-code") == 1
    assert value(found, "gateway_requests_total", agent="other") == 10
    assert value(found, "gateway_label_overflow_total", label="agent") > 0


def test_made_up_models_do_not_push_out_known_models() -> None:
    """Models the window table or the policy names keep their own label value however many
    made-up names came first; names a table glob matches have a cap of their own, and a model
    the provider refused takes no place at all."""
    text = "version: 1\nprices: {house-model-1: {input: 1, output: 2}}\n"
    policy = CompiledPolicy.build(PolicyFile.model_validate(yaml.safe_load(text)), "v1", "p")
    metrics = Metrics(max_label_values=3)
    metrics.watch_policy(SimpleNamespace(current=policy, reloads=1, failures=0))  # type: ignore[arg-type]
    refused = [metrics.model(f"junk-{n}", proven=False) for n in range(10)]
    assert set(refused) == {"other"}
    assert [metrics.model(f"junk-{n}") for n in range(4)] == ["junk-0", "junk-1", "junk-2", "other"]
    globbed = [metrics.model(f"claude-made-up-{n}") for n in range(4)]
    assert globbed == ["claude-made-up-0", "claude-made-up-1", "claude-made-up-2", "other"]
    for known in ("gpt-4", "gpt-4o", "house-model-1", "openai/gpt-5", "GPT-4.1"):
        assert metrics.model(known) == known
        assert metrics.model(known, proven=False) == known
    assert metrics.model("claude-sonnet-4-6") == "other"  # a glob's share is spent
