"""*Agent gateway / Tokens and cost*, for org admins: ``tokens-and-cost.json``."""

from __future__ import annotations

from .panels import Board, bargauge, query_variable, stat, timeseries
from .queries import RANGE, RATE, TEAM_TOKEN_PACE, increase, rate, sel, targets


def tokens_and_cost() -> Board:
    b = Board(
        "agent-gateway-cost",
        "Agent gateway / Tokens and cost",
        "Who spends what? Tokens and cost by team, agent and model, spend rate and what was "
        "folded into 'other'. Cost is in the policy's price currency (prices per million "
        "tokens). For org admins.",
        ["agent-gateway", "llm", "cost"],
    )
    b.time_from = "now-30d"
    t, a, m = 'team=~"$team"', 'agent=~"$agent"', 'model=~"$model"'
    b.variables += [
        query_variable(
            "team",
            "Team",
            "gateway_tokens_total",
            "Teams (from the policy's keys or its team header); 'unknown' has none.",
        ),
        query_variable(
            "agent",
            "Agent",
            f"gateway_tokens_total{{{t}}}",
            "Agents of the selected teams.",
        ),
        query_variable(
            "model",
            "Model",
            f"gateway_tokens_total{{{t}, {a}}}",
            "Requested models of the selected teams and agents.",
        ),
    ]
    tokens, cost = "gateway_tokens_total", "gateway_cost_total"
    billed = 'type=~"input|output"'

    b.row("Budgets")

    def last(metric: str) -> str:
        return f"max by (scope, owner, window) (max_over_time({metric}[{RATE}]))"

    used_tokens = f"{last('gateway_budget_spent_tokens')} / {last('gateway_budget_limit_tokens')}"
    elapsed = (
        f"clamp_min(1 - ({last('gateway_budget_window_end_timestamp_seconds')} - time())"
        f" / {last('gateway_budget_window_seconds')}, 0.01)"
    )
    b.add(
        timeseries(
            "Token budget used",
            "Share of each token budget spent in its current window, by team (or key) and "
            "window. At 100% the budget's calls are refused (429) until the window ends.",
            "percentunit",
            targets((used_tokens, "{{scope}} {{owner}} ({{window}})")),
            lines_at=[(1.0, "red")],
        ),
        6,
        8,
    )
    b.add(
        timeseries(
            "Cost budget used",
            "Share of each cost budget spent in its current window, by team (or key) and "
            "window (built-in prices, or the policy's).",
            "percentunit",
            targets(
                (
                    f"{last('gateway_budget_spent_cost')} / {last('gateway_budget_limit_cost')}",
                    "{{scope}} {{owner}} ({{window}})",
                )
            ),
            lines_at=[(1.0, "red")],
        ),
        6,
        8,
    )
    b.add(
        timeseries(
            "Request rate limit used",
            "Share of each request budget (max_requests: LLM calls begun in its window, a "
            "rate limit when the window is a minute) used in its current window, by team (or "
            "key) and window. At 100% the calls are refused (429 with Retry-After) until the "
            "window ends.",
            "percentunit",
            targets(
                (
                    f"{last('gateway_budget_spent_requests')}"
                    f" / {last('gateway_budget_limit_requests')}",
                    "{{scope}} {{owner}} ({{window}})",
                )
            ),
            lines_at=[(1.0, "red")],
        ),
        6,
        8,
    )
    b.add(
        timeseries(
            "Token budget pace",
            "Share of the budget spent over share of its window gone: 1 spends the budget "
            "exactly by the window's end; above 2 it runs out before half the window is over "
            "(the AgentGatewayBudgetBurn alert).",
            "none",
            targets((f"({used_tokens}) / {elapsed}", "{{scope}} {{owner}} ({{window}})")),
            lines_at=[(1.0, "orange"), (2.0, "red")],
        ),
        6,
        8,
    )

    b.row("In range")
    b.add(
        stat(
            "Spend in range",
            "Cost over the dashboard's range for the selected teams, agents and models, in "
            "the policy's price currency (models without a price count 0).",
            "short",
            f"sum({increase(cost, t, a, m)})",
            decimals=2,
        ),
        6,
        4,
    )
    b.add(
        stat(
            "Projected 30-day spend",
            "The spend of a 30-day period at the average rate of the dashboard's range.",
            "short",
            f"sum(rate({sel(cost, t, a, m)}[{RANGE}])) * 86400 * 30",
            decimals=2,
        ),
        6,
        4,
    )
    b.add(
        stat(
            "Tokens in range",
            "Input plus output tokens over the range (input includes the cached part), as "
            "budgets count them.",
            "short",
            f"sum({increase(tokens, billed, t, a, m)})",
        ),
        6,
        4,
    )
    other = 'team="other"', 'agent="other"', 'model="other"'
    folded = " or ".join(increase(cost, o) for o in other)
    b.add(
        stat(
            "Spend folded into 'other'",
            "Share of the range's spend whose team, agent or model was folded into 'other' "
            "because the label had reached its cap: that spend is not attributed. Raise the "
            "cap or fix the caller that invents names.",
            "percentunit",
            f"(sum({folded}) or on() vector(0)) / sum({increase(cost)})",
            thresholds=[(None, "green"), (0.01, "orange")],
            decimals=1,
        ),
        6,
        4,
    )

    b.row("Tokens")
    b.add(
        timeseries(
            "Tokens by team",
            "Input plus output tokens per second by team. The dashed line is the token-burn "
            f"alert threshold ({TEAM_TOKEN_PACE} tok/s: six times a 50M tokens/day pace).",
            "suffix: tok/s",
            targets((f"sum by (team) ({rate(tokens, billed, t, a, m)})", "{{team}}")),
            stack=True,
            lines_at=[(TEAM_TOKEN_PACE, "red")],
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Tokens by agent",
            "Input plus output tokens per second by agent (input includes the cached part).",
            "suffix: tok/s",
            targets((f"sum by (agent) ({rate(tokens, billed, t, a, m)})", "{{agent}}")),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Tokens by model and type",
            "Tokens per second by requested model and type: input (includes the cache "
            "parts), output, cache_read, cache_creation, reasoning.",
            "suffix: tok/s",
            targets((f"sum by (model, type) ({rate(tokens, t, a, m)})", "{{model}} {{type}}")),
        ),
        12,
        8,
    )
    b.add(
        bargauge(
            "Tokens in range by team",
            "Input plus output tokens over the dashboard's range, by team, largest first.",
            "short",
            f"sort_desc(sum by (team) ({increase(tokens, billed, t, a, m)}))",
            "{{team}}",
        ),
        12,
        8,
    )

    b.row("Cost")
    for by, width in (("team", 8), ("agent", 8), ("model", 8)):
        b.add(
            timeseries(
                f"Spend rate by {by}",
                f"Cost per hour by {by}, in US dollars with the built-in prices (genai-prices; "
                "the policy's prices override them). Calls to models without a price are not "
                "in it: see Calls without a price.",
                "suffix: /h",
                targets((f"sum by ({by}) ({rate(cost, t, a, m)}) * 3600", f"{{{{{by}}}}}")),
                stack=True,
            ),
            width,
            8,
        )
    for by in ("team", "model"):
        b.add(
            bargauge(
                f"Spend in range by {by}",
                f"Cost over the dashboard's range by {by}, largest first.",
                "short",
                f"sort_desc(sum by ({by}) ({increase(cost, t, a, m)}))",
                f"{{{{{by}}}}}",
            ),
            8,
            8,
        )
    b.add(
        bargauge(
            "Calls without a price",
            "Calls over the range whose model has no price (neither the policy's prices nor "
            "the built-in table), by requested model: their cost is missing from the panels "
            "beside. Give the model a price in the policy's prices, or a default with '*'.",
            "short",
            f"sort_desc(sum by (model) ({increase('gateway_unpriced_requests_total', m)}))",
            "{{model}}",
        ),
        8,
        8,
    )
    b.add(
        bargauge(
            "Cost per session by agent",
            "Spend over the range divided by the sessions each agent started in it: what an "
            "agent's session costs on average.",
            "short",
            f"sort_desc(sum by (agent) ({increase(cost, t, a, m)})"
            f" / sum by (agent) ({increase('gateway_sessions_started_total', a)}))",
            "{{agent}}",
        ),
        8,
        8,
    )

    b.row("Governance")
    b.add(
        timeseries(
            "Rejections by limit and agent",
            "Calls the policy refused per minute, by limit (budget_tokens, budget_cost, "
            "max_turns, models...) "
            "and agent (all teams: the metric has no team label).",
            "opm",
            targets(
                (
                    f"sum by (limit, agent) ({rate('gateway_rejections_total', a)}) * 60",
                    "{{limit}} {{agent}}",
                )
            ),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Label values folded into 'other'",
            "Per minute, new label values (model, agent, team) folded into 'other' because "
            "the label had reached its cap. Anything here means some usage is not "
            "attributed to its own team, agent or model.",
            "opm",
            targets(
                (
                    f"sum by (label) ({rate('gateway_label_overflow_total')}) * 60",
                    "{{label}}",
                )
            ),
        ),
        12,
        8,
    )
    return b
