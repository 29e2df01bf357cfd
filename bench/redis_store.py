"""The Redis store's cost: latency against memory:// and SQLite, req/s of one and two workers
on one Redis beside the bare relay, and Redis commands per request.

    uv run python bench/redis_store.py [--duration 10] [--quick] [--requests 500]
                                       [--scenarios chat,chat-stream]

Starts its own ``redis-server`` (a free loopback port, a random password, no persistence), the
fake provider, bench/overhead.py's bare relay and four gateways (``memory://``, SQLite, Redis,
and Redis with ``--workers 2``), each its own process group on a free loopback port, all
stopped at the end. Then:

1. latency at concurrency 1 of each single-process gateway by store (wrk, as overhead.py);
2. req/s at concurrency 16 of the relay, the gateway on memory:// and on Redis, and two workers
   on Redis, each as a ratio to the relay;
3. Redis's own counts around ``--requests`` calls at concurrency 1 through the single-process
   Redis gateway, per call: round trips (``INFO stats``: ``total_reads_processed``) and
   commands (``INFO commandstats``, which counts those a Lua script runs too; ``MONITOR``
   tells them from those the gateway sent).

After each cell the script waits until Redis has heard nothing for half a second (what a
gateway queued after its answers is written in the background): the CPU per call includes
those writes, and the ``drain s`` column says how long they went on after the load.

Named ``redis_store`` rather than ``redis``: ``bench`` is on mypy's path (and on ``sys.path``
when run), where a ``redis.py`` would hide the redis-py package. Timing is reported, never
asserted: the exit status is 0 whatever the numbers are.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import redis
from overhead import (
    BENCH_POLICY,
    Cell,
    LoadGen,
    Scenario,
    Server,
    build_scenarios,
    cpu_seconds,
    foreign_load,
    free_port,
    gateway_argv,
    gateway_env,
    http_ok,
    machine_line,
    pick_scenarios,
    post_all,
    probe_once,
    start,
    stop,
    table,
    tcp_open,
    use_wrk,
    wait_ready,
)

DEFAULT_SCENARIOS: Final = "chat,chat-stream"
LATENCY_CONCURRENCY: Final = 1
THROUGHPUT_CONCURRENCY: Final = 16
COMMAND_REQUESTS: Final = 500
QUIET_SECONDS: Final = 0.5
"""Redis is quiet once no gateway sent it anything for this long."""
DRAIN_WITHIN: Final = 120.0
"""The longest wait for that."""
BENCH_COMMANDS: Final = frozenset({"info", "config|resetstat"})
"""This script's own commands to Redis, left out of the counts."""


# -- processes ---------------------------------------------------------------------------------
@dataclass(slots=True)
class Target:
    """A server under load: its processes' CPU is read as a whole (a workers' parent and its
    children)."""

    label: str
    server: Server
    extra_ready: tuple[str, ...] = ()
    """More health URLs to wait for (each worker's own metrics port)."""

    def pids(self) -> list[int]:
        return process_tree(self.server.process.pid)

    def cpu(self) -> float:
        return sum(_cpu_or_zero(pid) for pid in self.pids())


def _cpu_or_zero(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:  # gone between the listing and the read
        return 0.0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from ``/proc/<pid>/task/*/children``."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return out


def free_port_pair() -> int:
    """A free port whose next port is free too (two workers' metrics listeners)."""
    for _ in range(100):
        port = free_port()
        if port < 65535 and _port_free(port + 1):
            return port
    raise RuntimeError("no two free consecutive loopback ports")


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass(slots=True)
class RedisProcess:
    server: Server
    password: str

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.server.port, password=self.password)

    def store_url(self, prefix: str) -> str:
        """The gateway's ``--store``; the password goes in ``GATEWAY_REDIS_PASSWORD``."""
        return f"redis://127.0.0.1:{self.server.port}/0?prefix={prefix}"


def start_redis(workdir: Path) -> RedisProcess:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: install it (`apt-get install -y redis-server`)")
    port, password = free_port(), secrets.token_urlsafe(24)
    config = workdir / "redis.conf"  # the password in a file, not on a command line
    config.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {workdir}\nrequirepass {password}\n"
        'save ""\nappendonly no\ndaemonize no\nloglevel warning\n'
    )
    server = start("redis", [binary, str(config)], port, workdir, {})
    wait_ready(server, tcp_open(port))
    return RedisProcess(server, password)


@dataclass(slots=True)
class Stack:
    fake: Server
    redis: RedisProcess
    relay: Target
    memory: Target
    sqlite: Target
    on_redis: Target
    workers: Target

    def servers(self) -> list[Target]:
        return [self.relay, self.memory, self.sqlite, self.on_redis, self.workers]

    def all_pids(self) -> list[int]:
        pids = [self.fake.process.pid, self.redis.server.process.pid]
        return pids + [pid for target in self.servers() for pid in target.pids()]


def start_gateway(
    label: str,
    store: str,
    fake: Server,
    workdir: Path,
    env: dict[str, str],
    workers: int = 1,
) -> Target:
    port, name = free_port(), label.replace(" ", "-")
    argv = gateway_argv(sys.executable, port, store, BENCH_POLICY)
    extra: tuple[str, ...] = ()
    env = {**gateway_env(fake.url, workdir / f"state-{name}"), **env}
    if workers > 1:
        argv += ["--workers", str(workers)]
        metrics = free_port_pair()
        env["GATEWAY_WORKER_METRICS_PORT"] = str(metrics)
        extra = tuple(f"http://127.0.0.1:{metrics + i}/gateway/health" for i in range(workers))
    return Target(label, start(name, argv, port, workdir, env), extra)


@contextlib.contextmanager
def running_stack(workdir: Path) -> Iterator[Stack]:
    started: list[Server] = []
    try:
        redis_process = start_redis(workdir)
        started.append(redis_process.server)
        fport = free_port()
        fake_argv = [sys.executable, "-m", "gateway", "fake-provider", "--port", str(fport)]
        fake = start("fake", fake_argv, fport, workdir, {})
        started.append(fake)
        wait_ready(fake, tcp_open(fport))
        rport = free_port()
        overhead = str(Path(__file__).with_name("overhead.py"))
        relay_argv = [sys.executable, overhead, "--serve-relay", str(rport), "--upstream", fake.url]
        relay = Target("relay", start("relay", relay_argv, rport, workdir, {}))
        started.append(relay.server)
        on_redis = {"GATEWAY_REDIS_PASSWORD": redis_process.password}
        gateways = [
            start_gateway("gw memory", "memory://", fake, workdir, {}),
            start_gateway("gw sqlite", f"sqlite:///{workdir / 'bench.db'}", fake, workdir, {}),
            start_gateway("gw redis", redis_process.store_url("one"), fake, workdir, on_redis),
            start_gateway(
                "gw redis x2", redis_process.store_url("two"), fake, workdir, on_redis, workers=2
            ),
        ]
        started += [g.server for g in gateways]
        wait_ready(relay.server, tcp_open(rport))
        for gateway in gateways:
            wait_ready(gateway.server, http_ok(f"{gateway.server.url}/gateway/health"))
            for url in gateway.extra_ready:
                wait_ready(gateway.server, http_ok(url))
        yield Stack(fake, redis_process, relay, *gateways)
    finally:
        for server in reversed(started):
            stop(server)


# -- measuring ---------------------------------------------------------------------------------
@dataclass(slots=True)
class Measured:
    target: Target
    cell: Cell
    drain_s: float = 0.0
    """Seconds Redis kept receiving the gateway's writes after the last answer."""
    redis_cpu_us: float | None = None


@dataclass(slots=True)
class Bench:
    """A run's servers, its Redis connection and how long each cell lasts."""

    stack: Stack
    client: redis.Redis
    load: LoadGen
    duration: float
    warmup: float
    done: list[tuple[str, Measured]] = field(default_factory=list)

    def cells(
        self, targets: Sequence[Target], scenario: Scenario, concurrency: int
    ) -> list[Measured]:
        out = [self.measure(t, scenario, concurrency) for t in targets]
        self.done += [(f"{scenario.name} c{concurrency}", m) for m in out]
        print(f"  done {scenario.name} c{concurrency}", file=sys.stderr, flush=True)
        return out

    def measure(self, target: Target, scenario: Scenario, concurrency: int) -> Measured:
        problem = probe_once(target.server.url, scenario)
        if problem is not None:
            return Measured(target, Cell(failure=problem))
        url = target.server.url
        if self.warmup > 0:
            self.load.run(url, scenario, concurrency, self.warmup)
        redis_pid = self.stack.redis.server.process.pid
        before, redis_before = target.cpu(), cpu_seconds(redis_pid)
        with foreign_load(self.stack.all_pids()) as others:
            cell = self.load.run(url, scenario, concurrency, self.duration)
        # What the calls queued for Redis is theirs too: the CPU is read once it is written,
        # and the next cell starts on a quiet Redis.
        drain = quiet(self.client, DRAIN_WITHIN)
        used, redis_used = target.cpu() - before, cpu_seconds(redis_pid) - redis_before
        cell.others_pct = others[0]
        measured = Measured(target, cell, drain_s=drain)
        if cell.requests:
            cell.cpu_us = used / cell.requests * 1e6
            measured.redis_cpu_us = redis_used / cell.requests * 1e6
        return measured


def _num(value: float | None, digits: int = 2) -> str:
    return "ERR" if value is None else f"{value:.{digits}f}"


def _diff(value: float | None, base: float | None) -> str:
    return "ERR" if value is None or base is None else f"{value - base:+.2f}"


def _ratio(value: float | None, base: float | None) -> str:
    return "ERR" if not value or not base else f"{value / base:.2f}"


def _others(cell: Cell) -> str:
    return "-" if cell.others_pct is None else f"{cell.others_pct:.0f}"


def latency_rows(name: str, results: Sequence[Measured]) -> list[list[str]]:
    """Part 1: each store, and its p50/p99 over memory://'s."""
    base = results[0].cell
    return [
        [
            name,
            m.target.label.removeprefix("gw "),
            _num(m.cell.p50_ms),
            _num(m.cell.p99_ms),
            _diff(m.cell.p50_ms, base.p50_ms),
            _diff(m.cell.p99_ms, base.p99_ms),
            _num(m.cell.rps, 0),
            _num(m.cell.cpu_us, 0),
            _num(m.redis_cpu_us, 0),
            _others(m.cell),
        ]
        for m in results
    ]


LATENCY_HEADER: Final = [
    "scenario", "store", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms", "req/s",
    "gw cpu", "redis cpu", "other%",
]  # fmt: skip


def throughput_rows(name: str, results: Sequence[Measured]) -> list[list[str]]:
    """Part 2: each target, and its req/s over the relay's."""
    base = results[0].cell.rps
    return [
        [
            name,
            m.target.label,
            _num(m.cell.p50_ms),
            _num(m.cell.p99_ms),
            _num(m.cell.rps, 0),
            _ratio(m.cell.rps, base),
            _num(m.cell.cpu_us, 0),
            _num(m.redis_cpu_us, 0),
            f"{m.drain_s:.1f}",
            _others(m.cell),
        ]
        for m in results
    ]


THROUGHPUT_HEADER: Final = [
    "scenario", "target", "p50 ms", "p99 ms", "req/s", "/relay", "cpu", "redis cpu", "drain s",
    "other%",
]  # fmt: skip


def notes(results: Sequence[tuple[str, Measured]]) -> list[str]:
    out = []
    for name, m in results:
        where = f"{name} {m.target.label}"
        if m.cell.failure:
            out.append(f"{where}: {m.cell.failure}")
        elif m.cell.errors:
            out.append(f"{where}: {m.cell.errors} errors/non-2xx answers during the load")
    return out


# -- Redis commands per call -------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Counts:
    """What Redis served since the last ``CONFIG RESETSTAT``, this script's own part left out."""

    calls: dict[str, int]
    """``INFO commandstats``: calls by command, the commands a Lua script runs included."""
    reads: int
    """``total_reads_processed``: read events, one per round trip (a pipeline is one)."""


def counts(client: redis.Redis) -> Counts:
    info = client.info("all")
    calls = {
        key.removeprefix("cmdstat_"): int(value["calls"])
        for key, value in info.items()
        if key.startswith("cmdstat_") and isinstance(value, dict)
    }
    # Each INFO of this script was one read; this one's is counted, its call not yet.
    reads = int(info["total_reads_processed"]) - calls.get("info", 0) - 1
    mine = {name: count for name, count in calls.items() if name not in BENCH_COMMANDS}
    return Counts(mine, reads)


def quiet(client: redis.Redis, within: float) -> float:
    """Wait until no gateway has sent Redis anything for ``QUIET_SECONDS`` (what a gateway
    queued after its answers is written by a background task); the seconds from the call to
    the last command seen."""
    began = time.monotonic()
    last, changed = counts(client).calls, began
    while time.monotonic() - changed < QUIET_SECONDS and time.monotonic() - began < within:
        time.sleep(0.05)
        now = counts(client).calls
        if now != last:
            last, changed = now, time.monotonic()
    return changed - began


class Monitor:
    """Redis's ``MONITOR`` stream, read by a thread: by name, the commands clients sent
    (``sent``) and those Lua scripts ran (``scripted``), which ``INFO commandstats`` adds up
    together."""

    LINE: Final = re.compile(rb'^\+[\d.]+ \[\d+ ([^\]]+)\] "([^"]*)"')

    def __init__(self, port: int, password: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.password = password
        self.sent: Counter[str] = Counter()
        self.scripted: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> Monitor:
        auth = f"*2\r\n$4\r\nAUTH\r\n${len(self.password)}\r\n{self.password}\r\n"
        self.sock.sendall(auth.encode() + b"*1\r\n$7\r\nMONITOR\r\n")
        answer = b""
        while answer.count(b"\r\n") < 2:
            answer += self.sock.recv(64)
        if answer != b"+OK\r\n+OK\r\n":
            raise RuntimeError(f"redis MONITOR refused: {answer[:100]!r}")
        self.sock.settimeout(0.2)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        time.sleep(0.3)  # the last lines on their way
        self._stop.set()
        self._thread.join()
        self.sock.close()

    def _read(self) -> None:
        pending = b""
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            *lines, pending = (pending + data).split(b"\r\n")
            for line in lines:
                self._count(line)

    def _count(self, line: bytes) -> None:
        match = self.LINE.match(line)
        if match is None:
            return
        name = match[2].decode().lower()
        if name in BENCH_COMMANDS:
            return
        (self.scripted if match[1] == b"lua" else self.sent)[name] += 1


@dataclass(frozen=True, slots=True)
class PerCall:
    """Part 3 for one scenario: per request, from ``requests`` calls."""

    requests: int
    failures: int
    counted: Counts
    sent: Counter[str]
    scripted: Counter[str]

    def per(self, count: float) -> str:
        return f"{count / self.requests:.2f}"


def commands_per_call(bench: Bench, scenario: Scenario, requests: int) -> PerCall:
    """``requests`` calls one at a time through the single-process Redis gateway, counted by
    ``INFO`` and ``MONITOR``."""
    stack, client = bench.stack, bench.client
    url = stack.on_redis.server.url + scenario.path
    headers = scenario.request_headers()
    asyncio.run(post_all(url, [scenario.body] * 5, headers, 1))  # its session exists, pool open
    quiet(client, DRAIN_WITHIN)
    with Monitor(stack.redis.server.port, stack.redis.password) as monitor:
        client.config_resetstat()
        failures = asyncio.run(post_all(url, [scenario.body] * requests, headers, 1))
        quiet(client, DRAIN_WITHIN)
        counted = counts(client)
    return PerCall(requests, failures, counted, monitor.sent, monitor.scripted)


COMMAND_HEADER: Final = [
    "scenario", "requests", "non-200", "round trips", "sent", "evalsha", "hgetall",
    "other sent", "by scripts", "commandstats",
]  # fmt: skip


def command_rows(results: dict[str, PerCall]) -> list[list[str]]:
    rows = []
    for name, r in results.items():
        other = sum(r.sent.values()) - r.sent["evalsha"] - r.sent["hgetall"]
        rows.append(
            [
                name,
                str(r.requests),
                str(r.failures),
                r.per(r.counted.reads),
                r.per(sum(r.sent.values())),
                r.per(r.sent["evalsha"]),
                r.per(r.sent["hgetall"]),
                r.per(other),
                r.per(sum(r.scripted.values())),
                r.per(sum(r.counted.calls.values())),
            ]
        )
    return rows


def breakdown(name: str, r: PerCall) -> list[str]:
    def listed(counter: dict[str, int]) -> str:
        ordered = sorted(counter.items(), key=lambda item: (-item[1], item[0]))
        return ", ".join(f"{command} {r.per(count)}" for command, count in ordered) or "none"

    return [
        f"{name}: sent {listed(r.sent)}",
        f"{name}: by scripts {listed(r.scripted)}",
        f"{name}: commandstats {listed(r.counted.calls)}",
    ]


# -- main --------------------------------------------------------------------------------------
def redis_version() -> str:
    done = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    return done.stdout.strip()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per cell")
    parser.add_argument("--quick", action="store_true", help="2 s per cell, no warm-up")
    parser.add_argument(
        "--scenarios",
        default=DEFAULT_SCENARIOS,
        help=f"comma-separated overhead.py scenarios (default {DEFAULT_SCENARIOS})",
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=COMMAND_REQUESTS,
        help=f"calls per scenario counted by Redis's commandstats (default {COMMAND_REQUESTS})",
    )
    parser.add_argument(
        "--python-load", action="store_true", help="use the built-in generator even if wrk exists"
    )
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.requests <= 0:
        parser.error("--duration and --requests must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    duration = 2.0 if args.quick else args.duration
    warmup = 0.0 if args.quick else 1.0
    wrk = use_wrk(args.python_load)
    scenarios = pick_scenarios(build_scenarios(), args.scenarios)
    print(machine_line(wrk))
    print(f"redis: {redis_version()}")
    with tempfile.TemporaryDirectory(prefix="gateway-bench-redis-") as tmp:
        workdir = Path(tmp)
        with running_stack(workdir) as stack, stack.redis.client() as client:
            print(
                f"policy={BENCH_POLICY.name}  duration={duration:g}s per cell"
                f"  warmup={warmup:g}s  redis: no persistence, loopback\n",
                flush=True,
            )
            bench = Bench(stack, client, LoadGen(wrk, workdir), duration, warmup)
            if run(bench, scenarios, args.requests):
                for target in stack.servers()[1:]:
                    print(f"\n{target.label} log, last 20 lines:\n{target.server.log_tail()}")
    return 0


def run(bench: Bench, scenarios: Sequence[Scenario], requests: int) -> bool:
    """Measure and print the three parts; True when some call failed."""
    stack = bench.stack
    single = [stack.memory, stack.sqlite, stack.on_redis]
    latency = [
        row
        for s in scenarios
        for row in latency_rows(s.name, bench.cells(single, s, LATENCY_CONCURRENCY))
    ]
    wide = [stack.relay, stack.memory, stack.on_redis, stack.workers]
    throughput = [
        row
        for s in scenarios
        for row in throughput_rows(s.name, bench.cells(wide, s, THROUGHPUT_CONCURRENCY))
    ]
    per_scenario = {s.name: commands_per_call(bench, s, requests) for s in scenarios}
    print(f"\n1. latency at concurrency {LATENCY_CONCURRENCY}, one gateway process per store")
    print(table(LATENCY_HEADER, latency))
    print(
        "+p50/+p99: over memory://'s; cpu: µs of CPU per request (the gateway's process;"
        " redis-server's)"
    )
    print(f"\n2. requests per second at concurrency {THROUGHPUT_CONCURRENCY}")
    print(table(THROUGHPUT_HEADER, throughput))
    print(
        "/relay: req/s ÷ the bare relay's; cpu: µs per request of the target's processes;"
        " drain s: Redis still receiving writes after the load"
    )
    print(
        f"\n3. Redis per request, {requests} calls one at a time through gw redis"
        " (INFO stats and commandstats; MONITOR tells sent from run by scripts)"
    )
    print(table(COMMAND_HEADER, command_rows(per_scenario)))
    print(
        "round trips: total_reads_processed; sent: commands from clients (a pipeline's each);"
        " commandstats: sent + by scripts"
    )
    for name, result in per_scenario.items():
        print("\n".join(breakdown(name, result)))
    failures = notes(bench.done) + [
        f"{name}: {r.failures} non-200 answers counting commands"
        for name, r in per_scenario.items()
        if r.failures
    ]
    for note in failures:
        print(f"note: {note}")
    return bool(failures)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
