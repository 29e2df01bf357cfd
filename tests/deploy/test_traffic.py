"""The compose stack's traffic generator (``deploy/traffic/traffic.py``) against a gateway in
keys mode and the fake provider: its normal agents are answered, its looping agent is stopped
by the loop rule, its runaway agent by the turn limit, and what it reports is what the
gateway counted. A missing or malformed setting is refused with a message, and a real
provider behind the gateway stops it before it spends anything."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.fake_provider import FakeProviderConfig
from tests.deploy.traffic_script import SCRIPT, traffic
from tests.harness import ADMIN, MakeGateway, create_key, keys_mode

POLICY = """
version: 1
defaults:
  limits: {max_turns: 30}
  loops: {identical_tool_calls: 4, action: reject}
"""


async def keyed_gateway(make_gateway: MakeGateway, fake: Any, tmp_path: Path) -> tuple[Any, str]:
    gw = await make_gateway(POLICY, **keys_mode(fake, tmp_path))
    created = await create_key(gw, team="demo", name="traffic")
    return gw, str(created["key"])


async def test_the_agents_fill_what_the_dashboards_show(
    make_gateway: MakeGateway, fake_provider: Any, tmp_path: Path
) -> None:
    gw, key = await keyed_gateway(make_gateway, fake_provider, tmp_path)
    reports: list[str] = []
    tallies = await traffic.run(gw.url(), key, seconds=4, pace=0.02, report=reports.append)

    for name in ("demo-coder", "demo-reviewer"):
        assert tallies[name].turns >= 3 and tallies[name].sessions >= 1, name
        assert not tallies[name].refused and not tallies[name].failed, name
    looper, runaway = tallies["demo-looper"], tallies["demo-runaway"]
    assert looper.refused["gateway_policy_loop_identical_tool_calls"] >= 1, looper
    assert set(looper.refused) == {"gateway_policy_loop_identical_tool_calls"}
    assert runaway.refused["gateway_policy_max_turns"] >= 1, runaway
    assert set(runaway.refused) == {"gateway_policy_max_turns"}
    # The runaway went all the way to the limit (30 turns) in its first session.
    assert runaway.turns >= 30
    assert not looper.failed and not runaway.failed
    assert reports and "demo-looper" in reports[-1]

    # The gateway counted the same: the families the dashboards and alerts read have samples.
    async with gw._http.get(gw.url("/metrics"), headers=ADMIN) as answer:
        assert answer.status == 200
        metrics = await answer.text()
    for agent in ("demo-coder", "demo-reviewer", "demo-looper", "demo-runaway"):
        assert f'agent="{agent}"' in metrics, agent
    assert 'gateway_loop_detections_total{agent="demo-looper"' in metrics
    assert "gateway_rejections_total{" in metrics


async def test_a_real_provider_behind_the_gateway_stops_it_before_the_agents_start(
    make_gateway: MakeGateway,
    fake_provider: Any,
    fake_config: FakeProviderConfig,
    tmp_path: Path,
) -> None:
    fake_config.reply_text = "Hello! I am a real, paid model."
    gw, key = await keyed_gateway(make_gateway, fake_provider, tmp_path)
    sent = gw.upstream_calls()
    with pytest.raises(traffic.Fatal, match="real tokens"):
        await traffic.run(gw.url(), key, seconds=2, pace=0.02)
    assert gw.upstream_calls() == sent + 1  # one short call, then nothing


async def test_a_refused_key_stops_every_agent(
    make_gateway: MakeGateway, fake_provider: Any, tmp_path: Path
) -> None:
    gw, _key = await keyed_gateway(make_gateway, fake_provider, tmp_path)
    with pytest.raises(traffic.Fatal, match="refused the key"):
        await traffic.run(gw.url(), "gw_" + "x" * 40, seconds=2, pace=0.02)


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ({"GATEWAY_API_KEY": "gw_k"}, "GATEWAY_URL"),
        ({"GATEWAY_URL": "lb:8787", "GATEWAY_API_KEY": "gw_k"}, "GATEWAY_URL"),
        ({"GATEWAY_URL": "ftp://lb", "GATEWAY_API_KEY": "gw_k"}, "GATEWAY_URL"),
        ({"GATEWAY_URL": "http://lb:8787"}, "gateway keys create"),
        ({"GATEWAY_URL": "http://lb:8787", "GATEWAY_API_KEY": "gw_a\r\nX-Evil: 1"}, "characters"),
        (
            {"GATEWAY_URL": "http://lb:8787", "GATEWAY_API_KEY": "gw_k", "TRAFFIC_SECONDS": "x"},
            "TRAFFIC_SECONDS",
        ),
        (
            {"GATEWAY_URL": "http://lb:8787", "GATEWAY_API_KEY": "gw_k", "TRAFFIC_SECONDS": "-1"},
            "TRAFFIC_SECONDS",
        ),
        (
            {"GATEWAY_URL": "http://lb:8787", "GATEWAY_API_KEY": "gw_k", "TRAFFIC_SECONDS": "nan"},
            "TRAFFIC_SECONDS",
        ),
    ],
)
def test_a_bad_setting_is_refused_with_what_to_set(
    env: dict[str, str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert traffic.main(env) == 2
    err = capsys.readouterr().err
    assert err.startswith("traffic: ") and says in err and "Traceback" not in err


def test_the_script_needs_only_the_standard_library_and_the_images_aiohttp() -> None:
    """It runs in the gateway's image with nothing installed for it."""
    imported = set()
    for line in SCRIPT.read_text().splitlines():
        if line.startswith(("import ", "from ")):
            imported.add(line.split()[1].split(".")[0])
    imported -= {"__future__"}
    assert imported - sys.stdlib_module_names == {"aiohttp"}
