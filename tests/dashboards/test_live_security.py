"""The overview's Security row against a real Prometheus. A gateway in ``mixed`` mode (gateway
keys and JWTs; upstream credential pools of file references) accepts, refuses, takes a rotated
key's previous secret, fails over from a credential the upstream refuses, blocks a JWKS fetch
aimed at a private address, denies admin calls, and redacts a secret on its way to the audit
log; every panel of the row must return data, and the alerts on keys and pools must go
pending on these series."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer

from gateway.fake_provider import FAULTS, Fault
from tests.conftest import ANTHROPIC_MODEL
from tests.dashboards.promql import all_queries
from tests.dashboards.test_live_prometheus import (
    SCRAPES_AFTER_TRAFFIC,
    SECURITY_ROW,
    Prometheus,
    check,
    prometheus,
    prometheus_binary,
)
from tests.harness import ADMIN, Gateway, MakeGateway

MAY_BE_ZERO = {
    "gateway-overview.json: Audit write failures in range (A)": "the audit log was writable",
}
CHAT_PATH = "/v1/chat/completions"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES = {"model": ANTHROPIC_MODEL, "max_tokens": 32,
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
AUDIENCE = "agent-gateway"
BLOCKED_JWKS = "http://10.255.0.1/jwks"
"""A private address: the egress guard refuses it before any connection is made."""
BAD_ADMIN = {"Authorization": "Bearer not-the-admin-token-0123456789"}
SECRET_IN_PATH = "sk-proj-" + "A" * 24
"""A provider key's shape in an admin URL: the audit line of the refused call is redacted."""


def issuer(round: int) -> str:
    return f"https://idp-{round}.example"


def mixed_mode(fake: TestServer, tmp_path: Path) -> dict[str, Any]:
    """Settings: gateway keys, and JWTs of two issuers whose JWKS sit at a private address;
    openai with two credentials (one can fail over), anthropic with one."""
    for name in ("oa1", "oa2", "an1"):
        (tmp_path / name).write_text(f"sk-pool-{name}-credential-0001\n")

    def pool(*names: str) -> dict[str, Any]:
        entries = [{"name": f"entry-{n}", "value": f"file:{tmp_path / n}"} for n in names]
        return {"platform": entries}

    issuers = [
        {"issuer": issuer(n), "audience": [AUDIENCE], "jwks_url": BLOCKED_JWKS} for n in (1, 2)
    ]
    return {
        "auth": {"mode": "mixed", "jwt_issuers": issuers},
        "upstreams": {
            "openai": {"url": str(fake.make_url("/v1")), "credentials": pool("oa1", "oa2")},
            "anthropic": {
                "url": str(fake.make_url("")).rstrip("/"),
                "credentials": pool("an1"),
            },
        },
    }


def unsigned_jwt(iss: str) -> str:
    """A well-formed token whose signature is never checked: its issuer's keys cannot be
    fetched."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    now = int(time.time())
    header = {"alg": "RS256", "kid": "k1", "typ": "JWT"}
    claims = {"iss": iss, "aud": AUDIENCE, "sub": "ci-bot", "iat": now, "exp": now + 600}
    return f"{part(header)}.{part(claims)}.{'A' * 86}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def admin(gw: Gateway, path: str, body: dict[str, Any], status: int = 200) -> Any:
    answer = await gw.post(path, body, ADMIN)
    assert answer[0] == status, answer
    return answer[2]


async def make_keys(gw: Gateway) -> dict[str, str]:
    """Keys of two teams: one rotated (both secrets work), one expiring in 3 days, one
    revoked."""
    made = {}
    for name, team, expires in (("ci", "platform", None), ("soon", "research", "3d"),
                                ("gone", "platform", None)):  # fmt: skip
        spec = {"team": team, "name": name, **({"expires": expires} if expires else {})}
        answer = await admin(gw, "/gateway/keys", spec, 201)
        made[name], made[f"{name}-id"] = answer["key"], answer["id"]
    await admin(gw, f"/gateway/keys/{made['gone-id']}/revoke", {})
    made["ci-old"] = made["ci"]
    made["ci"] = (await admin(gw, f"/gateway/keys/{made['ci-id']}/rotate", {"grace": "1h"}))["key"]
    return made


async def drive(gw: Gateway, keys: dict[str, str], round: int) -> None:
    """One of every outcome the row shows, on both planes."""
    chat, messages = CHAT_PATH, "/v1/messages"
    assert (await gw.post(chat, CHAT, bearer(keys["ci"])))[0] == 200
    assert (await gw.post(chat, CHAT, bearer(keys["ci-old"])))[0] == 200  # deprecated
    claude = {"x-api-key": keys["soon"], "anthropic-version": "2023-06-01"}
    answer = await gw.post(messages, MESSAGES, claude)
    assert answer[0] == 200, answer
    wrong = keys["ci"][:-6] + ("AAAAAA" if not keys["ci"].endswith("AAAAAA") else "BBBBBB")
    refused = [
        bearer(keys["gone"]),  # revoked
        bearer(wrong),  # invalid
        {},  # missing
        bearer("sk-proj-" + "B" * 40),  # a provider key without upstream:byok
    ]
    # Its issuer's JWKS fetch is blocked. An issuer per round: one is fetched at most every
    # 30 s, and the reason's series is born at its first block (a rate needs a second one).
    refused.append(bearer(unsigned_jwt(issuer(round))))
    for headers in refused:
        status = (await gw.post(chat, CHAT, headers))[0]
        assert status in (401, 403), (headers.keys(), status)
    # Admin calls with a wrong token: denied, audited (the path redacted on its way there;
    # the denials of one peer are one audit line per 10 s, so the secret's call goes first).
    path = f"/gateway/keys/{SECRET_IN_PATH}/revoke"
    assert (await gw.post(path, {}, BAD_ADMIN))[0] == 401
    assert (await gw.post("/gateway/keys", {"team": "x", "name": "y"}, BAD_ADMIN))[0] == 401


async def test_the_security_row_against_a_real_prometheus(
    make_gateway: MakeGateway, fake_provider: TestServer, tmp_path: Path
) -> None:
    binary = prometheus_binary()
    gw = await make_gateway(None, **mixed_mode(fake_provider, tmp_path))
    job = 'up{job="agent-gateway"}'
    async with prometheus(binary, tmp_path, gw.server.port) as prom:
        await prom.wait_for(f"{job} == 1", "the gateway scraped")
        keys = await make_keys(gw)
        # The upstream refuses openai's first credential once: the call goes on with the next.
        gw.fake.app[FAULTS].add(Fault("status", status=401, count=1, path=CHAT_PATH))
        await drive(gw, keys, 1)
        [refusal] = gw.fake.app[FAULTS].rules
        assert refusal.hits == 1, "the refused credential was never tried"
        await wait_for_scrape(prom, job)
        await drive(gw, keys, 2)
        await wait_for_scrape(prom, job)

        queries = await asyncio.to_thread(all_queries)
        row = [q for q in queries if q.row == SECURITY_ROW]
        assert len(row) >= 11
        assert set(MAY_BE_ZERO) <= {q.where for q in row}, "stale MAY_BE_ZERO entries"
        checked = await asyncio.gather(*(check(prom, q, MAY_BE_ZERO) for q in row))
        problems = [p for p in checked if p]
        assert not problems, "\n".join(problems)

        # The alerts read these very series: pending now (they wait an hour and 5 minutes).
        await pending(prom, "AgentGatewayKeysExpiringSoon", team="research")
        await pending(
            prom, "AgentGatewayCredentialPoolDegraded", upstream="openai", pool="platform"
        )
        quiet = await prom.query('ALERTS{alertname="AgentGatewayCredentialPoolExhausted"}')
        assert quiet["data"]["result"] == []


async def wait_for_scrape(prom: Prometheus, job: str) -> None:
    """Until Prometheus has scraped the gateway a few times since now."""
    done = time.time()
    await prom.wait_for(
        f"timestamp({job}) > {done + SCRAPES_AFTER_TRAFFIC}", "scrapes after the traffic"
    )


async def pending(prom: Prometheus, alert: str, **labels: str) -> None:
    matchers = "".join(f', {name}="{value}"' for name, value in labels.items())
    await prom.wait_for(f'ALERTS{{alertname="{alert}"{matchers}}}', f"{alert} pending")
