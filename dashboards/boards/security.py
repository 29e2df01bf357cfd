"""The overview's *Security* row: who is refused and why, the admin plane, rotated keys still
in use, keys near their expiry, the upstream credential pools, the egress guard, redactions
and the audit log (issue 15's telemetry; the alerts of the ``agent-gateway.security`` group)."""

from __future__ import annotations

from .panels import Board, stat, timeseries
from .queries import RANGE, RATE, increase, over_time, rate, targets

AUTH = "gateway_auth_attempts_total"
REFUSED = 'outcome!~"ok|deprecated"'
"""The outcomes that are refusals (as the AgentGatewayAuthFailureSpike alert counts them)."""
AUTH_SPIKE_SHARE = 0.25
"""The alert's share of refused credentials (``alerts.yaml``)."""
DENIED = 'outcome="denied"'


def security(b: Board, i: str) -> None:
    """The row, on ``b``; ``i`` matches the selected replicas."""
    b.row("Security")
    b.add(
        timeseries(
            "Auth attempts by plane and outcome",
            "Credentials checked per second, by plane (llm, admin) and outcome: ok, "
            "deprecated (a rotated key's previous secret in its grace), expired, revoked, "
            "invalid, missing, wrong_plane, forbidden, provider_key (a provider key sent in "
            "keys mode).",
            "reqps",
            targets((f"sum by (plane, outcome) ({rate(AUTH, i)})", "{{plane}} {{outcome}}")),
            stack=True,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Auth failure share by plane",
            "Share of the credentials presented on each plane that were refused (any outcome "
            "but ok and deprecated). Above the dashed line for 5 minutes, with at least 60 "
            "refusals in 10 minutes: alert AgentGatewayAuthFailureSpike.",
            "percentunit",
            targets(
                (
                    f"sum by (plane) ({rate(AUTH, REFUSED, i)}) / sum by (plane) ({rate(AUTH, i)})",
                    "{{plane}}",
                )
            ),
            lines_at=[(AUTH_SPIKE_SHARE, "red")],
            maximum=1,
        ),
        12,
        8,
    )
    b.add(
        timeseries(
            "Admin requests denied by action",
            "Admin API calls refused per second, by the scope they needed (keys:write, "
            "metrics:read...): no credential or a bad one, a role without the scope, or a "
            "foreign Host. Each is an admin_denied line in the audit log.",
            "reqps",
            targets(
                (
                    f"sum by (action) ({rate('gateway_admin_requests_total', DENIED, i)})"
                    " or on() vector(0)",
                    "{{action}}",
                )
            ),
        ),
        8,
        8,
    )
    b.add(
        timeseries(
            "Deprecated-secret uses by team",
            "Calls per second made with a rotated key's previous secret during its grace, by "
            "team: callers that have not switched to the new secret yet (the key's public id "
            "is in the audit log). They are refused once the grace ends.",
            "reqps",
            targets(
                (
                    "sum by (team) "
                    f"({rate('gateway_key_deprecated_secret_uses_total', i)}) or on() vector(0)",
                    "{{team}}",
                )
            ),
        ),
        8,
        8,
    )
    b.add(
        timeseries(
            "Egress fetches blocked by reason",
            "Outbound fetches the gateway was asked to make (JWKS, OIDC discovery) and the "
            "egress guard refused, per second, by reason: loopback, private, link_local "
            "(cloud metadata), reserved, redirect, unresolvable. A misconfigured issuer URL, "
            "or someone probing the network behind the gateway.",
            "reqps",
            targets(
                (
                    f"sum by (reason) ({rate('gateway_egress_blocked_total', i)})"
                    " or on() vector(0)",
                    "{{reason}}",
                )
            ),
        ),
        8,
        8,
    )
    healthy = "gateway_upstream_credential_pool_healthy"
    entries = "gateway_upstream_credential_pool_entries"
    b.add(
        timeseries(
            "Credential pool healthy share",
            "Share of each upstream credential pool's entries the upstream has not refused "
            "(401/403) in their cool-down, on the worst replica. Under 1: the pool runs on "
            "its spares (alert AgentGatewayCredentialPoolDegraded); at 0 its calls fail "
            "(AgentGatewayCredentialPoolExhausted).",
            "percentunit",
            targets(
                (
                    f"min by (upstream, pool) ({over_time('min', healthy, i)})"
                    f" / max by (upstream, pool) ({over_time('max', entries, i)})",
                    "{{upstream}} {{pool}}",
                )
            ),
            maximum=1,
        ),
        8,
        8,
    )
    b.add(
        timeseries(
            "Upstream credential refusals by pool and entry",
            "Upstream 401/403 answers to an entry of a credential pool per interval, by "
            "upstream, pool and entry name (never the credential): the call went on with the "
            "pool's next entry when it had one.",
            "none",
            targets(
                (
                    "sum by (upstream, pool, entry) ("
                    f"{increase('gateway_upstream_credential_failures_total', i, window=RATE)})",
                    "{{upstream}} {{pool}} {{entry}}",
                )
            ),
            bars=True,
        ),
        8,
        8,
    )
    b.add(
        timeseries(
            "Redactions by sink",
            "Secrets (a loaded secret's value, or a credential's shape: provider keys, "
            "gateway keys, JWTs, bearer tokens, PEM keys) replaced by [REDACTED] per "
            "interval, by the sink they were about to reach: log, span, audit, error, config. "
            "A sink that starts receiving secrets shows here first.",
            "none",
            targets(
                (
                    f"sum by (sink) ({increase('gateway_redactions_total', i, window=RATE)})",
                    "{{sink}}",
                )
            ),
            bars=True,
        ),
        8,
        8,
    )
    b.add(
        stat(
            "Keys expiring within 7 days by team",
            "Active gateway keys of each team that expire within 7 days (the highest "
            "replica's count: every replica reads the same keys). Above 0 for an hour: alert "
            "AgentGatewayKeysExpiringSoon; rotate them (gateway keys rotate ID).",
            "none",
            f"max by (team) ({over_time('last', 'gateway_keys_expiring', i)})",
            legend="{{team}}",
            thresholds=[(None, "green"), (1, "orange")],
            decimals=0,
        ),
        8,
        8,
    )
    b.add(
        timeseries(
            "Gateway keys by state",
            "Gateway keys by state, all teams: active, expiring (active, ending within 7 "
            "days), expired, revoked. Keys made in the config (auth.keys) count too.",
            "none",
            targets(
                (
                    "sum by (state) (max by (team, state) "
                    f"({over_time('last', 'gateway_keys', i)}))",
                    "{{state}}",
                )
            ),
            stack=True,
        ),
        10,
        8,
    )
    b.add(
        stat(
            "Audit write failures in range",
            "Audit lines that could not be written over the dashboard's range. Any: admin "
            "changes were refused while it lasted, and the trail has a gap (alert "
            "AgentGatewayAuditWriteFailures).",
            "none",
            f"sum({increase('gateway_audit_write_failures_total', i, window=RANGE)})",
            thresholds=[(None, "green"), (1, "red")],
            decimals=0,
        ),
        6,
        8,
    )
