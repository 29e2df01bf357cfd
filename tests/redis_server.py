"""A real ``redis-server`` for the tests: on a free loopback port, in the test's own directory,
with a password and an append-only file (a restart keeps what was written), stopped after.

``async with redis_server(tmp_path) as redis:`` gives its URL; ``await redis.stop()`` and
``await redis.start()`` take it away and bring it back on the same port, as an outage would.
Without the binary a test is skipped locally and fails under CI (``harness.installed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness import installed


def redis_binary() -> str:
    return installed("redis-server", "redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    binary: str
    directory: Path
    port: int
    password: str = field(default_factory=lambda: "redis-" + secrets.token_hex(16))
    process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """With the password in it (``GATEWAY_REDIS_PASSWORD`` is the other way)."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def bare_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--requirepass",
            self.password,
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        await self._until_answering()

    async def _until_answering(self, within: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if loop.time() > deadline:
                    raise AssertionError(f"redis-server did not start on {self.port}") from None
                await asyncio.sleep(0.02)
                continue
            writer.write(f"AUTH {self.password}\r\nPING\r\n".encode())
            await writer.drain()
            answer = await reader.read(64)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if b"PONG" in answer:
                return
            if loop.time() > deadline:
                raise AssertionError(f"redis-server on {self.port} answered {answer!r}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()  # SIGTERM: Redis writes its append-only file and exits
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()

    async def command(self, *words: str) -> bytes:
        """One command over a fresh connection, its raw reply (for INFO and the like)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            parts = ["AUTH", self.password]
            writer.write(_encode(parts) + _encode(list(words)))
            await writer.drain()
            await reader.readline()  # +OK
            return await _read_reply(reader)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _encode(words: list[str]) -> bytes:
    out = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        out.append(f"${len(data)}\r\n".encode() + data + b"\r\n")
    return b"".join(out)


async def _read_reply(reader: asyncio.StreamReader) -> bytes:
    line = await reader.readline()
    if line.startswith(b"$"):
        size = int(line[1:])
        if size < 0:
            return b""
        data = await reader.readexactly(size + 2)
        return data[:-2]
    return line.rstrip(b"\r\n")


@contextlib.asynccontextmanager
async def redis_server(directory: Path) -> AsyncIterator[RedisServer]:
    binary = redis_binary()
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    server = RedisServer(binary, directory, await asyncio.to_thread(_free_port))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@dataclass
class SharedRedis:
    """One ``redis-server`` for a whole test run: each test takes a prefix of its own."""

    port: int
    password: str
    process: subprocess.Popen[bytes]

    def url(self) -> str:
        """A fresh prefix: the test sees an empty store."""
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0?prefix=t{secrets.token_hex(6)}"


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedRedis]:
    binary = redis_binary()
    directory = tmp_path_factory.mktemp("redis")
    port = _free_port()
    password = "redis-" + secrets.token_hex(16)
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--requirepass",
            password,
            "--save",
            "",
            "--appendonly",
            "no",
            "--loglevel",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(f"AUTH {password}\r\nPING\r\n".encode())
                if b"PONG" in conn.recv(64):
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("redis-server did not start")
        time.sleep(0.02)
    try:
        yield SharedRedis(port, password, process)
    finally:
        process.terminate()
        process.wait(10)
