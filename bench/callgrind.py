"""Instructions per call under callgrind: repeatable where requests per second are not.

    uv run python bench/callgrind.py [--relay] [--cases chat,chat-stream] [--repo DIR]
                                     [--auth keys]

Starts the fake provider, then the gateway (or, with ``--relay``, bench/overhead.py's bare
aiohttp relay) under ``valgrind --tool=callgrind --instr-atstart=no``. For each case: warm-up
calls with instrumentation off, ``callgrind_control -z`` and ``-i on``, the measured calls at
concurrency 16 from an aiohttp client in this process, ``-i off`` and ``-d``; the dump's total
instruction count divided by the calls is the case's cost. The whole process is counted (event
loop, log writer thread). ``--repo`` runs the servers from another checkout (its ``gateway``
package first on the path) with this script's bodies, so two trees measure the same calls.
``--auth keys`` runs the gateway in ``keys`` mode, its calls carrying a gateway key (as
bench/overhead.py's option of that name).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp
from overhead import (
    AUTH_MODES,
    GatewayAuth,
    Scenario,
    Server,
    build_scenarios,
    free_port,
    gateway_argv,
    gateway_auth,
    gateway_env,
    http_ok,
    start,
    stop,
    tcp_open,
    wait_ready,
)

HERE: Final = Path(__file__).resolve().parent
DEFAULT_REPO: Final = HERE.parent
WARMUP_CALLS: Final = 300
CALLS: Final = 1_000
CONCURRENCY: Final = 16
READY_TIMEOUT: Final = 900.0  # python's start-up under valgrind takes minutes on a slow VM
CALL_TIMEOUT: Final = aiohttp.ClientTimeout(total=None, sock_connect=300, sock_read=300)


# -- processes ---------------------------------------------------------------------------------
def launch(
    name: str, argv: list[str], port: int, repo: Path, workdir: Path, env: dict[str, str]
) -> Server:
    """One server in its own process group, from ``repo`` with its code first on the path."""
    return start(name, argv, port, workdir, {**env, "PYTHONPATH": _python_path(repo)}, repo)


def _python_path(repo: Path) -> str:
    return os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)


def imported_gateway(repo: Path) -> Path:
    """Where ``import gateway`` resolves when run from ``repo`` as the servers are."""
    out = subprocess.run(
        [sys.executable, "-c", "import gateway; print(gateway.__file__)"],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": _python_path(repo)},
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip()).resolve()


@contextlib.contextmanager
def running(
    repo: Path,
    workdir: Path,
    relay: bool,
    auth: GatewayAuth | None = None,
    store: str = "memory://",
) -> Iterator[Server]:
    """The fake provider, then the target under callgrind; yields the target. Stops both."""
    auth = GatewayAuth() if auth is None else auth
    python = sys.executable
    servers: list[Server] = []
    try:
        fport = free_port()
        fake_argv = [python, "-m", "gateway", "fake-provider", "--port", str(fport)]
        fake = launch("fake", fake_argv, fport, repo, workdir, {})
        servers.append(fake)
        wait_ready(fake, tcp_open(fport))
        port = free_port()
        valgrind = [
            "valgrind",
            "--tool=callgrind",
            "--instr-atstart=no",
            f"--callgrind-out-file={workdir / 'cg.out'}",
        ]
        if relay:
            script = repo / "bench" / "overhead.py"
            script = script if script.exists() else HERE / "overhead.py"
            argv = [python, str(script), "--serve-relay", str(port), "--upstream", fake.url]
            target = launch("relay", [*valgrind, *argv], port, repo, workdir, {})
            servers.append(target)
            wait_ready(target, tcp_open(port), READY_TIMEOUT)
        else:
            policy = repo / "bench" / "policy.yaml"
            argv = gateway_argv(python, port, store, policy, auth.config)
            env = gateway_env(fake.url, workdir / "gateway-state", auth)
            target = launch("gateway", [*valgrind, *argv], port, repo, workdir, env)
            servers.append(target)
            wait_ready(target, http_ok(f"{target.url}/gateway/health"), READY_TIMEOUT)
        yield target
    finally:
        for server in reversed(servers):
            stop(server)


# -- measuring ---------------------------------------------------------------------------------
@dataclass(slots=True)
class Result:
    case: str
    calls: int
    instructions: int
    failures: int
    seconds: float

    @property
    def per_call(self) -> float:
        return self.instructions / self.calls


async def callgrind_control(*args: str) -> str:
    process = await asyncio.create_subprocess_exec(
        "callgrind_control",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    text = out.decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"callgrind_control {' '.join(args)} failed:\n{text}")
    return text


async def post_many(
    session: aiohttp.ClientSession, url: str, case: Scenario, calls: int, concurrency: int
) -> tuple[int, str | None]:
    """``calls`` POSTs, ``concurrency`` at a time; (failures, the first failure's description)."""
    remaining = calls
    failures = 0
    first: str | None = None
    headers = case.request_headers()

    async def worker() -> None:
        nonlocal remaining, failures, first
        while remaining > 0:
            remaining -= 1
            async with session.post(url, data=case.body, headers=headers) as response:
                data = await response.read()
                streamed = response.content_type == "text/event-stream"
                if response.status != 200 or streamed != case.stream:
                    failures += 1
                    if first is None:
                        first = f"HTTP {response.status} {response.content_type}: {data[:300]!r}"

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures, first


def newest_dump(workdir: Path) -> Path:
    dumps = [p for p in workdir.glob("cg.out.*") if p.suffix[1:].isdigit()]
    if not dumps:
        raise RuntimeError(f"no callgrind dump in {workdir}")
    return max(dumps, key=lambda p: int(p.suffix[1:]))


def total_instructions(dump: Path) -> int:
    """The dump's ``totals:`` line (its header's ``summary:`` can be 0), else ``summary:``."""
    summaries: list[int] = []
    with dump.open() as lines:
        for line in lines:
            if line.startswith("totals:"):
                return int(line.split()[1])
            if line.startswith("summary:"):
                summaries.append(int(line.split()[1]))
    if not summaries:
        raise RuntimeError(f"no totals: or summary: line in {dump}")
    return max(summaries)


async def measure(
    target: Server, workdir: Path, cases: Sequence[Scenario], warmup: int, calls: int
) -> list[Result]:
    pid = str(target.process.pid)
    results = []
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector, timeout=CALL_TIMEOUT) as session:
        for case in cases:
            url = target.url + case.path
            failures, first = await post_many(session, url, case, warmup, CONCURRENCY)
            if failures:
                raise RuntimeError(f"{case.name}: {failures} failed warm-up calls; first: {first}")
            await callgrind_control("-z", pid)
            await callgrind_control("-i", "on", pid)
            began = time.monotonic()
            failures, first = await post_many(session, url, case, calls, CONCURRENCY)
            seconds = time.monotonic() - began
            await callgrind_control("-i", "off", pid)
            await callgrind_control("-d", pid)
            instructions = total_instructions(newest_dump(workdir))
            if first is not None:
                print(f"  {case.name}: first failure: {first}", file=sys.stderr)
            results.append(Result(case.name, calls, instructions, failures, seconds))
            per_call = instructions / calls / 1e6
            print(
                f"  {case.name}: {per_call:.3f} M/call ({seconds:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    return results


# -- main ----------------------------------------------------------------------------------------
def describe(repo: Path) -> str:
    commit = _git(repo, "rev-parse", "--short", "HEAD")
    dirty = _git(repo, "status", "--porcelain", "--untracked-files=no")
    return f"{repo} at {commit or '?'}{' (modified)' if dirty else ''}"


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    return done.stdout.strip()


def report(results: Sequence[Result], target: str) -> str:
    header = ("case", f"{target} M instr/call", "calls", "failed")
    rows = [(r.case, f"{r.per_call / 1e6:.3f}", str(r.calls), str(r.failures)) for r in results]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--relay", action="store_true", help="measure the bare aiohttp relay")
    parser.add_argument(
        "--auth",
        choices=AUTH_MODES,
        default="passthrough",
        help="the gateway's auth.mode: passthrough (default) or keys (calls carry a gateway key;"
        " the gateway sends its own provider key)",
    )
    parser.add_argument(
        "--cases",
        default="",
        help="comma-separated: chat, chat-stream, agent110k, agent110k-stream, anthropic-stream"
        " (default: all)",
    )
    parser.add_argument(
        "--repo",
        type=Path,
        default=DEFAULT_REPO,
        help="checkout whose gateway runs (default: the one holding this script)",
    )
    parser.add_argument(
        "--store",
        default="memory://",
        help="the gateway's store (memory://); a redis:// URL measures the Redis store's client"
        " side, against a redis-server you run (its CPU is not counted)",
    )
    parser.add_argument("--calls", type=int, default=CALLS, help=f"measured calls ({CALLS})")
    parser.add_argument("--warmup", type=int, default=WARMUP_CALLS, help=f"({WARMUP_CALLS})")
    parser.add_argument(
        "--workdir", type=Path, help="keep logs and dumps here (default: a temporary directory)"
    )
    return parser.parse_args(argv)


def pick_cases(wanted: str) -> list[Scenario]:
    cases = build_scenarios()
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    if not names:
        return cases
    known = {c.name: c for c in cases}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown cases {unknown}; known: {', '.join(known)}")
    return [known[n] for n in names]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cases = pick_cases(args.cases)
    repo: Path = args.repo.resolve()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    package = imported_gateway(repo)
    if not package.is_relative_to(repo):
        raise SystemExit(f"`import gateway` from {repo} finds {package}, outside the checkout")
    if args.relay and args.auth != "passthrough":
        raise SystemExit("--auth is the gateway's: the bare relay (--relay) has none")
    target = "relay" if args.relay else "gateway"
    if args.auth != "passthrough":
        target = f"gateway ({args.auth})"
    print(f"{target}: {describe(repo)}  (gateway package {package.parent})")
    if not args.relay and args.store != "memory://":
        print(f"store: {args.store}")
    print(
        f"python {platform.python_version()}  nproc={os.cpu_count()}  warm-up {args.warmup},"
        f" {args.calls} calls at concurrency {CONCURRENCY} per case"
    )
    began = time.monotonic()
    with contextlib.ExitStack() as stack:
        if args.workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="callgrind-")))
        else:
            workdir = args.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
            for stale in workdir.glob("cg.out*"):  # an earlier run's dumps would read as newest
                stale.unlink()
        auth = gateway_auth(args.auth, workdir)
        cases = [auth.scenario(case) for case in cases]
        server = stack.enter_context(running(repo, workdir, args.relay, auth, args.store))
        print(f"started under callgrind in {time.monotonic() - began:.0f} s", file=sys.stderr)
        results = asyncio.run(measure(server, workdir, cases, args.warmup, args.calls))
    print()
    print(report(results, target))
    print(f"\n{time.monotonic() - began:.0f} s in all")
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
