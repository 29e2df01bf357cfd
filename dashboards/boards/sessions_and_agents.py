"""*Agent gateway / Sessions and agents*, for platform teams: ``sessions-and-agents.json``."""

from __future__ import annotations

from .panels import Board, heatmap, query_variable, stat, timeseries
from .queries import (
    CACHE_READ,
    INPUT,
    LE_50,
    LE_100,
    RATE,
    increase,
    quantile,
    rate,
    targets,
)


def sessions_and_agents() -> Board:
    b = Board(
        "agent-gateway-sessions",
        "Agent gateway / Sessions and agents",
        "What are the agents doing? Sessions, turns, tokens, context fill, policy decisions, "
        "loops and compaction, by agent. For platform teams.",
        ["agent-gateway", "llm", "agents"],
    )
    a = 'agent=~"$agent"'
    b.variables.append(
        query_variable(
            "agent",
            "Agent",
            "gateway_requests_total",
            "Agent names (from X-Gateway-Agent or the User-Agent), capped: rare ones are "
            "folded into 'other'.",
        )
    )
    turn = "gateway_session_turn"

    b.row("Now")
    b.add(
        stat(
            "Active sessions",
            "Sessions with an LLM call in the last five minutes (the most seen within the "
            "interval), summed over replicas.",
            "none",
            f"sum(max_over_time(gateway_active_sessions{{{a}}}[{RATE}]))",
        ),
        4,
        4,
    )
    b.add(
        stat(
            "Sessions started in range",
            "New sessions (a first turn) over the dashboard's time range.",
            "none",
            f"sum({increase('gateway_sessions_started_total', a)})",
            decimals=0,
        ),
        4,
        4,
    )
    b.add(
        stat(
            "Loop detections in range",
            "Runaway-loop detections over the range: identical tool calls, repeated requests "
            "or a sudden turn rate. Depending on the policy the call was refused, flagged or "
            "the session paused.",
            "none",
            f"sum({increase('gateway_loop_detections_total', a)})",
            thresholds=[(None, "green"), (1, "orange")],
            decimals=0,
        ),
        4,
        4,
    )
    b.add(
        stat(
            "Rejections in range",
            "Calls the policy refused over the range (turn and token limits, budgets, models, "
            "loops, context window, sessions paused or ended by an operator).",
            "none",
            f"sum({increase('gateway_rejections_total', a)})",
            decimals=0,
        ),
        4,
        4,
    )
    b.add(
        stat(
            "Calls past turn 100 in range",
            "Share of LLM calls over the range that were beyond the 100th turn of their "
            "session. Long sessions cost more per turn (the whole history is resent).",
            "percentunit",
            f"1 - sum({increase(turn + '_bucket', LE_100, a)})"
            f" / sum({increase(turn + '_count', a)})",
            thresholds=[(None, "green"), (0.1, "orange")],
            decimals=1,
        ),
        4,
        4,
    )
    b.add(
        stat(
            "Tokens saved by compaction in range",
            "Input tokens compaction took off the calls it sent upstream over the range: "
            "tokens not paid for, and calls that did not overflow the model's window.",
            "short",
            f"sum({increase('gateway_compaction_tokens_saved_total')})",
        ),
        4,
        4,
    )

    b.row("Sessions and turns")
    b.add(
        timeseries(
            "Active sessions by agent",
            "Sessions with a call in the last five minutes, by agent (most within each "
            "interval, summed over replicas).",
            "none",
            targets(
                (
                    f"sum by (agent) (max_over_time(gateway_active_sessions{{{a}}}[{RATE}]))",
                    "{{agent}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Sessions started by agent",
            "New sessions per minute, by agent: a session's first turn (its id comes from "
            "the agent's session header, or a fingerprint of its prompt when it sends none).",
            "opm",
            targets(
                (
                    f"sum by (agent) ({rate('gateway_sessions_started_total', a)}) * 60",
                    "{{agent}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        heatmap(
            "Turn number of calls",
            "Each LLM call counted in the bucket of its turn number within its session "
            "(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000). Weight moving up: sessions run longer.",
            "none",
            f"sum by (le) ({increase(turn + '_bucket', a, window=RATE)})",
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Share of calls past turn 50 and 100 by agent",
            "Of each agent's LLM calls, the share made beyond the 50th and the 100th turn of "
            "their session. Long sessions resend long histories: slower, dearer, nearer "
            "the window.",
            "percentunit",
            targets(
                (
                    f"1 - sum by (agent) ({rate(turn + '_bucket', LE_50, a)})"
                    f" / sum by (agent) ({rate(turn + '_count', a)})",
                    "{{agent}} > 50",
                ),
                (
                    f"1 - sum by (agent) ({rate(turn + '_bucket', LE_100, a)})"
                    f" / sum by (agent) ({rate(turn + '_count', a)})",
                    "{{agent}} > 100",
                ),
            ),
            maximum=1,
        ),
        12,
        8,
    )

    b.row("Tokens and context")
    tokens = "gateway_tokens_total"
    b.add(
        timeseries(
            "Tokens by agent and type",
            "Tokens per second as the providers reported them, by agent and type: input "
            "(includes the cache parts), output, cache_read, cache_creation, reasoning.",
            "suffix: tok/s",
            targets((f"sum by (agent, type) ({rate(tokens, a)})", "{{agent}} {{type}}")),
        ),
        12,
        8,
    )
    cache_read = f"sum by (agent) ({rate(tokens, CACHE_READ, a)})"
    inputs = f"sum by (agent) ({rate(tokens, INPUT, a)})"
    b.add(
        timeseries(
            "Prompt-cache read share by agent",
            "Share of each agent's input tokens read from the provider's prompt cache (they "
            "cost a tenth or less). A drop: something changed the start of the prompts "
            "(a rewritten history, a changed system prompt).",
            "percentunit",
            targets((f"({cache_read} or 0 * {inputs}) / {inputs}", "{{agent}}")),
            maximum=1,
        ),
        12,
        8,
    )
    fill = "gateway_context_fill_ratio"
    b.add(
        heatmap(
            "Context fill of calls",
            "Each call's input tokens over its model's context window, in tenths (all "
            "agents: the metric is by provider). Calls near 1.0 are about to overflow; "
            "compaction should keep them under its compact_at.",
            "percentunit",
            f"sum by (le) ({increase(fill + '_bucket', window=RATE)})",
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Context fill p50 / p95 by provider",
            "Median and 95th percentile of input tokens over the model's window, by "
            "provider (all agents).",
            "percentunit",
            targets(
                (quantile(0.5, fill, "provider"), "p50 {{provider}}"),
                (quantile(0.95, fill, "provider"), "p95 {{provider}}"),
            ),
            maximum=1,
        ),
        12,
        8,
    )
    usage = "gen_ai_client_token_usage"
    b.add(
        timeseries(
            "Tokens per call p50 / p95 by provider and type",
            "Size of single calls (OpenTelemetry GenAI metric gen_ai.client.token.usage): "
            "input and output tokens, median and 95th percentile (all agents).",
            "short",
            targets(
                (
                    quantile(0.5, usage, "gen_ai_provider_name, gen_ai_token_type"),
                    "p50 {{gen_ai_provider_name}} {{gen_ai_token_type}}",
                ),
                (
                    quantile(0.95, usage, "gen_ai_provider_name, gen_ai_token_type"),
                    "p95 {{gen_ai_provider_name}} {{gen_ai_token_type}}",
                ),
            ),
        ),
        24,
        8,
    )

    b.row("Policy and loops")
    b.add(
        timeseries(
            "Policy decisions by decision, limit and rule",
            "Policy decisions per second (all agents: the metric has no agent label): "
            "allowed, or rejected with the limit hit and the rule that set it.",
            "ops",
            targets(
                (
                    f"sum by (decision, limit, rule) ({rate('gateway_policy_decisions_total')})",
                    "{{decision}} {{limit}} {{rule}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Rejections by limit and rule",
            "Calls refused per minute by the limit hit (max_turns, max_session_tokens, "
            "budget_tokens, budget_cost, models, loop_*, context_window...) and the rule "
            "that set it. Agents show a 400 to their user "
            "and stop; a budget answers 429 and agents retry later.",
            "opm",
            targets(
                (
                    f"sum by (limit, rule) ({rate('gateway_rejections_total', a)}) * 60",
                    "{{limit}} ({{rule}})",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Loop detections by agent and detector",
            "Runaway-loop detections per minute: identical_tool_calls (the same tool call "
            "again and again), repeated_requests (the same body), turn_rate (a session "
            "suddenly turning far faster than its norm).",
            "opm",
            targets(
                (
                    f"sum by (agent, detector) ({rate('gateway_loop_detections_total', a)}) * 60",
                    "{{agent}} {{detector}}",
                )
            ),
            bars=True,
        ),
        24,
        8,
    )

    b.row("Compaction")
    b.add(
        timeseries(
            "Compactions by strategy and outcome",
            "Compacted calls per minute by strategy (elide_tool_output, summarize, truncate, "
            "clear, prompt) and outcome: applied (a new rewrite), reused (a saved rewrite "
            "replayed, the prompt cache keeps hitting), failed (the next strategy was tried).",
            "opm",
            targets(
                (
                    f"sum by (strategy, outcome) ({rate('gateway_compactions_total')}) * 60",
                    "{{strategy}} {{outcome}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Tokens saved by compaction by strategy",
            "Input tokens per second that compaction took off the calls it sent, by strategy.",
            "suffix: tok/s",
            targets(
                (
                    f"sum by (strategy) ({rate('gateway_compaction_tokens_saved_total')})",
                    "{{strategy}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    compaction = "gateway_compaction_duration_seconds"
    b.add(
        timeseries(
            "Compaction duration p50 / p95 by strategy",
            "How long compacting a call took, by strategy (all agents: the metric has no "
            "agent label): counting the history, waiting for the session's other call, the "
            "strategies and a summarize's summary call. The call waits this long before it "
            "goes upstream; reusing a saved rewrite takes milliseconds, a summary seconds.",
            "s",
            targets(
                (quantile(0.5, compaction, "strategy"), "p50 {{strategy}}"),
                (quantile(0.95, compaction, "strategy"), "p95 {{strategy}}"),
            ),
        ),
        24,
        8,
    )
    return b
