"""Per-session limits through the gateway: turns and grants, warnings, models, sizes, ending
a session, idleness. Every stop is a 400 in the provider's own shape, never sent upstream."""

from __future__ import annotations

import asyncio

import pytest

from gateway.policy import parse_policy
from tests.harness import ADMIN, MakeGateway, session_headers
from tests.policy.apis import APIS, Api, call

MAX_TURNS_DEFAULTS = """
version: 1
defaults:
  limits: {max_turns: 3}
"""

MAX_TURNS_BY_RULE = """
version: 1
defaults:
  limits: {max_turns: 100}
rules:
  - name: three-for-python
    match: {agent: "openai-python"}
    limits: {max_turns: 3}
  - name: three-for-anthropic
    match: {agent: "anthropic-python"}
    limits: {max_turns: 3}
"""


def assert_provider_shape(api: Api, body: dict[str, object], code: str) -> None:
    """The exact error shape each SDK expects of its provider."""
    if api == "messages":
        assert set(body) == {"type", "error"} and body["type"] == "error"
        error = body["error"]
        assert isinstance(error, dict)
        assert set(error) == {"type", "message"}
        assert error["type"] == "invalid_request_error"
    else:
        assert set(body) == {"error"}
        error = body["error"]
        assert isinstance(error, dict)
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
        assert error["param"] is None
        assert error["code"] == code


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("policy", ["defaults", "rule"])
async def test_max_turns_stops_the_fourth_call_until_a_grant(
    make_gateway: MakeGateway, api: Api, policy: str
) -> None:
    gw = await make_gateway(MAX_TURNS_DEFAULTS if policy == "defaults" else MAX_TURNS_BY_RULE)
    session = f"turns-{api}-{policy}"
    headers = session_headers(session)
    for turn in (1, 2, 3):
        outcome = await call(gw, api, headers)
        assert outcome.ok, outcome.body
        assert outcome.headers["x-gateway-turn"] == str(turn)
    upstream_before = gw.upstream_calls()

    refused = await call(gw, api, headers)
    assert refused.status == 400
    assert_provider_shape(api, refused.body, "gateway_policy_max_turns")
    message = refused.message
    rule = (
        "defaults"
        if policy == "defaults"
        else f"three-for-{'anthropic' if api == 'messages' else 'python'}"
    )
    assert session in message
    assert "3 turns" in message
    assert "limits.max_turns" in message
    assert rule in message
    assert f"gateway sessions grant {session} --turns" in message
    assert refused.headers["x-gateway-policy-rule"] == rule
    assert refused.headers["x-gateway-policy-limit"] == "max_turns"
    assert gw.upstream_calls() == upstream_before, "a refused call reached the upstream"

    granted = await gw.grant(session, turns=2, reason="looked at it, carry on", by="alice")
    assert granted["granted_turns"] == 2
    for turn in (4, 5):
        outcome = await call(gw, api, headers)
        assert outcome.ok, outcome.body
        assert outcome.headers["x-gateway-turn"] == str(turn)
    again = await call(gw, api, headers)
    assert again.status == 400
    assert "5 turns" in again.message
    assert gw.upstream_calls() == upstream_before + 2

    shown = await gw.session(session)
    assert shown["turns"] == 5 and shown["rejected"] == 2
    [grant] = shown["grants"]
    assert grant["turns"] == 2 and grant["by"] == "alice"
    assert grant["reason"] == "looked at it, carry on"
    assert isinstance(grant["at"], float) and grant["at"] > 0
    audited = await gw.audit_events("grant", lambda e: e.get("session") == session)
    assert len(audited) == 1
    assert audited[0]["turns"] == 2 and audited[0]["by"] == "alice"
    assert audited[0]["reason"] == "looked at it, carry on"


async def test_grant_of_tokens_lifts_a_session_token_limit(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        """
        version: 1
        defaults:
          limits: {max_session_tokens: 300}
        """
    )
    headers = session_headers("tokens-grant")
    first = await call(gw, "chat", headers, max_tokens=50)
    assert first.ok
    refused = await call(gw, "chat", headers, max_tokens=400)
    assert refused.status == 400
    assert refused.code("chat") == "gateway_policy_max_session_tokens"
    assert "gateway sessions grant tokens-grant --tokens" in refused.message
    await gw.grant("tokens-grant", tokens=1000)
    assert (await call(gw, "chat", headers, max_tokens=400)).ok


async def test_grant_rejects_nothing_and_unknown_sessions(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(MAX_TURNS_DEFAULTS)
    assert (await call(gw, "chat", session_headers("known"))).ok
    status, _, body = await gw.post("/gateway/sessions/known/grant", {"turns": 0}, ADMIN)
    assert status == 400 and "positive" in body["error"]
    status, _, body = await gw.post("/gateway/sessions/nobody/grant", {"turns": 2}, ADMIN)
    assert status == 404


@pytest.mark.parametrize("api", APIS)
async def test_warn_at_headers_and_session_warnings(make_gateway: MakeGateway, api: Api) -> None:
    gw = await make_gateway(
        """
        version: 1
        defaults:
          limits: {max_turns: 5, warn_at: 0.6}
        """
    )
    session = f"warn-{api}"
    headers = session_headers(session)
    seen = []
    for turn in range(1, 6):
        outcome = await call(gw, api, headers)
        assert outcome.ok
        assert outcome.headers["x-gateway-turns-remaining"] == str(5 - turn)
        seen.append(outcome.headers.get_list("x-gateway-warning"))
    # ceil(0.6 * 5) = 3: from the third turn on.
    assert seen == [[], [], ["turns 3 of 5"], ["turns 4 of 5"], ["turns 5 of 5"]]
    warnings = (await gw.session(session))["warnings"]
    assert len(warnings) == 1, warnings  # the same warning again is counted, not repeated
    assert warnings[0]["warnings"] == ["turns 5 of 5"]
    assert warnings[0]["times"] == 3


async def test_token_warning_past_warn_at(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        """
        version: 1
        defaults:
          limits: {max_session_tokens: 1000, warn_at: 0.5}
        """
    )
    headers = session_headers("warn-tokens")
    first = await call(gw, "chat", headers, max_tokens=100)
    assert first.ok and first.headers.get_list("x-gateway-warning") == []
    left = int(first.headers["x-gateway-tokens-remaining"])
    assert 0 < left < 1000
    used = (await gw.record("warn-tokens")).tokens.total_tokens
    second = await call(gw, "chat", headers, max_tokens=500)
    assert second.ok
    # The figure is what the stop checks: the limit less the tokens used and those calls in
    # flight hold, this call's own reservation (its input estimate and max_tokens) included.
    held = 1000 - int(second.headers["x-gateway-tokens-remaining"])
    assert 500 <= held - used < 600
    assert second.headers.get_list("x-gateway-warning") == [f"tokens {held} of 1000 used or held"]
    record = await gw.record("warn-tokens")
    assert record.warnings and record.warnings[-1]["key"] == "tokens"

    # Grants count, as they do for the stop: 1000 more, and the session is under warn_at again.
    await gw.grant("warn-tokens", tokens=1000)
    used = (await gw.record("warn-tokens")).tokens.total_tokens
    third = await call(gw, "chat", headers, max_tokens=500)
    assert third.ok and third.headers.get_list("x-gateway-warning") == []
    assert 500 <= 2000 - int(third.headers["x-gateway-tokens-remaining"]) - used < 600


async def test_remaining_figures_on_every_answer_as_the_readme_says(
    make_gateway: MakeGateway,
) -> None:
    """The README's worked example: the demo's curl body under the packaged policy. Below
    warn_at, with no warning, the answer still says what is left, its own hold subtracted."""
    gw = await make_gateway(None)
    body = b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}'
    auth = {"Authorization": "Bearer sk-any", "X-Gateway-Session": "demo"}
    status, headers, _ = await gw.post("/v1/chat/completions", body, auth)
    assert status == 200 and "X-Gateway-Warning" not in headers
    assert headers["X-Gateway-Turns-Remaining"] == "999"
    assert headers["X-Gateway-Tokens-Remaining"] == str(20_000_000 - len(body) // 3 - 4096)
    assert headers["X-Gateway-Tokens-Remaining"] == "19995882"
    # Ended, the hold is gone and the usage counts instead.
    record = await gw.record("demo")
    assert record.reserved_tokens == 0 and record.tokens.total_tokens > 0


MODELS_POLICY = """
version: 1
defaults:
  limits:
    models: {allow: ["*"]}
rules:
  - name: approved-models
    match: {agent: "*"}
    limits:
      models:
        allow: ["gpt-4o*", "claude-sonnet-*"]
        deny: ["*-preview*"]
"""


@pytest.mark.parametrize(
    ("api", "model"),
    [
        ("chat", "gpt-5"),
        ("chat", "gpt-4o-preview-2026"),
        ("responses", "o3"),
        ("messages", "claude-opus-4-1"),
        ("messages", "claude-sonnet-5-preview"),
    ],
)
async def test_models_outside_the_allow_list_are_refused(
    make_gateway: MakeGateway, api: Api, model: str
) -> None:
    gw = await make_gateway(MODELS_POLICY)
    headers = session_headers(f"models-{api}-{model}")
    refused = await call(gw, api, headers, model=model)
    assert refused.status == 400
    assert_provider_shape(api, refused.body, "gateway_policy_models")
    assert f"Model '{model}' is not allowed" in refused.message
    assert gw.upstream_calls() == 0
    allowed = await call(gw, api, headers)
    assert allowed.ok and gw.upstream_calls() == 1
    assert "allow: gpt-4o*, claude-sonnet-*; deny: *-preview*" in refused.message


@pytest.mark.parametrize("api", APIS)
async def test_a_model_refusal_names_the_rule_that_set_the_lists(
    make_gateway: MakeGateway, api: Api
) -> None:
    gw = await make_gateway(MODELS_POLICY)
    refused = await call(gw, api, session_headers(f"model-rule-{api}"), model="gpt-3.5-turbo")
    assert refused.status == 400
    # The allow and deny lists were set by the rule 'approved-models', not by the defaults.
    assert "set by rule 'approved-models'" in refused.message, refused.message
    assert refused.headers["x-gateway-policy-rule"] == "approved-models"
    rejection = (await gw.session(f"model-rule-{api}"))["rejections"][-1]
    assert rejection["rule"] == "approved-models"


async def test_a_model_refusal_from_the_defaults_says_so(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        """
        version: 1
        defaults:
          limits:
            models: {allow: ["gpt-4o*"], deny: ["gpt-4o-audio*"]}
        """
    )
    refused = await call(gw, "chat", session_headers("model-defaults"), model="gpt-4o-audio-1")
    assert refused.status == 400
    assert "from the defaults" in refused.message
    assert refused.headers["x-gateway-policy-rule"] == "defaults"
    assert gw.upstream_calls() == 0


@pytest.mark.parametrize("api", APIS)
async def test_max_body_bytes_is_a_400(make_gateway: MakeGateway, api: Api) -> None:
    gw = await make_gateway(
        """
        version: 1
        defaults:
          limits: {max_body_bytes: 2000}
        """
    )
    headers = session_headers(f"body-{api}")
    refused = await call(gw, api, headers, text="x" * 3000)
    assert refused.status == 400  # the policy's cap, not the server's 413
    assert_provider_shape(api, refused.body, "gateway_policy_max_body_bytes")
    assert "limits.max_body_bytes (2000)" in refused.message
    assert "from the defaults" in refused.message
    assert gw.upstream_calls() == 0
    assert (await call(gw, api, headers, text="small")).ok


@pytest.mark.parametrize("api", APIS)
async def test_max_request_input_tokens_is_a_400(make_gateway: MakeGateway, api: Api) -> None:
    gw = await make_gateway(
        """
        version: 1
        defaults:
          limits: {max_request_input_tokens: 200}
        """
    )
    headers = session_headers(f"input-{api}")
    refused = await call(gw, api, headers, text="lorem ipsum dolor " * 200)
    assert refused.status == 400
    assert_provider_shape(api, refused.body, "gateway_policy_max_request_input_tokens")
    assert "limits.max_request_input_tokens (200)" in refused.message
    assert gw.upstream_calls() == 0
    record = await gw.record(f"input-{api}")
    assert record.turns == 0 and record.rejected == 1
    assert (await call(gw, api, headers, text="short")).ok


@pytest.mark.parametrize("api", APIS)
async def test_an_ended_session_is_refused(make_gateway: MakeGateway, api: Api) -> None:
    gw = await make_gateway(MAX_TURNS_DEFAULTS.replace("3", "100"))
    session = f"end-{api}"
    headers = session_headers(session)
    assert (await call(gw, api, headers)).ok
    ended = await gw.admin_post(
        f"/gateway/sessions/{session}/end", {"by": "bob", "reason": "runaway"}
    )
    assert ended["status"] == "ended"
    before = gw.upstream_calls()
    for text in ("again", "something else"):
        refused = await call(gw, api, headers, text=text)
        assert refused.status == 400
        assert_provider_shape(api, refused.body, "gateway_policy_session_ended")
        # Who ended it and why, said once (not "ended by an operator (by bob)").
        assert f"Session {session} was ended by bob: runaway. Start a new" in refused.message
        assert refused.message.count(" by ") == 1
    assert gw.upstream_calls() == before
    [line] = await gw.audit_events("session_end", lambda e: e.get("session") == session)
    assert line["by"] == "bob" and line["reason"] == "runaway"


async def test_ending_an_unknown_session_is_404(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(MAX_TURNS_DEFAULTS)
    status, _, _ = await gw.post("/gateway/sessions/nobody/end", {}, ADMIN)
    assert status == 404


async def test_idle_timeout_restarts_the_counts(make_gateway: MakeGateway) -> None:
    gw = await make_gateway(
        """
        version: 1
        defaults:
          limits: {max_turns: 2, idle_timeout: 0.2}
        """
    )
    headers = session_headers("idle")
    for turn in (1, 2):
        outcome = await call(gw, "chat", headers)
        assert outcome.ok and outcome.headers["x-gateway-turn"] == str(turn)
    assert (await call(gw, "chat", headers)).status == 400  # at its limit
    await asyncio.sleep(0.35)
    fresh = await call(gw, "chat", headers)
    assert fresh.ok, fresh.body
    assert fresh.headers["x-gateway-turn"] == "1"
    record = await gw.record("idle")
    assert record.turns == 1 and record.restarts == 1


async def test_idle_timeout_does_not_reopen_a_session_an_operator_ended(
    make_gateway: MakeGateway,
) -> None:
    gw = await make_gateway(
        """
        version: 1
        defaults:
          limits: {idle_timeout: 0.1}
        """
    )
    headers = session_headers("ended-idle")
    assert (await call(gw, "chat", headers)).ok
    await gw.admin_post("/gateway/sessions/ended-idle/end", {"by": "bob"})
    await asyncio.sleep(0.2)
    refused = await call(gw, "chat", headers)
    assert refused.status == 400 and "was ended by bob." in refused.message


@pytest.mark.parametrize(
    ("written", "seconds"), [("30m", 1800.0), ("90s", 90.0), ("12h", 43200.0), (0.2, 0.2)]
)
def test_idle_timeout_durations_parse(written: object, seconds: float) -> None:
    policy = parse_policy(
        f"version: 1\ndefaults:\n  limits: {{idle_timeout: {written}}}\n", "inline"
    )
    assert policy.file.defaults.limits.idle_timeout == seconds
