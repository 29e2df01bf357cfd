"""Gateway overhead: the fake provider direct, via a bare aiohttp relay, and via the gateway.

    uv run python bench/overhead.py [--duration 10] [--quick] [--store sqlite] [--scenarios a,b]
                                    [--auth keys]

Starts the fake provider, the gateway and a ~20-line aiohttp relay (defined in this file) as
separate processes on free loopback ports, drives each scenario with ``wrk`` (or a slower
built-in aiohttp load generator when wrk is missing), prints one table, then measures the
gateway's CPU time per request as one session's history grows. Timing is reported, never
asserted: the exit status is 0 whatever the numbers are. ``--auth keys`` runs the gateway in
``keys`` mode with one declared gateway key, which its requests carry instead of a provider key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp
from aiohttp import web

REPO: Final = Path(__file__).resolve().parent.parent
BENCH_POLICY: Final = Path(__file__).resolve().parent / "policy.yaml"
CODEX_FIXTURE: Final = (
    REPO / "tests" / "fixtures" / "agents" / "codex-0.169.0-responses-turn268.json"
)
AGENT_BODY_BYTES: Final = 110_000
HISTORY_SIZES: Final = (10, 100, 300, 1000)
HISTORY_REQUESTS: Final = 200
HISTORY_CONCURRENCY: Final = 4
BAR_RATIO: Final = 0.5
BAR_CONCURRENCY: Final = 16
CONCURRENCIES: Final = (1, 16)
TARGETS: Final = ("direct", "relay", "gateway")
OPENAI_HEADERS: Final = {"Authorization": "Bearer x", "Content-Type": "application/json"}
ANTHROPIC_HEADERS: Final = {
    "x-api-key": "x",
    "anthropic-version": "2023-06-01",
    "Content-Type": "application/json",
}
AuthMode = Literal["passthrough", "keys"]
AUTH_MODES: Final[tuple[AuthMode, ...]] = ("passthrough", "keys")
PROVIDER_KEY_VARIABLE: Final = "BENCH_PROVIDER_KEY"
"""Where the gateway's credential pools read the provider key in ``keys`` mode (the fake
provider accepts any)."""


# -- the bare relay (runs in its own process: `overhead.py --serve-relay PORT --upstream URL`) --
_RELAY_DROP: Final = frozenset({"host", "content-length", "transfer-encoding", "connection"})
_RELAY_HTTP: Final = web.AppKey("relay_http", aiohttp.ClientSession)
_RELAY_UPSTREAM: Final = web.AppKey("relay_upstream", str)


async def _relay_handler(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _RELAY_DROP}
    url = request.app[_RELAY_UPSTREAM] + request.path_qs
    async with request.app[_RELAY_HTTP].request(
        request.method, url, data=body, headers=headers
    ) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/octet-stream")
        if upstream.content_type != "text/event-stream":
            data = await upstream.read()
            return web.Response(
                status=upstream.status, body=data, headers={"Content-Type": content_type}
            )
        response = web.StreamResponse(
            status=upstream.status, headers={"Content-Type": content_type}
        )
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def _relay_session(app: web.Application) -> AsyncIterator[None]:
    app[_RELAY_HTTP] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    yield
    await app[_RELAY_HTTP].close()


def serve_relay(port: int, upstream: str) -> None:
    with contextlib.suppress(ImportError):  # same event loop as `gateway serve`
        import uvloop

        uvloop.install()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[_RELAY_UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(_relay_session)
    app.router.add_route("*", "/{tail:.*}", _relay_handler)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# -- scenarios --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    path: str
    body: bytes
    headers: dict[str, str]
    stream: bool
    variant: str = ""
    """Set on a copy that carries another credential: its wrk script is a file of its own."""

    def request_headers(self) -> dict[str, str]:
        return {**self.headers, "X-Gateway-Session": f"bench-{self.name}"}

    @property
    def stem(self) -> str:
        """The name of its files in the run's temp directory."""
        return f"{self.name}-{self.variant}" if self.variant else self.name

    def with_credential(self, token: str, variant: str) -> Scenario:
        """The same request with ``token`` in the dialect's credential header."""
        return replace(self, headers=credential_headers(self.headers, token), variant=variant)


def credential_headers(headers: dict[str, str], token: str) -> dict[str, str]:
    """``headers`` with ``token`` where their credential is: ``Authorization: Bearer`` (OpenAI)
    or ``x-api-key`` (Anthropic)."""
    out = dict(headers)
    if "x-api-key" in out:
        out["x-api-key"] = token
    else:
        out["Authorization"] = f"Bearer {token}"
    return out


def _dumps(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def small_chat(stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a terse assistant for a benchmark."},
            {"role": "user", "content": "Say hello in five words, then stop. Nothing else."},
        ],
    }
    if stream:
        body["stream"] = True
    return body


def agent_body(stream: bool, target_bytes: int = AGENT_BODY_BYTES) -> dict[str, Any]:
    """The Codex turn-268 request, its ``input`` cut to whole call/output pairs at ~110 KB."""
    body: dict[str, Any] = json.loads(CODEX_FIXTURE.read_text())["body"]
    body["stream"] = stream
    items: list[dict[str, Any]] = body["input"]
    head = [item for item in items if item.get("type") == "message"]
    pairs = _call_pairs(items)
    body["input"] = list(head)
    for call, output in pairs:
        if len(_dumps(body)) >= target_bytes:
            break
        body["input"].extend((call, output))
    return body


def _call_pairs(items: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    outputs = {i["call_id"]: i for i in items if i.get("type") == "function_call_output"}
    return [
        (item, outputs[item["call_id"]])
        for item in items
        if item.get("type") == "function_call" and item.get("call_id") in outputs
    ]


def small_anthropic() -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 256,
        "stream": True,
        "messages": [{"role": "user", "content": "Say hello in five words, then stop."}],
    }


def build_scenarios() -> list[Scenario]:
    chat, responses, messages = "/v1/chat/completions", "/v1/responses", "/v1/messages"
    return [
        Scenario("chat", chat, _dumps(small_chat(False)), OPENAI_HEADERS, False),
        Scenario("chat-stream", chat, _dumps(small_chat(True)), OPENAI_HEADERS, True),
        Scenario("agent110k", responses, _dumps(agent_body(False)), OPENAI_HEADERS, False),
        Scenario("agent110k-stream", responses, _dumps(agent_body(True)), OPENAI_HEADERS, True),
        Scenario("anthropic-stream", messages, _dumps(small_anthropic()), ANTHROPIC_HEADERS, True),
    ]


# -- processes --------------------------------------------------------------------------------
@dataclass(slots=True)
class Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(
    name: str, argv: list[str], port: int, workdir: Path, env: dict[str, str], cwd: Path = REPO
) -> Server:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: stopped as a whole
        )
    return Server(name, port, process, log)


def stop(server: Server) -> None:
    if server.process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=5)


def wait_ready(server: Server, probe: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited early:\n{server.log_tail()}")
        with contextlib.suppress(OSError):
            if probe():
                return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} not ready after {timeout:.0f}s:\n{server.log_tail()}")


def tcp_open(port: int) -> Callable[[], bool]:
    def probe() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    return probe


def http_ok(url: str) -> Callable[[], bool]:
    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError:
            return False

    return probe


@dataclass(frozen=True, slots=True)
class GatewayAuth:
    """How the gateway is started and called. ``passthrough``: the client's provider key goes
    upstream. ``keys``: the gateway's config (``config``) declares one gateway key, requests
    carry it (``key``), and the gateway sends its own provider key from a credential pool."""

    mode: AuthMode = "passthrough"
    config: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    """What the gateway's environment needs for it (the pepper, the provider key)."""
    key: str | None = field(default=None, repr=False)

    def scenario(self, scenario: Scenario) -> Scenario:
        """``scenario`` as sent to the gateway: with the gateway key in ``keys`` mode."""
        return scenario if self.key is None else scenario.with_credential(self.key, self.mode)

    def headers(self, headers: dict[str, str]) -> dict[str, str]:
        return headers if self.key is None else credential_headers(headers, self.key)


def gateway_auth(mode: AuthMode, workdir: Path) -> GatewayAuth:
    """The gateway's auth for a run; for ``keys``, a throwaway pepper and gateway key made for
    it, declared by hash in a config file written to ``workdir``."""
    if mode == "passthrough":
        return GatewayAuth()
    from gateway.auth.keys import digest, new_key, parse

    pepper = secrets.token_urlsafe(48)
    key_id, token = new_key()
    parsed = parse(token.reveal())
    if parsed is None:  # pragma: no cover (new_key makes well-formed keys)
        raise RuntimeError("gateway.auth.keys.new_key made a key parse refuses")
    declared = {
        "id": key_id,
        "hash": digest(pepper.encode(), parsed[1]),
        "name": "bench",
        "team": "bench",
    }
    pool = {"bench": [{"name": "bench", "value": f"env:{PROVIDER_KEY_VARIABLE}"}]}
    config = {
        "auth": {"mode": "keys", "keys": [declared]},
        "upstreams": {name: {"credentials": pool} for name in ("openai", "anthropic")},
    }
    path = workdir / "gateway-config.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    env = {
        "GATEWAY_KEY_PEPPER": pepper,
        PROVIDER_KEY_VARIABLE: f"sk-bench-{secrets.token_urlsafe(16)}",
    }
    return GatewayAuth("keys", path, env, token.reveal())


@dataclass(slots=True)
class Stack:
    fake: Server
    relay: Server
    gateway: Server
    auth: GatewayAuth = field(default_factory=GatewayAuth)

    def all(self) -> tuple[Server, ...]:
        return (self.fake, self.relay, self.gateway)

    def target(self, name: str) -> Server:
        return {"direct": self.fake, "relay": self.relay, "gateway": self.gateway}[name]

    def scenario(self, target: str, scenario: Scenario) -> Scenario:
        """What ``target`` is sent: the gateway gets its own credential, the others theirs."""
        return self.auth.scenario(scenario) if target == "gateway" else scenario


def gateway_argv(
    python: str, port: int, store: str, policy: Path | None, config: Path | None = None
) -> list[str]:
    """``gateway serve`` on a loopback port."""
    serve = ["-m", "gateway", "serve", "--host", "127.0.0.1", "--port", str(port)]
    options = [
        *(["--policy", str(policy)] if policy else []),
        *(["--config", str(config)] if config else []),
    ]
    return [python, *serve, "--store", store, *options]


def gateway_env(
    fake_url: str, state_dir: Path | None = None, auth: GatewayAuth | None = None
) -> dict[str, str]:
    """The gateway aimed at the fake provider, with its telemetry on: metrics always, and one
    JSON log line per request (to the log file). What it generates on first start (the admin
    token) goes to ``state_dir``, the run's temp directory, not the working directory."""
    env = {
        "GATEWAY_OPENAI_UPSTREAM": f"{fake_url}/v1",
        "GATEWAY_ANTHROPIC_UPSTREAM": fake_url,
        "GATEWAY_LOG_LEVEL": "info",
    }
    if state_dir is not None:
        env["GATEWAY_STATE_DIR"] = str(state_dir)
    return env if auth is None else {**env, **auth.env}


@contextlib.contextmanager
def running_stack(
    store: str, policy: Path | None, workdir: Path, auth: GatewayAuth | None = None
) -> Iterator[Stack]:
    auth = GatewayAuth() if auth is None else auth
    python = sys.executable
    servers: list[Server] = []
    try:
        fport = free_port()
        fake = start(
            "fake",
            [python, "-m", "gateway", "fake-provider", "--port", str(fport)],
            fport,
            workdir,
            {},
        )
        servers.append(fake)
        wait_ready(fake, tcp_open(fport))
        rport = free_port()
        relay_argv = [python, __file__, "--serve-relay", str(rport), "--upstream", fake.url]
        relay = start("relay", relay_argv, rport, workdir, {})
        servers.append(relay)
        gport = free_port()
        argv = gateway_argv(python, gport, store, policy, auth.config)
        env = gateway_env(fake.url, workdir / "gateway-state", auth)
        gateway = start("gateway", argv, gport, workdir, env)
        servers.append(gateway)
        wait_ready(relay, tcp_open(rport))
        wait_ready(gateway, http_ok(f"{gateway.url}/gateway/health"))
        yield Stack(fake, relay, gateway, auth)
    finally:
        for server in reversed(servers):
            stop(server)


# -- measuring ---------------------------------------------------------------------------------
@dataclass(slots=True)
class Cell:
    """One scenario x concurrency x target measurement."""

    p50_ms: float | None = None
    p99_ms: float | None = None
    rps: float | None = None
    requests: int = 0
    cpu_us: float | None = None
    """CPU time of the target's own process per request (the fake provider's, for direct)."""
    errors: int = 0
    failure: str | None = None
    others_pct: float | None = None
    """Share of the machine's CPU that processes outside this benchmark used meanwhile."""


def cpu_seconds(pid: int) -> float:
    """user + sys CPU of one process (all its threads, no children), from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """Non-idle CPU time of the whole machine (all cores), from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = ticks[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def own_seconds(pids: Sequence[int]) -> float:
    """CPU of the servers, this process, and its finished children (the wrk runs)."""
    me, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    mine = me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime
    return mine + sum(cpu_seconds(pid) for pid in pids)


@contextlib.contextmanager
def foreign_load(pids: Sequence[int]) -> Iterator[list[float]]:
    """Yields a list that receives, at exit, the % of all cores used by other processes."""
    result: list[float] = []
    began, busy, own = time.monotonic(), machine_busy_seconds(), own_seconds(pids)
    yield result
    wall = time.monotonic() - began
    others = (machine_busy_seconds() - busy) - (own_seconds(pids) - own)
    result.append(max(0.0, others) / (wall * (os.cpu_count() or 1)) * 100)


def probe_once(url: str, scenario: Scenario) -> str | None:
    """One request before the load: None when it answered 200 as expected, else the problem."""
    request = urllib.request.Request(
        url + scenario.path, data=scenario.body, headers=scenario.request_headers(), method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            data = response.read()
            content_type = response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}: {exc.read()[:400].decode(errors='replace')}"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    if scenario.stream != content_type.startswith("text/event-stream"):
        return f"unexpected Content-Type {content_type!r}: {data[:200].decode(errors='replace')}"
    return None


WRK_SCRIPT: Final = """
wrk.method = "POST"
local f = assert(io.open({body_path}, "rb"))
wrk.body = f:read("*a")
f:close()
{headers}
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH p50_us=%d p99_us=%d requests=%d duration_us=%d errors=%d\\n",
    latency:percentile(50), latency:percentile(99), summary.requests, summary.duration,
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string with ASCII escapes is a valid Lua string


def write_wrk_script(scenario: Scenario, workdir: Path) -> Path:
    body_path = workdir / f"{scenario.stem}.body"
    body_path.write_bytes(scenario.body)
    headers = "\n".join(
        f"wrk.headers[{lua_string(k)}] = {lua_string(v)}"
        for k, v in scenario.request_headers().items()
    )
    script = workdir / f"{scenario.stem}.lua"
    script.write_text(WRK_SCRIPT.format(body_path=lua_string(str(body_path)), headers=headers))
    return script


def run_wrk(url: str, script: Path, concurrency: int, duration: float) -> Cell:
    threads = 1 if concurrency == 1 else 2
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{concurrency}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "30s",
        "-s",
        str(script),
        url,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    for line in done.stdout.splitlines():
        if line.startswith("BENCH "):
            values = dict(part.split("=", 1) for part in line.split()[1:])
            seconds = int(values["duration_us"]) / 1e6
            return Cell(
                p50_ms=int(values["p50_us"]) / 1000,
                p99_ms=int(values["p99_us"]) / 1000,
                rps=int(values["requests"]) / seconds if seconds else 0.0,
                requests=int(values["requests"]),
                errors=int(values["errors"]),
            )
    return Cell(failure=f"wrk gave no result: {done.stdout[-300:]} {done.stderr[-300:]}")


async def python_load(url: str, scenario: Scenario, concurrency: int, duration: float) -> Cell:
    """The fallback load generator: it shares the 2 cores with the servers, so it is slower."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration
    headers = scenario.request_headers()

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            try:
                async with session.post(url, data=scenario.body, headers=headers) as response:
                    await response.read()
                    errors += response.status != 200
            except aiohttp.ClientError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - began)

    connector = aiohttp.TCPConnector(limit=concurrency)
    began = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    elapsed = time.perf_counter() - began
    return Cell(
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        rps=len(latencies) / elapsed,
        requests=len(latencies),
        errors=errors,
    )


def percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))]


@dataclass(slots=True)
class LoadGen:
    use_wrk: bool
    workdir: Path
    scripts: dict[str, Path] = field(default_factory=dict)

    def run(self, url: str, scenario: Scenario, concurrency: int, duration: float) -> Cell:
        if not self.use_wrk:
            return asyncio.run(python_load(url + scenario.path, scenario, concurrency, duration))
        if scenario.stem not in self.scripts:
            self.scripts[scenario.stem] = write_wrk_script(scenario, self.workdir)
        return run_wrk(url + scenario.path, self.scripts[scenario.stem], concurrency, duration)


def measure(
    stack: Stack,
    target: str,
    scenario: Scenario,
    concurrency: int,
    load: LoadGen,
    duration: float,
    warmup: float,
) -> Cell:
    server = stack.target(target)
    scenario = stack.scenario(target, scenario)
    problem = probe_once(server.url, scenario)
    if problem is not None:
        return Cell(failure=problem)
    if warmup > 0:
        load.run(server.url, scenario, concurrency, warmup)
    before = cpu_seconds(server.process.pid)
    with foreign_load([s.process.pid for s in stack.all()]) as others:
        cell = load.run(server.url, scenario, concurrency, duration)
    used = cpu_seconds(server.process.pid) - before
    cell.others_pct = others[0]
    if cell.requests:
        cell.cpu_us = used / cell.requests * 1e6
    return cell


# -- the table ---------------------------------------------------------------------------------
@dataclass(slots=True)
class Row:
    scenario: str
    concurrency: int
    cells: dict[str, Cell]

    def ratio(self) -> float | None:
        relay, gateway = self.cells["relay"].rps, self.cells["gateway"].rps
        return gateway / relay if relay and gateway is not None else None

    def added_p50(self) -> float | None:
        direct, gateway = self.cells["direct"].p50_ms, self.cells["gateway"].p50_ms
        return gateway - direct if direct is not None and gateway is not None else None

    def bar(self) -> str:
        if self.concurrency != BAR_CONCURRENCY:
            return "-"
        ratio = self.ratio()
        if ratio is None:
            return "ERR"
        return "PASS" if ratio >= BAR_RATIO else "MISS"


def _num(value: float | None, digits: int = 2) -> str:
    return "ERR" if value is None else f"{value:.{digits}f}"


def row_cells(row: Row) -> list[str]:
    cells = [row.scenario, str(row.concurrency)]
    for target in TARGETS:
        cell = row.cells[target]
        cells += [_num(cell.p50_ms), _num(cell.p99_ms), _num(cell.rps, 0)]
    cells += [_num(row.ratio()), _num(row.added_p50()), row.bar()]
    cells += [_num(row.cells[t].cpu_us, 0) for t in TARGETS]
    others = [c.others_pct for c in row.cells.values() if c.others_pct is not None]
    cells.append(f"{max(others):.0f}" if others else "-")
    return cells


HEADER: Final = [
    "scenario", "conc",
    "dir p50", "dir p99", "dir rps",
    "rly p50", "rly p99", "rly rps",
    "gw p50", "gw p99", "gw rps",
    "gw/rly", "+p50 ms", "bar",
    "dir cpu", "rly cpu", "gw cpu", "other%",
]  # fmt: skip


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in (header, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def notes(rows: Sequence[Row]) -> list[str]:
    out = []
    for row in rows:
        for target, cell in row.cells.items():
            where = f"{row.scenario} c{row.concurrency} {target}"
            if cell.failure:
                out.append(f"{where}: {cell.failure}")
            elif cell.errors:
                out.append(f"{where}: {cell.errors} errors/non-2xx answers during the load")
    return out


def run_matrix(
    stack: Stack, scenarios: Sequence[Scenario], load: LoadGen, duration: float, warmup: float
) -> list[Row]:
    rows = []
    for scenario in scenarios:
        for concurrency in CONCURRENCIES:
            cells = {
                t: measure(stack, t, scenario, concurrency, load, duration, warmup) for t in TARGETS
            }
            row = Row(scenario.name, concurrency, cells)
            rows.append(row)
            print(f"  done {row.scenario} c{concurrency}", file=sys.stderr, flush=True)
    return rows


# -- history growth ------------------------------------------------------------------------
FILLER: Final = (
    "the agent reads a file then the gateway counts each turn and tokens for the session while "
    "policy limits budgets and loops and the summary keeps the window small for every model "
    "request and stream; "
)


def turn_pair(turn: int) -> list[dict[str, str]]:
    """One user + assistant pair, each message about 300 bytes of JSON."""
    text = (FILLER * 2)[:270]
    return [
        {"role": "user", "content": f"turn {turn}: {text}"},
        {"role": "assistant", "content": f"answer {turn}: {text}"},
    ]


def history_body(messages: int, turn: int) -> bytes:
    """System + prior pairs + the new user message: ``messages`` messages in all."""
    history: list[dict[str, str]] = [{"role": "system", "content": "You are a coding agent."}]
    for number in range(1, (messages - 2) // 2 + 1):
        history += turn_pair(number)
    history.append({"role": "user", "content": f"turn {turn}: {FILLER[:270]}"})
    return _dumps({"model": "gpt-4o-mini", "messages": history})


async def post_all(
    url: str, bodies: Sequence[bytes], headers: dict[str, str], concurrency: int
) -> int:
    """POST every body, ``concurrency`` at a time; the number of non-200 answers."""
    queue = list(reversed(bodies))
    failures = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal failures
        while queue:
            async with session.post(url, data=queue.pop(), headers=headers) as response:
                await response.read()
                failures += response.status != 200

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return failures


def history_growth(stack: Stack, requests: int) -> list[list[str]]:
    """Grow one session turn by turn; at each size, time the gateway's CPU over a batch."""
    gateway = stack.gateway
    url = gateway.url + "/v1/chat/completions"
    headers = {**stack.auth.headers(OPENAI_HEADERS), "X-Gateway-Session": "bench-history"}
    pids = [s.process.pid for s in stack.all()]
    rows: list[list[str]] = []
    messages = 2
    for size in HISTORY_SIZES:
        growth = [history_body(n, n // 2) for n in range(messages, size, 2)]
        asyncio.run(post_all(url, growth, headers, 1))  # the turns a real agent made to get here
        messages = size
        bodies = [history_body(size, size // 2 + i) for i in range(requests)]
        before = cpu_seconds(gateway.process.pid)
        with foreign_load(pids) as others:
            failures = asyncio.run(post_all(url, bodies, headers, HISTORY_CONCURRENCY))
        used_us = (cpu_seconds(gateway.process.pid) - before) / requests * 1e6
        size_kb = f"{len(bodies[0]) / 1024:.1f}"
        rows.append([str(size), size_kb, str(requests), f"{used_us:.0f}", str(failures)])
        rows[-1].append(f"{others[0]:.0f}")
    return rows


# -- main -------------------------------------------------------------------------------------
def machine_line(use_wrk: bool) -> str:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        import uvloop  # noqa: F401

        loop = "uvloop"
    except ImportError:
        loop = "asyncio"
    loader = "wrk" if use_wrk else "python aiohttp (shares the CPU with the servers)"
    return (
        f"machine: nproc={os.cpu_count()}  cpu={model}  python={platform.python_version()}"
        f"  loop={loop}  load={loader}"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds per cell (default 10)"
    )
    parser.add_argument("--quick", action="store_true", help="2 s per cell, no warm-up")
    parser.add_argument(
        "--store", default="memory://", help="gateway store: memory:// (default), sqlite, or a URL"
    )
    parser.add_argument(
        "--policy",
        default=str(BENCH_POLICY),
        help="gateway policy file (default bench/policy.yaml, which never refuses);"
        " 'default' for the gateway's packaged default policy",
    )
    parser.add_argument(
        "--scenarios", default="", help="comma-separated scenario names (default all)"
    )
    parser.add_argument(
        "--auth",
        choices=AUTH_MODES,
        default="passthrough",
        help="the gateway's auth.mode: passthrough (default; the provider key goes upstream) or"
        " keys (one declared gateway key sent by every request; the gateway sends its own"
        " provider key)",
    )
    parser.add_argument("--no-history", action="store_true", help="skip the history-growth part")
    parser.add_argument("--history-requests", type=int, default=HISTORY_REQUESTS)
    parser.add_argument(
        "--python-load", action="store_true", help="use the built-in generator even if wrk exists"
    )
    parser.add_argument("--serve-relay", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--upstream", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def pick_scenarios(all_scenarios: list[Scenario], wanted: str) -> list[Scenario]:
    if not wanted:
        return all_scenarios
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    known = {s.name for s in all_scenarios}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown scenarios {unknown}; known: {', '.join(sorted(known))}")
    return [s for s in all_scenarios if s.name in names]


def store_url(store: str, workdir: Path) -> str:
    return f"sqlite:///{workdir / 'bench.db'}" if store == "sqlite" else store


def use_wrk(forced_python: bool) -> bool:
    if forced_python:
        return False
    if shutil.which("wrk"):
        return True
    print("wrk not found: install it with `apt-get install -y wrk` (Debian/Ubuntu).")
    print("Falling back to the built-in Python aiohttp load generator: it runs on the same 2")
    print("cores as the servers, so it caps req/s and inflates latencies for every column.\n")
    return False


def report(rows: Sequence[Row], scenarios: Sequence[Scenario]) -> None:
    print()
    print(table(HEADER, [row_cells(r) for r in rows]))
    sizes = ", ".join(f"{s.name} {len(s.body) / 1024:.1f} KB" for s in scenarios)
    print(f"\nbodies: {sizes}")
    print(
        f"bar: gateway req/s >= {BAR_RATIO} x relay req/s at concurrency {BAR_CONCURRENCY}"
        " (reported, never enforced)"
    )
    for note in notes(rows):
        print(f"note: {note}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_relay is not None:
        serve_relay(args.serve_relay, args.upstream)
        return 0
    # Stop the servers on Ctrl-C or kill too (SIGINT is ignored in background jobs otherwise).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    duration = 2.0 if args.quick else args.duration
    warmup = 0.0 if args.quick else 1.0
    wrk = use_wrk(args.python_load)
    scenarios = pick_scenarios(build_scenarios(), args.scenarios)
    print(machine_line(wrk))
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        workdir = Path(tmp)
        store = store_url(args.store, workdir)
        policy = None if args.policy == "default" else Path(args.policy)
        auth = gateway_auth(args.auth, workdir)
        with running_stack(store, policy, workdir, auth) as stack:
            mode = "" if auth.mode == "passthrough" else f"  auth={auth.mode}"
            print(
                f"store={store}  policy={policy or 'packaged default'}{mode}"
                f"  duration={duration:g}s per cell  warmup={warmup:g}s\n"
            )
            rows = run_matrix(stack, scenarios, LoadGen(wrk, workdir), duration, warmup)
            report(rows, scenarios)
            failed = bool(notes(rows))
            if not args.no_history:
                failed |= print_history(stack, args.history_requests)
            if failed:
                print_server_errors(stack)
    return 0


def print_server_errors(stack: Stack, lines: int = 30) -> None:
    """After a failure: the end of the gateway's log (the logs are deleted at exit).

    Only after a failure: wrk closing its connections at the end of every run leaves harmless
    "Cannot write to closing transport" tracebacks in the servers' logs.
    """
    tail = stack.gateway.log_tail(lines)
    if tail:
        print(f"\ngateway log, last {lines} lines:\n{tail}")


def print_history(stack: Stack, requests: int) -> bool:
    """Print part 2; True when some answer was not a 200."""
    print(
        f"\nhistory growth: one session, OpenAI chat, non-streaming, {requests} requests per size"
        f" at concurrency {HISTORY_CONCURRENCY}; gateway CPU = user+sys of its process"
    )
    rows = history_growth(stack, requests)
    header = ["messages", "body KB", "requests", "gw cpu us/req", "non-200", "other%"]
    print(table(header, rows))
    return any(row[4] != "0" for row in rows)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
