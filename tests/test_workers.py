"""``gateway serve --workers N`` (``gateway.workers``): refusals said once, before anything
starts (a store the workers cannot share, a bad count, a port in use); the sockets the parent
binds; and, as an operator runs it, two workers on one Redis: both serve, each answers its own
``/metrics``, the session counts every turn, a worker killed is replaced, a stop drains every
worker and leaves none, a terminal's Ctrl-C drains once and a second signal cuts."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.cli import main
from gateway.fake_provider import CONFIG
from gateway.server import serve
from gateway.settings import Settings, load_settings
from gateway.workers import BALANCED, Backoff, ListenError, Sockets, store_problem, worker_settings
from tests.harness import ADMIN, ADMIN_TOKEN
from tests.redis_server import RedisServer, redis_server

PEPPER = "pepper-for-the-workers-test-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive free ports."""
    for _ in range(50):
        first = free_port()
        if first + count > 65535:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return first
    raise AssertionError(f"no {count} consecutive free ports")


# -- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("store", ["memory://", "sqlite:///gateway.db"])
def test_a_store_of_one_process_is_refused_for_several_workers(
    store: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATEWAY_STORE", raising=False)
    assert main(["serve", "--workers", "2", "--store", store]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gateway: --workers 2 needs a store the workers share:")
    assert "redis://host:6379/0" in err and "memory:// and sqlite are one process's" in err


@pytest.mark.parametrize(
    "store", ["redis://127.0.0.1:6379/0", "rediss://cache:6380/1", "unix:///run/redis.sock"]
)
def test_a_redis_store_is_shared(store: str) -> None:
    assert store_problem(Settings(store=store, workers=4)) is None
    assert store_problem(Settings(store="memory://")) is None  # one worker: any store


@pytest.mark.parametrize("count", ["0", "-1", "two"])
def test_a_worker_count_below_one_is_refused(
    count: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--workers", count])
    assert exited.value.code == 2
    assert "argument --workers" in capsys.readouterr().err


def test_a_worker_count_from_the_environment_is_checked_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GATEWAY_WORKERS", "0")
    assert main(["serve", "--store", "memory://"]) == 2
    err = capsys.readouterr().err
    assert "the configuration is refused" in err and "workers" in err
    assert load_settings(env={"GATEWAY_WORKERS": "3"}).workers == 3


def test_a_port_in_use_is_said_once_before_anything_starts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GATEWAY_STATE_DIR", str(tmp_path / "state"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for workers in ("1", "2"):
            store = "memory://" if workers == "1" else "redis://127.0.0.1:1/0"
            argv = ["serve", "--workers", workers, "--store", store, "--port", port]
            assert main(argv) == 1
            err = capsys.readouterr().err
            assert err == f"gateway: not starting: cannot listen on 127.0.0.1:{port}:" \
                " Address already in use\n"  # fmt: skip


def test_several_workers_in_keys_mode_need_a_configured_pepper(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Said once by the parent; each worker generating a pepper of its own would refuse the
    keys the others made."""
    monkeypatch.delenv("GATEWAY_KEY_PEPPER", raising=False)
    monkeypatch.setenv("GATEWAY_STATE_DIR", str(tmp_path / "state"))
    config = tmp_path / "gateway.yaml"
    config.write_text(
        "auth: {mode: keys}\n"
        "upstreams:\n  openai:\n    credentials:\n"
        "      default: [{name: main, value: 'env:OPENAI_KEY_FOR_TEST'}]\n"
    )
    argv = ["serve", "--workers", "2", "--store", "redis://127.0.0.1:1/0", "--config"]
    assert main([*argv, str(config), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "gateway: not starting: gateway keys need one pepper for 2 worker processes" in err


# -- settings ------------------------------------------------------------------------------------
def test_each_worker_has_a_metrics_port() -> None:
    assert Settings().worker_metrics_ports == range(0)  # one worker: none
    assert Settings(workers=3).worker_metrics_ports == range(8887, 8890)
    assert Settings(workers=2, worker_metrics_port=9100).worker_metrics_ports == range(9100, 9102)
    assert Settings(workers=2, port=0).worker_metrics_ports == range(0)  # the system's choice


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"worker_metrics_port": 8786}, "include port (8787)"),
        ({"admin_host": "127.0.0.1", "worker_metrics_port": 8787 - 1}, "include port"),
        ({"admin_host": "127.0.0.1", "worker_metrics_port": 8788}, "include admin_port (8788)"),
        ({"port": 65500}, "go past 65535"),
    ],
)
def test_metrics_ports_that_overlap_are_refused(fields: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        Settings(workers=2, **fields)
    Settings(workers=1, **fields)  # one worker has no metrics listener of its own


def test_each_worker_keeps_an_audit_chain_of_its_own(tmp_path: Path) -> None:
    settings = Settings(workers=2, audit_log=tmp_path / "audit.jsonl")
    assert worker_settings(settings, 1).audit_log == tmp_path / "audit.worker1.jsonl"
    assert worker_settings(settings, 1).store == settings.store
    single = Settings(audit_log=tmp_path / "audit.jsonl")
    assert worker_settings(single, 0) is single


def test_a_worker_that_keeps_failing_waits_longer() -> None:
    backoff = Backoff(first=0.5, most=30.0)
    assert [backoff.delay(n) for n in range(8)] == [0, 0.5, 1, 2, 4, 8, 16, 30]


# -- sockets -------------------------------------------------------------------------------------
def test_every_worker_gets_a_socket_on_the_one_port() -> None:
    settings = Settings(workers=3, port=0, store="redis://127.0.0.1:1/0")
    sockets = Sockets(settings)
    bound = sockets.bind_all()
    try:
        ports = {listeners.main[0].getsockname()[1] for listeners in bound}
        assert len(ports) == 1  # port 0: the one the system chose, for every worker
        metrics = [listeners.metrics[0].getsockname()[1] for listeners in bound]
        assert len(set(metrics)) == 3 and ports.isdisjoint(metrics)
        distinct = {id(listeners.main[0]) for listeners in bound}
        assert len(distinct) == (3 if BALANCED else 1)
    finally:
        for listeners in bound:
            for sock in (*listeners.main, *listeners.metrics):
                sock.close()
        sockets.close()


@pytest.mark.skipif(not BALANCED, reason="SO_REUSEPORT balancing is Linux's")
def test_a_port_another_reuse_port_group_holds_is_refused() -> None:
    """Without the plain probe, a second gateway would join the first's group and share its
    connections without a word."""
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        sockets = Sockets(Settings(workers=2, port=port, store="redis://127.0.0.1:1/0"))
        with pytest.raises(ListenError, match="Address already in use"):
            sockets.bind_all()


def test_a_metrics_port_in_use_leaves_no_socket_open() -> None:
    first = free_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first + 1))  # worker 1's metrics port
        taken.listen()
        port = free_port()
        settings = Settings(
            workers=2, port=port, worker_metrics_port=first, store="redis://127.0.0.1:1/0"
        )
        with pytest.raises(ListenError, match=f"127.0.0.1:{first + 1} \\(worker 1's metrics\\)"):
            Sockets(settings).bind_all()
    with socket.socket() as again:  # nothing of the attempt holds the main port
        again.bind(("127.0.0.1", port))


# -- a worker's metrics listener, in process ----------------------------------------------------
@pytest.fixture
async def signals(monkeypatch: pytest.MonkeyPatch) -> dict[int, Callable[[], None]]:
    """The handlers ``serve`` installs, to call by hand: no real signal reaches the tests."""
    handlers: dict[int, Callable[[], None]] = {}
    loop = asyncio.get_running_loop()

    def add(sig: int, callback: Callable[..., None], *args: Any) -> None:
        handlers[sig] = lambda: callback(*args)

    monkeypatch.setattr(loop, "add_signal_handler", add)
    monkeypatch.setattr(loop, "remove_signal_handler", lambda sig: handlers.pop(sig, 0) != 0)
    return handlers


async def test_with_an_admin_listener_a_worker_still_serves_its_metrics(
    signals: dict[int, Callable[[], None]], settings: Settings
) -> None:
    first = free_ports(2)
    configured = Settings.model_validate(
        {
            **settings.model_dump(),
            "port": free_port(),
            "admin_host": "127.0.0.1",
            "admin_port": free_port(),
            "workers": 2,
            "worker_metrics_port": first,
        }
    )
    app = create_app(configured)
    listeners = Sockets(configured).bind(0)
    task = asyncio.get_running_loop().create_task(serve(app, "", 0, listeners))
    try:
        await until_answering(f"http://127.0.0.1:{first}/gateway/health", task)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{configured.port}/metrics") as main_port:
                assert main_port.status == 404  # the main listener serves no admin route
            async with http.get(f"http://127.0.0.1:{first}/metrics", headers=ADMIN) as own:
                assert own.status == 200, await own.text()
    finally:
        signals[signal.SIGTERM]()
        await task


async def until_answering(url: str, task: asyncio.Task[None]) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            assert not task.done(), task
            with contextlib.suppress(aiohttp.ClientConnectionError):
                async with http.get(url) as answer:
                    if answer.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise AssertionError(f"{url} did not answer")


# -- two workers on one Redis, as an operator runs them -----------------------------------------
@dataclass
class Workers:
    """``gateway serve --workers 2`` as a process; its stderr in a file."""

    process: asyncio.subprocess.Process
    port: int
    metrics: list[int]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lines(self) -> list[dict[str, Any]]:
        text = self.log.read_bytes()
        return [orjson.loads(line) for line in text.splitlines() if line.startswith(b"{")]

    async def pids(self) -> dict[int, int]:
        """The workers' pids now, by index (the parent's last ``started`` line for each)."""
        pids: dict[int, int] = {}
        for line in await asyncio.to_thread(self.lines):
            if line["logger"] == "gateway.workers" and "started (pid" in line["message"]:
                pids[line["worker"]] = line["pid"]
        return pids

    async def stop(self, *signals: signal.Signals, pause: float = 1.0) -> float:
        """Send ``signals`` (``pause`` apart); the seconds until the parent exited 0."""
        loop = asyncio.get_running_loop()
        sent = loop.time()
        for index, sig in enumerate(signals):
            if index:
                await asyncio.sleep(pause)
            self.process.send_signal(sig)
        await asyncio.wait_for(self.process.wait(), 60)
        lines = await asyncio.to_thread(self.log.read_text)
        assert self.process.returncode == 0, lines[-3000:]
        return loop.time() - sent


@pytest.fixture
async def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    async with redis_server(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def start_workers(
    redis: RedisServer, fake_provider: TestServer, tmp_path: Path
) -> AsyncIterator[Any]:
    started: list[Workers] = []

    async def start(*args: str, group: bool = False, **env: str) -> Workers:
        port, first = free_port(), free_ports(2)
        log = tmp_path / f"workers-{len(started)}.log"
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "gateway", "serve", "--workers", "2"),
                *("--store", redis.url, "--port", str(port), *args),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=group,  # its own process group: a Ctrl-C for it alone
                env={
                    **os.environ,
                    "GATEWAY_STATE_DIR": str(tmp_path / "state"),
                    "GATEWAY_WORKER_METRICS_PORT": str(first),
                    "GATEWAY_KEY_PEPPER": PEPPER,
                    "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
                    "GATEWAY_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
                    "GATEWAY_OPENAI_UPSTREAM": str(fake_provider.make_url("/v1")),
                    "GATEWAY_ANTHROPIC_UPSTREAM": str(fake_provider.make_url("")).rstrip("/"),
                    **env,
                },
            )
        workers = Workers(process, port, [first, first + 1], log)
        started.append(workers)
        await until_ready(workers)
        return workers

    yield start
    for workers in started:
        if workers.process.returncode is None:
            workers.process.kill()
            await workers.process.wait()
        for pid in (await workers.pids()).values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def until_ready(workers: Workers, within: float = 30.0) -> None:
    """Until every worker's metrics listener answers ready."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    async with aiohttp.ClientSession() as http:
        for port in workers.metrics:
            while True:
                assert workers.process.returncode is None, "gateway serve exited at start"
                assert loop.time() < deadline, "the workers did not start"
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with http.get(f"http://127.0.0.1:{port}/gateway/ready") as ready:
                        if ready.status == 200:
                            break
                await asyncio.sleep(0.1)


async def served(http: aiohttp.ClientSession, metrics_port: int) -> float:
    """The LLM calls one worker has answered, from its own ``/metrics``."""
    async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as answer:
        assert answer.status == 200
        text = await answer.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("gateway_requests_total{") and 'route="openai.chat"' in line
    )


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


SESSION = "two-workers"


async def test_two_workers_share_the_port_the_store_and_a_clean_stop(
    start_workers: Any, tmp_path: Path
) -> None:
    workers: Workers = await start_workers()
    client = openai.AsyncOpenAI(
        base_url=f"{workers.url}/s/{SESSION}/v1", api_key="sk-workers", max_retries=0
    )
    messages: Any = [{"role": "user", "content": "hi"}]

    async def call() -> None:
        await client.chat.completions.create(model="gpt-4o", messages=messages)

    # The SDK's few keep-alive connections: the kernel spreads them over both workers.
    await asyncio.gather(*(call() for _ in range(40)))
    await client.close()
    async with aiohttp.ClientSession() as http:
        counts = [await served(http, port) for port in workers.metrics]
        assert sum(counts) == 40 and all(count > 0 for count in counts), counts
        async with http.get(f"{workers.url}/gateway/sessions/{SESSION}", headers=ADMIN) as got:
            assert got.status == 200
            assert (await got.json())["turns"] == 40  # one session, whichever worker served
        # A worker's metrics listener serves nothing else: not the admin API, not the LLM.
        metrics = f"http://127.0.0.1:{workers.metrics[0]}"
        async with http.get(f"{metrics}/gateway/sessions", headers=ADMIN) as refused:
            assert refused.status == 404
        async with http.post(f"{metrics}/v1/chat/completions", json={}) as refused:
            assert refused.status == 404
        async with http.post(f"{metrics}/metrics") as refused:
            assert refused.status == 405

    pids = await workers.pids()
    assert sorted(pids) == [0, 1]
    took = await workers.stop(signal.SIGTERM)
    assert took < 10.0
    assert all(gone(pid) for pid in pids.values())
    lines = await asyncio.to_thread(workers.lines)
    ended = [line for line in lines if line["message"].startswith("shut down in ")]
    assert sorted(line["worker"] for line in ended) == [0, 1]
    assert lines[-1]["message"] == "all workers stopped"
    for index in (0, 1):  # a chain each, never two processes on one
        audit = tmp_path / f"audit.worker{index}.jsonl"
        assert await asyncio.to_thread(main, ["audit", "verify", str(audit)]) == 0


async def test_a_worker_that_dies_is_replaced(start_workers: Any) -> None:
    workers: Workers = await start_workers()
    before = await workers.pids()
    os.kill(before[0], signal.SIGKILL)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while (await workers.pids())[0] == before[0]:
        assert loop.time() < deadline, "worker 0 was not started again"
        await asyncio.sleep(0.1)
    await until_ready(workers)
    lines = await asyncio.to_thread(workers.lines)
    [died] = [line for line in lines if "ended unexpectedly" in line["message"]]
    assert died["worker"] == 0 and "killed by SIGKILL" in died["message"]
    # Both serve again: every connection lands on a worker that answers.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for _ in range(20):
            async with http.get(f"{workers.url}/gateway/health") as health:
                assert health.status == 200
    after = await workers.pids()
    await workers.stop(signal.SIGTERM)
    assert gone(before[0]) and all(gone(pid) for pid in after.values())


async def test_a_worker_that_cannot_start_stops_the_gateway(
    redis: RedisServer, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("defaults: {max_turns: many}\n")
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gateway", "serve", "--workers", "2", "--store", redis.url),
        *("--port", str(free_port()), "--policy", str(policy)),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={
            **os.environ,
            "GATEWAY_STATE_DIR": str(tmp_path / "state"),
            "GATEWAY_WORKER_METRICS_PORT": str(free_ports(2)),
        },
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)
    text = stderr.decode()
    assert process.returncode == 1, text  # the policy's refusal, as one process exits
    assert "policy refused, not starting" in text
    assert "failed to start (exit status 1): stopping the gateway" in text
    assert "Traceback" not in text


async def test_a_ctrl_c_drains_once_and_a_second_signal_cuts(
    start_workers: Any, fake_provider: TestServer
) -> None:
    """A terminal's Ctrl-C reaches the whole process group: each worker must see it once
    (from the parent), or the first Ctrl-C would already cut the calls in flight."""
    fake_provider.app[CONFIG].chunk_delay = 0.1  # a stream of about 1.5 s
    workers: Workers = await start_workers(group=True)
    body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    url, headers = f"{workers.url}/v1/chat/completions", {"Authorization": "Bearer sk-ctrl-c"}
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200
        await resp.content.readline()  # in flight
        os.killpg(workers.process.pid, signal.SIGINT)
        workers.process.send_signal(signal.SIGINT)  # a wrapper (uv run) passing it on too
        rest = await resp.content.read()
    assert rest.rstrip().endswith(b"data: [DONE]")  # drained whole, not cut
    await asyncio.wait_for(workers.process.wait(), 30)
    assert workers.process.returncode == 0

    fake_provider.app[CONFIG].chunk_delay = 1.0  # a stream of about 15 s
    workers = await start_workers()
    url = f"{workers.url}/v1/chat/completions"
    async with aiohttp.ClientSession() as http, http.post(url, json=body, headers=headers) as resp:
        await resp.content.readline()
        stopping = asyncio.ensure_future(workers.stop(signal.SIGTERM, signal.SIGINT))
        with pytest.raises(aiohttp.ClientPayloadError):  # cut: never a stream that looks whole
            await resp.content.read()
    took = await stopping
    assert took < 5.0, f"the drain (30 s) went on after the second signal: {took:.2f}s"
    lines = await asyncio.to_thread(workers.lines)
    assert any(line["message"] == "SIGINT again: cutting the drain short" for line in lines)
