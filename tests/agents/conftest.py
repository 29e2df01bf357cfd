"""Helpers for driving the real agents (installed from npm into tests/agents) through the gateway.

The agents are pinned in ``tests/agents/package.json``; install them with
``(cd tests/agents && npm ci --no-audit --no-fund)``. Every run gets a fresh home directory, no
inherited credentials or proxies, and talks only to the loopback gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

AGENTS_DIR = Path(__file__).resolve().parent
BIN_DIR = AGENTS_DIR / "node_modules" / ".bin"
INSTALL_HINT = "(cd tests/agents && npm ci --no-audit --no-fund)"

RUN_TIMEOUT = 60.0
"""Hard limit for one agent run: the process group is killed after this many seconds."""


CLAUDE_POSTINSTALL = "node tests/agents/node_modules/@anthropic-ai/claude-code/install.cjs"
STUB_SIZE = 1_000_000
"""Claude Code's ``bin/claude.exe`` is a small stub until its postinstall puts the native binary
(about 240 MB) there."""


def agent_binary(name: str) -> Path:
    """The installed agent's binary; fail under CI when it is missing, else skip."""
    path = BIN_DIR / name
    if not (path.exists() and os.access(path, os.X_OK)):
        message = f"{name} is not installed at {path}; install the pinned agents: {INSTALL_HINT}"
    elif name == "claude" and path.resolve().stat().st_size < STUB_SIZE:
        message = f"{path} is the npm stub: run Claude Code's postinstall: {CLAUDE_POSTINSTALL}"
    else:
        return path
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture
def codex_bin() -> Path:
    return agent_binary("codex")


@pytest.fixture
def claude_bin() -> Path:
    return agent_binary("claude")


@dataclass(slots=True)
class AgentDirs:
    """A fresh directory tree for one agent run."""

    home: Path
    work: Path
    logs: Path

    @classmethod
    def create(cls, root: Path) -> AgentDirs:
        dirs = cls(home=root / "home", work=root / "work", logs=root / "logs")
        for path in (dirs.home, dirs.work, dirs.logs):
            path.mkdir(parents=True)
        return dirs


@pytest.fixture
def agent_dirs(tmp_path: Path) -> AgentDirs:
    return AgentDirs.create(tmp_path / "agent")


def base_env(home: Path) -> dict[str, str]:
    """A minimal environment: no inherited API keys, base URLs, proxies or user config."""
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "NO_COLOR": "1",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


@dataclass(slots=True)
class AgentRun:
    """How one agent process ended."""

    argv: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    elapsed: float
    timed_out: bool
    stopped: bool
    """The test stopped it on purpose (``stop_when`` became true)."""

    def describe(self) -> str:
        return (
            f"{self.argv[0]} exited {self.returncode} after {self.elapsed:.1f}s "
            f"(timed_out={self.timed_out}, stopped={self.stopped})\n"
            f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}"
        )


def _kill_group(pid: int) -> None:
    """Kill the process group the agent leads (it and everything it spawned)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def run_agent(
    argv: Sequence[str | Path],
    *,
    env: dict[str, str],
    cwd: Path,
    logs: Path,
    limit: float = RUN_TIMEOUT,
    stop_when: Callable[[], Awaitable[bool]] | None = None,
    poll: float = 0.1,
) -> AgentRun:
    """Run an agent in its own process group with stdin closed and output captured to files.

    The run ends when the agent exits, when ``stop_when`` (polled) is true, or after ``limit``
    seconds; the whole process group is killed then (and after a normal exit, to reap strays).
    Output goes to files, not pipes, so a stray grandchild holding an inherited descriptor cannot
    keep the test waiting.
    """
    args = [str(arg) for arg in argv]
    out_path, err_path = logs / "stdout.txt", logs / "stderr.txt"
    started = time.monotonic()
    timed_out = stopped = False
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *args,
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
        try:
            deadline = started + limit
            while proc.returncode is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    timed_out = True
                    break
                if stop_when is not None and await stop_when():
                    stopped = True
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), min(poll, remaining))
        finally:
            _kill_group(proc.pid)
            await proc.wait()
    return AgentRun(
        argv=args,
        returncode=proc.returncode,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
        elapsed=time.monotonic() - started,
        timed_out=timed_out,
        stopped=stopped,
    )
