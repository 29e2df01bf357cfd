"""What the gateway does in an upstream outage and under overload, measured.

Two runs, each against a fake provider and a gateway in their own processes (loopback only):

- **outage**: a steady open-loop load (``--rate`` calls a second, each a small chat call with
  the SDKs' own retries off) for ``--before`` seconds, then the fake provider answers every call
  503 for ``--outage`` seconds, then it is well again for ``--after`` seconds. Printed: upstream
  attempts per client call during the outage (amplification), the client-visible error rate,
  p50/p99 of the calls admitted and answered 200, and the time from the upstream's return to
  the first 200 and to ten 200s in a row.
- **overload**: ``--overload-factor`` times the upstream's concurrency limit of callers, each
  calling in a loop, against an upstream that takes ``--upstream-delay`` seconds per call.
  Printed: p99 of the calls admitted (200), the share shed as 429, the gateway's peak memory.

It never asserts: the figures are for the README (``bench/README.md`` says how to read them).

    uv run python bench/faults.py            # about 50 s
    uv run python bench/faults.py --quick    # about 25 s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from overhead import Server, free_port, http_ok, percentile, start, stop, tcp_open, wait_ready

POLICY = Path(__file__).resolve().parent / "policy.yaml"
BODY = json.dumps(
    {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
).encode()
HEADERS = {"Authorization": "Bearer sk-bench", "Content-Type": "application/json"}
CONFIG = """\
upstreams:
  openai:
    url: {fake}/v1
    retry: {{attempts: 3, backoff_base: 0.05, backoff_max: 1, budget_ratio: 0.2}}
    breaker: {{failures: 5, open: {open}}}
    concurrency: {{max: {limit}, min: {floor}, queue: {queue}, queue_timeout: {queue_timeout}}}
  anthropic: {fake}
"""
FALLBACK = """    fallback: {upstream: spare}
  spare: {url: "{spare}/v1", provider: openai, pass_client_credentials: true}
"""
"""Added to the formatted config: the fallback run's openai upstream and its spare."""


RETRY_AFTER_CAP = 2.0
AGENTS = 50
"""The outage run's calls come from this many agents (sessions), in turn."""


@dataclass(slots=True)
class Outcome:
    at: float
    status: int
    seconds: float
    retry_after: float = 0.0


@dataclass(slots=True)
class Run:
    outcomes: list[Outcome] = field(default_factory=list)

    def between(self, start: float, end: float) -> list[Outcome]:
        return [o for o in self.outcomes if start <= o.at < end]


# -- servers -----------------------------------------------------------------------------------
@contextlib.contextmanager
def stack(workdir: Path, config: str, spare: bool = False) -> Iterator[tuple[Server, Server]]:
    """A fake provider (and, with ``spare``, a second one: the fallback) and the gateway."""
    python = sys.executable
    servers: list[Server] = []
    try:
        fakes = []
        for name in ("fake", "spare") if spare else ("fake",):
            port = free_port()
            argv = [python, "-m", "gateway", "fake-provider", "--port", str(port)]
            fakes.append(start(name, argv, port, workdir, {}))
            servers.append(fakes[-1])
            wait_ready(fakes[-1], tcp_open(port))
        fake = fakes[0]
        path = workdir / "gateway.yaml"
        text = config.replace("{fake}", fake.url)
        if spare:  # another port is another origin: pass_client_credentials says it may
            text = text.replace("{spare}", fakes[1].url)
        path.write_text(text)
        gport = free_port()
        # bench/policy.yaml refuses nothing: every call meets the resilience mechanisms.
        argv = [python, "-m", "gateway", "serve", "--config", str(path), "--port", str(gport),
                "--store", "memory://", "--policy", str(POLICY)]  # fmt: skip
        gateway = start("gateway", argv, gport, workdir, {"GATEWAY_LOG_LEVEL": "warning"})
        servers.append(gateway)
        wait_ready(gateway, http_ok(f"{gateway.url}/gateway/health"))
        yield fake, gateway
    finally:
        for server in reversed(servers):
            stop(server)


async def faults(session: aiohttp.ClientSession, fake: Server, rules: list[object]) -> int:
    """Replace the fake's fault rules; returns the API calls it had seen until now."""
    async with session.get(f"{fake.url}/_fake/faults") as response:
        seen = int((await response.json())["seen"])
    body = {"faults": rules, "replace": True}
    async with session.post(f"{fake.url}/_fake/faults", json=body) as response:
        response.raise_for_status()
    return seen


async def seen(session: aiohttp.ClientSession, fake: Server) -> int:
    async with session.get(f"{fake.url}/_fake/faults") as response:
        return int((await response.json())["seen"])


async def call(
    session: aiohttp.ClientSession, url: str, run: Run, origin: float, agent: int
) -> None:
    """One client call, as agent number ``agent`` (each agent its own session)."""
    started = time.monotonic()
    headers = {**HEADERS, "X-Gateway-Session": f"bench-agent-{agent}"}
    try:
        async with session.post(url, data=BODY, headers=headers) as response:
            await response.read()
            status = response.status
            wait = float(response.headers.get("Retry-After", "0") or 0)
    except aiohttp.ClientError:
        status, wait = 0, 0.0
    run.outcomes.append(Outcome(started - origin, status, time.monotonic() - started, wait))


# -- outage ------------------------------------------------------------------------------------
async def outage(
    fake: Server, gateway: Server, args: argparse.Namespace, fallback: bool = False
) -> list[str]:
    run, url = Run(), f"{gateway.url}/v1/chat/completions"
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        origin = time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        down_at, up_at = args.before, args.before + args.outage
        end = up_at + args.after
        marks: dict[str, int] = {}
        interval = 1.0 / args.rate
        n = 0
        while (now := time.monotonic() - origin) < end:
            if "down" not in marks and now >= down_at:
                marks["down"] = await faults(session, fake, [{"kind": "status", "status": 503}])
            if "up" not in marks and now >= up_at:
                marks["up"] = await faults(session, fake, [])
            agent = n % AGENTS
            task = asyncio.get_running_loop().create_task(call(session, url, run, origin, agent))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
            await asyncio.sleep(max(0.0, origin + n * interval - time.monotonic()))
        await asyncio.gather(*tasks)
        outage_attempts = marks["up"]  # the fake counts from the replace at "down"
    during = run.between(down_at, up_at)
    failed = [o for o in during if o.status != 200]
    admitted = sorted(o.seconds for o in run.outcomes if o.status == 200)
    first_ok, steady = recovery(run, up_at)
    return [
        f"outage of {args.outage:g}s at {args.rate:g} calls/s (breaker opens after 5 failures,"
        f" open {args.breaker_open:g}s; retries: 3 attempts, budget 20%)"
        + (", with a fallback upstream" if fallback else ", no fallback"),
        f"  client calls during the outage        {len(during)}",
        f"  upstream attempts during the outage   {outage_attempts}"
        f"  ({outage_attempts / max(1, len(during)):.2f} per client call)",
        f"  client-visible errors in the outage   {len(failed) / max(1, len(during)):.1%}"
        f"  ({_statuses(failed)})",
        f"  admitted calls (200) p50 / p99        {_ms(percentile(admitted, 50))}"
        f" / {_ms(percentile(admitted, 99))}",
        f"  recovery: first 200 after the return  {first_ok}",
        f"  recovery: ten 200s in a row after     {steady}",
    ]


def recovery(run: Run, up_at: float) -> tuple[str, str]:
    after = sorted(run.between(up_at, float("inf")), key=lambda o: o.at)
    first = next((o for o in after if o.status == 200), None)
    streak, steady = 0, None
    for outcome in after:
        streak = streak + 1 if outcome.status == 200 else 0
        if streak == 10:
            steady = outcome
            break
    return (
        f"{first.at - up_at:.2f}s" if first else "never",
        f"{steady.at - up_at:.2f}s" if steady else "never",
    )


# -- overload ----------------------------------------------------------------------------------
async def overload(fake: Server, gateway: Server, args: argparse.Namespace) -> list[str]:
    run, url = Run(), f"{gateway.url}/v1/chat/completions"
    callers = args.limit * args.overload_factor
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await faults(session, fake, [{"kind": "delay", "seconds": args.upstream_delay}])
        origin = time.monotonic()
        deadline = origin + args.overload_seconds

        async def caller(agent: int) -> None:
            # As the SDKs do: a 429's Retry-After is waited out (capped) before calling again.
            while time.monotonic() < deadline:
                await call(session, url, run, origin, agent)
                if run.outcomes[-1].status == 429:
                    await asyncio.sleep(min(RETRY_AFTER_CAP, run.outcomes[-1].retry_after))

        await asyncio.gather(*(caller(agent) for agent in range(callers)))
        await faults(session, fake, [])
    admitted = sorted(o.seconds for o in run.outcomes if o.status == 200)
    shed = [o for o in run.outcomes if o.status == 429]
    other = [o for o in run.outcomes if o.status not in (200, 429)]
    peak = peak_memory(gateway)
    return [
        f"overload: {callers} callers in a loop = {args.overload_factor}x the limit of"
        f" {args.limit} (upstream {args.upstream_delay * 1000:.0f} ms a call,"
        f" queue {args.queue}, queue_timeout {args.queue_timeout:g}s), {args.overload_seconds:g}s",
        f"  calls                                 {len(run.outcomes)}",
        f"  admitted (200) p50 / p99              {_ms(percentile(admitted, 50))}"
        f" / {_ms(percentile(admitted, 99))}",
        f"  shed as 429 with Retry-After          {len(shed) / max(1, len(run.outcomes)):.1%}"
        " (callers wait out Retry-After, at most 2 s, as the SDKs do)",
        f"  other answers                         {len(other)} ({_statuses(other)})",
        f"  gateway peak memory (VmHWM)           {peak}",
    ]


def peak_memory(server: Server) -> str:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return f"{int(line.split()[1]) / 1024:.0f} MiB"
    return "n/a"


# -- output ------------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _statuses(outcomes: Sequence[Outcome]) -> str:
    counts: dict[int, int] = {}
    for outcome in outcomes:
        counts[outcome.status] = counts.get(outcome.status, 0) + 1
    return ", ".join(f"{s or 'conn'}: {n}" for s, n in sorted(counts.items())) or "none"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument("--rate", type=float, default=50.0, help="outage: client calls a second")
    parser.add_argument("--before", type=float, default=5.0)
    parser.add_argument("--outage", type=float, default=12.0)
    parser.add_argument("--after", type=float, default=10.0)
    parser.add_argument("--breaker-open", type=float, default=5.0)
    parser.add_argument("--limit", type=int, default=16, help="the upstream's concurrency max")
    parser.add_argument("--overload-factor", type=int, default=5)
    parser.add_argument("--overload-seconds", type=float, default=10.0)
    parser.add_argument("--upstream-delay", type=float, default=0.1)
    parser.add_argument("--queue", type=int, default=16)
    parser.add_argument("--queue-timeout", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.quick:
        args.before, args.outage, args.after, args.overload_seconds = 2.0, 6.0, 8.0, 5.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = CONFIG.format(
        fake="{fake}",
        open=args.breaker_open,
        limit=args.limit,
        floor=max(1, args.limit // 4),
        queue=args.queue,
        queue_timeout=args.queue_timeout,
    )
    with tempfile.TemporaryDirectory(prefix="gateway-faults-") as tmp:
        with stack(Path(tmp), config) as (fake, gateway):
            lines = asyncio.run(outage(fake, gateway, args))
        spared = config.replace("  anthropic:", FALLBACK + "  anthropic:")
        with stack(Path(tmp), spared, spare=True) as (fake, gateway):
            lines += asyncio.run(outage(fake, gateway, args, fallback=True))
        with stack(Path(tmp), config) as (fake, gateway):
            lines += asyncio.run(overload(fake, gateway, args))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    urllib.request.install_opener(urllib.request.build_opener(urllib.request.ProxyHandler({})))
    sys.exit(main())
