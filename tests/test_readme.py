"""The README runs as written: every shell command in it is run here, or stands excluded with
the test that checks it instead.

The only rewriting: the README's ports (8787 for the gateway, 9999 for the fake provider) become
free ones, so that a gateway a developer has running does not collide; ``GATEWAY_PORT`` and
``GATEWAY_URL`` carry the gateway's port to commands that take the default; placeholders
(``SESSION``) become the demo's session. Each command's exit status is checked: 0, or what its
own comment in the README says (``# ... exit 1``).

A block that talks to a gateway without starting one (``gateway sessions grant SESSION``) runs
beside a gateway and fake provider this test starts, with the demo's session in it. A command
that serves in the foreground (the quickstart's ``gateway serve``) is started, must answer its
health check, and must stop on Ctrl-C (SIGINT).

Inline synopses in the prose (`` `gateway sessions grant ID --turns N [--reason R]` ``) are
checked against the real argument parser, with every optional part included.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.cli import _parser
from tests.harness import installed

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CI_RUN = REPO / ".ci" / "run"
GATEWAY_PORT, FAKE_PORT = "8787", "9999"
BLOCK_TIMEOUT = 120.0


@dataclass(frozen=True)
class Command:
    text: str
    """As bash runs it: continuation lines joined, the trailing comment removed."""
    comment: str
    line: int
    """Where it starts in the README (1-based)."""
    block: int

    @property
    def expected_exit(self) -> int:
        found = re.search(r"\bexit (\d+)\b", self.comment)
        return int(found.group(1)) if found else 0


def shell_blocks(markdown: str) -> list[list[Command]]:
    """The README's ```sh blocks, each as its commands."""
    blocks: list[list[Command]] = []
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        if lines[index].strip() in ("```sh", "```bash", "```shell"):
            start = index + 1
            index = start
            while lines[index].strip() != "```":
                index += 1
            blocks.append(_commands(lines[start:index], start + 1, len(blocks)))
        index += 1
    return blocks


def _commands(lines: list[str], first_line: int, block: int) -> list[Command]:
    commands: list[Command] = []
    pending: list[str] = []
    began = 0
    for offset, raw in enumerate(lines):
        if not pending:
            began = first_line + offset
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
        code, comment = split_comment(raw)
        if code.rstrip().endswith("\\"):
            pending.append(code.rstrip()[:-1].rstrip())
            continue
        pending.append(code.strip())
        text = " ".join(part.strip() for part in pending if part.strip())
        commands.append(Command(text, comment, began, block))
        pending = []
    assert not pending, f"README block {block}: a command ends in a continuation"
    return commands


def split_comment(line: str) -> tuple[str, str]:
    """``line`` without its trailing ``# comment`` (a ``#`` in quotes is no comment)."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index], line[index + 1 :].strip()
    return line, ""


# -- what is not run here, and what checks it instead -------------------------------------------
@dataclass(frozen=True)
class Exclusion:
    pattern: str
    stand_in: str
    """The test (``path::function``) that checks what the command would."""
    why: str


EXCLUDED = [
    Exclusion(
        r"uv run pytest\b",
        "tests/test_readme.py::test_ci_runs_the_readme_test_command",
        "the suite itself; .ci/run runs exactly this command",
    ),
    Exclusion(
        r"uv run ruff check \. && uv run ruff format --check \. && uv run mypy",
        "tests/test_readme.py::test_ci_runs_the_readme_lint_commands",
        "what .ci/run runs before the tests",
    ),
    Exclusion(
        r"bash \.ci/run\b",
        "tests/test_readme.py::test_ci_runs_the_readme_test_command",
        "installs system packages and runs the whole suite",
    ),
    Exclusion(
        r"apt-get install\b",
        "tests/test_readme.py::test_ci_installs_what_the_readme_says",
        "installs system packages (root, network)",
    ),
    Exclusion(
        r"\(cd tests/agents && npm ci\b",
        "tests/test_readme.py::test_ci_installs_what_the_readme_says",
        "downloads the agents from npm",
    ),
    Exclusion(
        r"docker compose\b",
        "tests/deploy/test_schemas.py::test_compose_file_matches_the_compose_specification",
        "no Docker engine on the machines the tests run on",
    ),
    Exclusion(
        r"docker build\b",
        "tests/deploy/test_manifests.py::"
        "test_the_image_runs_as_a_non_root_uid_that_owns_only_the_store_directory",
        "no Docker engine on the machines the tests run on",
    ),
    Exclusion(
        r"kubectl\b",
        "tests/deploy/test_schemas.py::test_every_manifest_matches_its_schema",
        "no cluster on the machines the tests run on",
    ),
]
SERVES = [r"uv run gateway serve$"]
"""Commands that serve in the foreground until Ctrl-C."""


def exclusion_for(command: Command) -> Exclusion | None:
    for exclusion in EXCLUDED:
        if re.match(exclusion.pattern, command.text):
            return exclusion
    return None


def serves(command: Command) -> bool:
    return any(re.match(pattern, command.text) for pattern in SERVES)


def all_commands() -> list[Command]:
    return [c for block in shell_blocks(README.read_text(encoding="utf-8")) for c in block]


def test_the_readme_has_the_commands_this_test_knows() -> None:
    commands = all_commands()
    assert len(commands) >= 10
    texts = [c.text for c in commands]
    assert "uv run gateway sessions list" in texts
    # Every exclusion still excludes something (none outlives the command it was for).
    for exclusion in EXCLUDED:
        assert any(re.match(exclusion.pattern, t) for t in texts), exclusion.pattern


def test_every_stand_in_exists() -> None:
    for exclusion in EXCLUDED:
        path, function = exclusion.stand_in.split("::")
        source = (REPO / path).read_text(encoding="utf-8")
        assert re.search(rf"^(async )?def {function}\(", source, re.MULTILINE), exclusion.stand_in


def test_ci_runs_the_readme_test_command() -> None:
    steps = [line.strip() for line in CI_RUN.read_text(encoding="utf-8").splitlines()]
    steps = [s for s in steps if s and not s.startswith("#")]
    readme_tests = [c.text for c in all_commands() if re.match(r"uv run pytest\b", c.text)]
    assert readme_tests and set(readme_tests) == {"uv run pytest"}
    assert steps[-1] == "uv run pytest"  # exactly the README's command, last


def test_ci_installs_what_the_readme_says() -> None:
    ci = CI_RUN.read_text(encoding="utf-8")
    for command in all_commands():
        if command.text.startswith("apt-get install "):
            for package in command.text.split()[2:]:
                assert f'MISSING="$MISSING {package}"' in ci, package
        if command.text.startswith("(cd tests/agents && npm ci"):
            assert command.text in ci


def test_ci_runs_the_readme_lint_commands() -> None:
    ci = CI_RUN.read_text(encoding="utf-8")
    for tool in ("uv run ruff check", "uv run ruff format --check", "uv run mypy"):
        assert re.search(rf"^{re.escape(tool)}\b", ci, re.MULTILINE), tool


# -- running them ------------------------------------------------------------------------------
@dataclass
class Ports:
    gateway: int
    fake: int

    def rewrite(self, text: str) -> str:
        text = text.replace(f"127.0.0.1:{GATEWAY_PORT}", f"127.0.0.1:{self.gateway}")
        text = text.replace(f"127.0.0.1:{FAKE_PORT}", f"127.0.0.1:{self.fake}")
        text = re.sub(rf"--port {FAKE_PORT}\b", f"--port {self.fake}", text)
        return re.sub(r"\bSESSION\b", "demo", text)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        return {
            **env,
            "GATEWAY_PORT": str(self.gateway),
            "GATEWAY_URL": f"http://127.0.0.1:{self.gateway}",
        }


@pytest.fixture
def ports(unused_tcp_port_factory: Callable[[], int]) -> Ports:
    return Ports(unused_tcp_port_factory(), unused_tcp_port_factory())


@pytest.fixture
def state_dir_left_as_found() -> Iterator[None]:
    """The README's gateways run in the repository without a store file: their admin token
    goes to ``./gateway-state``, where the README's CLI commands find it (as a user's do).
    Removed after the test unless it was there before (a developer's own gateway's)."""
    state = REPO / "gateway-state"
    existed = state.exists()
    yield
    if not existed:
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def uv() -> str:
    found = shutil.which("uv")
    if found is None:
        message = "uv is not on PATH (python3 -m pip install uv)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    installed("curl", "curl")
    return found


@dataclass
class Ran:
    command: Command
    status: int | None
    output: str


def run_block(commands: list[Command], ports: Ports, env: dict[str, str]) -> list[Ran]:
    """One README block as one bash script, with each command's status and output marked."""
    script = ["trap 'kill $(jobs -p) 2>/dev/null' EXIT"]  # the test's own cleanup, if one fails
    for index, command in enumerate(commands):
        script.append(f"echo '::begin {index}'")
        script.append(ports.rewrite(command.text))
        # On a line of its own: curl's answer ends without a newline.
        script.append(f"status=$?; printf '\\n::end {index} %d\\n' $status")
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
    )
    return _marked(commands, done.stdout + done.stderr)


def _marked(commands: list[Command], output: str) -> list[Ran]:
    ran: list[Ran] = []
    for index, command in enumerate(commands):
        begin = re.search(rf"^::begin {index}$", output, re.MULTILINE)
        end = re.search(rf"^::end {index} (\d+)$", output, re.MULTILINE)
        status = int(end.group(1)) if end else None
        text = output[begin.end() : end.start()] if begin and end else output
        ran.append(Ran(command, status, text))
    return ran


def runnable_blocks() -> Iterator[list[Command]]:
    for block in shell_blocks(README.read_text(encoding="utf-8")):
        runnable = [c for c in block if exclusion_for(c) is None and not serves(c)]
        if runnable:
            yield runnable


def talks_to_a_gateway(command: Command) -> bool:
    """A command that calls a running gateway's admin API (``sessions``, ``degrade``)."""
    return re.search(r"\bgateway (sessions|degrade)\b", command.text) is not None


def starts_a_gateway(block: list[Command]) -> bool:
    return any(re.search(r"\bgateway serve\b", c.text) for c in block)


def _wait_healthy(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/gateway/health", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"no health answer on port {port} within {timeout}s")


@pytest.fixture
def background_gateway(ports: Ports, uv: str, state_dir_left_as_found: None) -> Iterator[None]:
    """A fake provider and a gateway on the README's (rewritten) ports, with the demo session."""
    env = ports.env() | {
        "GATEWAY_OPENAI_UPSTREAM": f"http://127.0.0.1:{ports.fake}/v1",
        "GATEWAY_ANTHROPIC_UPSTREAM": f"http://127.0.0.1:{ports.fake}",
    }
    python = [sys.executable, "-m", "gateway"]
    fake = subprocess.Popen([*python, "fake-provider", "--port", str(ports.fake)], env=env)
    # Where the README's commands run (cwd): its CLI commands find the generated token.
    gateway = subprocess.Popen([*python, "serve", "--store", "memory://"], env=env, cwd=REPO)
    try:
        _wait_healthy(ports.gateway, gateway)
        request = urllib.request.Request(
            f"http://127.0.0.1:{ports.gateway}/v1/chat/completions",
            data=b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}',
            headers={"Authorization": "Bearer sk-any", "X-Gateway-Session": "demo"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            assert answer.status == 200
        yield
    finally:
        for process in (gateway, fake):
            process.terminate()
            process.wait(10)


@pytest.mark.usefixtures("state_dir_left_as_found")
@pytest.mark.parametrize(
    "block", list(runnable_blocks()), ids=lambda b: f"line-{b[0].line}-{b[0].text[:30]}"
)
def test_a_readme_block_runs_as_written(
    block: list[Command], ports: Ports, uv: str, request: pytest.FixtureRequest
) -> None:
    if not starts_a_gateway(block) and any(talks_to_a_gateway(c) for c in block):
        request.getfixturevalue("background_gateway")
    for ran in run_block(block, ports, ports.env()):
        where = f"README line {ran.command.line}: {ran.command.text}\n{ran.output}"
        assert ran.status == ran.command.expected_exit, where


@pytest.mark.usefixtures("state_dir_left_as_found")
def test_the_offline_demo_shows_the_session_it_made(ports: Ports, uv: str) -> None:
    demo = next(b for b in runnable_blocks() if any("fake-provider" in c.text for c in b))
    ran = {r.command.text.split(" -H")[0]: r for r in run_block(demo, ports, ports.env())}
    outputs = "\n".join(r.output for r in ran.values())
    assert '"object":"chat.completion"' in outputs.replace(" ", "")
    shown = next(r for text, r in ran.items() if text == "uv run gateway sessions show demo")
    assert "first-try" in shown.output and "gpt-4o" in shown.output


@pytest.mark.usefixtures("state_dir_left_as_found")
@pytest.mark.parametrize("command", [c for c in all_commands() if serves(c)], ids=str)
def test_a_foreground_server_starts_and_stops_on_ctrl_c(
    command: Command, ports: Ports, uv: str
) -> None:
    process = subprocess.Popen(
        ports.rewrite(command.text).split(),
        cwd=REPO,
        env=ports.env() | {"GATEWAY_STORE": "memory://"},
        start_new_session=True,
    )
    try:
        _wait_healthy(ports.gateway, process)
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C reaches the terminal's process group
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# -- synopses in the prose ---------------------------------------------------------------------
_PLACEHOLDERS = {
    "ID": "demo",
    "SESSION": "demo",
    "N": "5",
    "R": "reviewed",
    "S": "active",
    "A": "codex",
    "FILE": "policies/default.yaml",
    "URL": "memory://",
}


def synopses(markdown: str) -> list[str]:
    """Inline code spans in the prose that are a ``gateway`` command line."""
    prose = re.sub(r"```.*?```", "", markdown, flags=re.DOTALL)
    spans = re.findall(
        r"`((?:uv run )?gateway (?:serve|sessions|degrade|policy|config)[^`]*)`", prose
    )
    # A command line has options or placeholders; `gateway sessions` alone names the command.
    return sorted({s for s in spans if "--" in s or re.search(r"\b[A-Z]+\b", s)})


def expand(synopsis: str) -> list[str]:
    """The argument list a synopsis stands for: optional parts in, placeholders filled."""
    text = synopsis.removeprefix("uv run ").removeprefix("gateway ")
    text = re.sub(r"\[([^\]]*)\]", r"\1", text)
    return [_PLACEHOLDERS.get(word, word) for word in text.split()]


def test_the_prose_has_synopses() -> None:
    assert len(synopses(README.read_text(encoding="utf-8"))) >= 5


@pytest.mark.parametrize("synopsis", synopses(README.read_text(encoding="utf-8")))
def test_a_synopsis_in_the_prose_parses(synopsis: str) -> None:
    args = expand(synopsis)
    try:
        _parser().parse_args(args)
    except SystemExit as exit:  # argparse's way of refusing
        pytest.fail(f"`{synopsis}` -> {args}: refused ({exit.code})")


def test_blocks_are_read_as_bash_reads_them() -> None:
    markdown = (
        "text\n```sh\n# a comment line\nuv run gateway serve \\\n  --port 1   # serves\n"
        "echo '# not a comment' && false   # fails; exit 1\n```\n"
    )
    [block] = shell_blocks(markdown)
    assert [(c.text, c.expected_exit, c.line) for c in block] == [
        ("uv run gateway serve --port 1", 0, 4),
        ("echo '# not a comment' && false", 1, 6),
    ]


def test_a_failing_command_is_seen(ports: Ports) -> None:
    commands = [
        Command("true", "", 1, 0),
        Command("exit_code() { return 3; }; exit_code", "", 2, 0),
    ]
    assert [r.status for r in run_block(commands, ports, ports.env())] == [0, 3]
