"""``gateway_keys`` and ``gateway_keys_expiring`` (``KeyStatus``): keys counted by team and
state at scrape time, never by id, the team label capped like every other; and read from a
running gateway's key ring by ``GET /metrics``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth.keys import KeyRecord
from gateway.telemetry.collectors import KEY_STATES
from gateway.telemetry.labels import Names
from gateway.telemetry.metrics import Metrics
from tests.harness import ADMIN, MakeGateway

NOW = 1_900_000_000.0
DAY = 86400.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def key(key_id: str, team: str, *, expires_in: float | None, revoked: bool = False) -> KeyRecord:
    return KeyRecord(
        id=key_id,
        name="ci",
        team=team,
        scopes=("llm",),
        models=(),
        pool=None,
        created_at=NOW - 30 * DAY,
        created_by="token:abc",
        expires_at=None if expires_in is None else NOW + expires_in,
        digest="0" * 64,
        revoked_at=NOW - DAY if revoked else None,
    )


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("gateway_keys") or s.name == "gateway_label_overflow_total"
    }


def scraped(metrics: Metrics) -> Samples:
    return parse(generate_latest(metrics.registry).decode())


def keys(team: str, state: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("gateway_keys", (("state", state), ("team", team)))


def expiring(team: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("gateway_keys_expiring", (("team", team),))


def test_each_key_is_counted_in_one_state_by_team() -> None:
    metrics = Metrics()
    metrics.keys.clock = lambda: NOW
    metrics.keys.records = [
        key("a1", "platform", expires_in=90 * DAY),
        key("a2", "platform", expires_in=None),  # never expires: active
        key("a3", "platform", expires_in=3 * DAY),
        key("a4", "platform", expires_in=7 * DAY),  # exactly 7 days: expiring
        key("a5", "platform", expires_in=-DAY),
        key("a6", "platform", expires_in=2 * DAY, revoked=True),  # revoked wins
        key("b1", "research", expires_in=8 * DAY),
    ]
    found = scraped(metrics)
    assert found[keys("platform", "active")] == 2
    assert found[keys("platform", "expiring")] == 2
    assert found[keys("platform", "expired")] == 1
    assert found[keys("platform", "revoked")] == 1
    assert found[expiring("platform")] == 2
    # Every state of a team with keys is exported, at 0 when none is in it.
    research = {state: found[keys("research", state)] for state in KEY_STATES}
    assert research == {"active": 1, "expiring": 0, "expired": 0, "revoked": 0}
    assert found[expiring("research")] == 0
    assert not any("a1" in str(labels) for _, labels in found), "a key id is a label"


def test_no_keys_no_series() -> None:
    found = scraped(Metrics())  # passthrough: the scrape never sets records
    assert not [name for name, _ in found if name.startswith("gateway_keys")]


def test_teams_past_the_cap_are_folded_once_and_counted_once() -> None:
    metrics = Metrics(max_label_values=1)
    metrics.keys.clock = lambda: NOW
    metrics.keys.records = [
        key("a1", "platform", expires_in=3 * DAY),
        key("b1", "research", expires_in=3 * DAY),
        key("c1", "search", expires_in=90 * DAY),
    ]
    for _ in range(3):
        found = scraped(metrics)
    assert found[expiring("platform")] == 1
    assert found[expiring("other")] == 1
    assert found[keys("other", "active")] == 1
    assert ("gateway_keys_expiring", (("team", "research"),)) not in found
    # Two teams folded, each counted once: not again at every scrape.
    overflow = ("gateway_label_overflow_total", (("label", "team"),))
    assert found[overflow] == 2


def test_a_team_the_policy_names_later_gets_its_own_label() -> None:
    metrics = Metrics(max_label_values=0)
    metrics.keys.clock = lambda: NOW
    metrics.keys.records = [key("a1", "platform", expires_in=3 * DAY)]
    assert scraped(metrics)[expiring("other")] == 1
    # A policy reload that names the team: the cap's names change (``Metrics.known``).
    named = Names.of(["platform"])
    metrics.team.names = lambda: named
    assert scraped(metrics)[expiring("platform")] == 1


def keys_mode(fake: TestServer, tmp_path: Path) -> dict[str, Any]:
    (tmp_path / "openai-key").write_text("sk-pool-openai-credential-0001\n")
    entry = {"name": "primary", "value": f"file:{tmp_path / 'openai-key'}"}
    return {
        "auth": {"mode": "keys"},
        "upstreams": {
            "openai": {"url": str(fake.make_url("/v1")), "credentials": {"platform": [entry]}}
        },
    }


async def test_the_scrape_reads_the_key_ring(
    make_gateway: MakeGateway, fake_provider: TestServer, tmp_path: Path
) -> None:
    gw = await make_gateway(None, **keys_mode(fake_provider, tmp_path))
    made = []
    for spec in ({"team": "platform", "name": "ci"},
                 {"team": "platform", "name": "soon", "expires": "2d"},
                 {"team": "research", "name": "gone"}):  # fmt: skip
        status, _, answer = await gw.post("/gateway/keys", spec, ADMIN)
        assert status == 201, answer
        made.append(answer["id"])
    status, _, answer = await gw.post(f"/gateway/keys/{made[2]}/revoke", {}, ADMIN)
    assert status == 200, answer

    async with aiohttp.ClientSession() as http, http.get(gw.url("/metrics")) as resp:
        assert resp.status == 200
        text = await resp.text()
    found = parse(text)
    assert found[keys("platform", "active")] == 1
    assert found[expiring("platform")] == 1
    assert found[keys("research", "revoked")] == 1
    assert found[expiring("research")] == 0
    assert not any(key_id in text for key_id in made), "a key id reached /metrics"
