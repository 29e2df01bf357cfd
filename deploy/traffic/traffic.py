"""Demo traffic for the compose stack (deploy/compose.yaml, profile ``demo``): agents calling
the gateway through its load balancer, so that the dashboards fill.

- ``demo-coder`` (OpenAI chat) and ``demo-reviewer`` (Anthropic messages): short sessions of
  a few tool calls and a streamed answer, then a new session;
- ``demo-looper``: the same tool call with the same arguments every turn, until the gateway's
  loop rule (``loops.identical_tool_calls``) refuses it; then a new session;
- ``demo-runaway``: one session taking turn after turn, a different call each time, until a
  limit (``limits.max_turns``) refuses it; then a new session.

Environment: ``GATEWAY_URL`` (the gateway, e.g. http://lb:8787), ``GATEWAY_API_KEY`` (a
gateway key, gw_...: ``gateway keys create``), ``TRAFFIC_SECONDS`` (how long; 0, the
default, until stopped). It is made for the fake provider (``gateway fake-provider``): it
checks that the first answers come from it, and stops otherwise, since its hundreds of calls
a minute would spend real tokens (``TRAFFIC_REAL_PROVIDERS=yes`` lets it go on anyway).

The standard library and aiohttp (the gateway image's) only: ``python traffic.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

CHAT, MESSAGES = "chat", "messages"
PATHS = {CHAT: "/v1/chat/completions", MESSAGES: "/v1/messages"}
MODELS = {CHAT: "gpt-4o-mini", MESSAGES: "claude-sonnet-4-6"}
FAKE_REPLY = "fake provider"
"""Words of the fake provider's every text answer (``FakeProviderConfig.reply_text``)."""
REFUSED_KEY = (401, 403)
KEEP_EXCHANGES = 10
"""Tool calls a long session resends with its task (older ones dropped, as an agent that
compacts its own context does): requests stay small while the turns count up."""
TOOL = {
    "name": "read_file",
    "description": "Read a file of the repository.",
    "schema": {
        "type": "object",
        "properties": {"path": {"type": "string"}},
        "required": ["path"],
    },
}


class Fatal(Exception):
    """The traffic cannot go on (a refused key, a real provider behind the gateway)."""


@dataclass(slots=True)
class Answer:
    status: int
    body: dict[str, Any] | None
    refusal: str | None = None
    """The gateway's ``X-Gateway-Error`` code, or the status, when not 200."""

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass(slots=True)
class Tally:
    """What one agent did: turns answered, sessions begun, refusals by code, failures."""

    turns: int = 0
    sessions: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]


class Gateway:
    """Calls to the gateway with a gateway key, as either API's SDK sends them."""

    def __init__(self, http: aiohttp.ClientSession, url: str, key: str) -> None:
        self.http, self.url, self.key = http, url.rstrip("/"), key

    def headers(self, api: str, session: str, agent: str) -> dict[str, str]:
        headers = {
            "User-Agent": "agent-gateway-traffic/1.0",
            "X-Gateway-Session": session,
            "X-Gateway-Agent": agent,
        }
        if api == CHAT:
            headers["Authorization"] = f"Bearer {self.key}"
        else:
            headers["x-api-key"] = self.key
            headers["anthropic-version"] = "2023-06-01"
        return headers

    async def call(
        self,
        api: str,
        session: str,
        agent: str,
        body: dict[str, Any],
        scenario: str | None = None,
    ) -> Answer:
        """One call; a streamed answer is read to its end. Connection errors raise
        ``aiohttp.ClientError`` (or ``TimeoutError``); a refused key raises ``Fatal``."""
        headers = self.headers(api, session, agent)
        if scenario:
            headers["x-fake-scenario"] = scenario  # what the fake provider answers
        async with self.http.post(self.url + PATHS[api], json=body, headers=headers) as answer:
            if answer.status != 200:
                text = await answer.text()
                code = answer.headers.get("X-Gateway-Error") or str(answer.status)
                if answer.status in REFUSED_KEY:
                    raise Fatal(f"the gateway refused the key ({answer.status}): {text[:300]}")
                return Answer(answer.status, _json(text), code)
            if body.get("stream"):
                async for _line in answer.content:
                    pass  # the events as they come: the load balancer must not hold them
                return Answer(200, None)
            return Answer(200, _json(await answer.text()))


def _json(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class Conversation:
    """One session's history in one API's shape: a task, then tool calls and their results."""

    def __init__(self, api: str, agent: str, task: str) -> None:
        self.api, self.agent = api, agent
        self.session = f"{agent}-{secrets.token_hex(4)}"
        self.task: dict[str, Any] = {"role": "user", "content": task}
        self.exchanges: list[list[dict[str, Any]]] = []

    def body(self, *, stream: bool = False) -> dict[str, Any]:
        messages = [self.task, *(m for pair in self.exchanges[-KEEP_EXCHANGES:] for m in pair)]
        body: dict[str, Any] = {"model": MODELS[self.api], "messages": messages}
        if self.api == CHAT:
            body["tools"] = [
                {
                    "type": "function",
                    "function": {
                        "name": TOOL["name"],
                        "description": TOOL["description"],
                        "parameters": TOOL["schema"],
                    },
                }
            ]
        else:
            body["max_tokens"] = 512
            body["tools"] = [
                {
                    "name": TOOL["name"],
                    "description": TOOL["description"],
                    "input_schema": TOOL["schema"],
                }
            ]
        if stream:
            body["stream"] = True
        return body

    def tool_call(self, answer: Any) -> ToolCall | None:
        """The tool call an answer (its JSON) makes, if it makes one."""
        try:
            if self.api == CHAT:
                [call] = answer["choices"][0]["message"]["tool_calls"]
                function = call["function"]
                arguments = json.loads(function["arguments"])
                return ToolCall(str(call["id"]), str(function["name"]), dict(arguments))
            [block] = [b for b in answer["content"] if b.get("type") == "tool_use"]
            return ToolCall(str(block["id"]), str(block["name"]), dict(block["input"]))
        except (KeyError, IndexError, TypeError, ValueError, AttributeError):
            return None

    def add(self, call: ToolCall, result: str) -> None:
        """The assistant's tool call and its result, as the next exchange of the history."""
        if self.api == CHAT:
            arguments = json.dumps(call.arguments)
            self.exchanges.append(
                [
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": call.id,
                                "type": "function",
                                "function": {"name": call.name, "arguments": arguments},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": call.id, "content": result},
                ]
            )
        else:
            use = {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}
            answer = {"type": "tool_result", "tool_use_id": call.id, "content": result}
            self.exchanges.append(
                [{"role": "assistant", "content": [use]}, {"role": "user", "content": [answer]}]
            )


def scenario(path: str) -> str:
    """The fake provider's answer: a call of the tool on ``path``."""
    return f"tool:{TOOL['name']}:{json.dumps({'path': path})}"


# -- the agents --------------------------------------------------------------------------------
Agent = Callable[[Gateway, Tally, float], Awaitable[None]]


async def tool_turn(gw: Gateway, talk: Conversation, tally: Tally, path: str) -> Answer:
    """One turn answered with a tool call on ``path``, added to the history with its result."""
    answer = await gw.call(talk.api, talk.session, talk.agent, talk.body(), scenario(path))
    if answer.ok:
        tally.turns += 1
        call = talk.tool_call(answer.body)
        if call is None:
            raise Fatal(f"{talk.agent}: the answer made no tool call: is the fake provider there?")
        talk.add(call, f"contents of {call.arguments.get('path', '?')}: 40 lines")
    else:
        tally.refused[answer.refusal or str(answer.status)] += 1
    return answer


def normal(api: str, agent: str) -> Agent:
    """Sessions of two to four tool calls and a streamed answer: agents at work."""

    async def run(gw: Gateway, tally: Tally, pace: float) -> None:
        while True:
            talk = Conversation(api, agent, "Find why the build fails and fix it.")
            tally.sessions += 1
            for step in range(random.randint(2, 4)):
                if not (await tool_turn(gw, talk, tally, f"src/module_{step}.py")).ok:
                    break
                await asyncio.sleep(pace * random.uniform(1, 3))
            else:
                answer = await gw.call(api, talk.session, agent, talk.body(stream=True))
                if answer.ok:
                    tally.turns += 1
                else:
                    tally.refused[answer.refusal or str(answer.status)] += 1
            await asyncio.sleep(pace * random.uniform(2, 5))

    return run


async def looper(gw: Gateway, tally: Tally, pace: float) -> None:
    """The same call on the same file every turn, until the loop rule refuses it."""
    while True:
        talk = Conversation(CHAT, "demo-looper", "Make the tests pass.")
        tally.sessions += 1
        while True:
            answer = await tool_turn(gw, talk, tally, "tests/test_app.py")
            if not answer.ok:
                break
            await asyncio.sleep(pace)
        await asyncio.sleep(pace * 10)


async def runaway(gw: Gateway, tally: Tally, pace: float) -> None:
    """Turn after turn in one session, each call different, until a limit refuses it."""
    while True:
        talk = Conversation(MESSAGES, "demo-runaway", "Read every file of the repository.")
        tally.sessions += 1
        turn = 0
        while True:
            answer = await tool_turn(gw, talk, tally, f"src/file_{turn}.py")
            if not answer.ok:
                break
            turn += 1
            await asyncio.sleep(pace / 5)
        await asyncio.sleep(pace * 10)


AGENTS: dict[str, Agent] = {
    "demo-coder": normal(CHAT, "demo-coder"),
    "demo-reviewer": normal(MESSAGES, "demo-reviewer"),
    "demo-looper": looper,
    "demo-runaway": runaway,
}


async def keep_going(name: str, agent: Agent, gw: Gateway, tally: Tally, pace: float) -> None:
    """``agent`` again after a failed connection (a replica restarting, the load balancer
    not up yet), waiting longer each time; a ``Fatal`` ends everything."""
    wait = 1.0
    while True:
        try:
            await agent(gw, tally, pace)
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = type(exc).__name__
            tally.failed[reason] += 1
            print(f"{name}: {reason}: {exc}; again in {wait:.0f} s", file=sys.stderr, flush=True)
            await asyncio.sleep(wait)
            wait = min(wait * 2, 30.0)


async def fake_provider_check(gw: Gateway) -> None:
    """The first answers of both APIs: from the fake provider, else ``Fatal``."""
    for api in (CHAT, MESSAGES):
        talk = Conversation(api, "demo-check", "Say hello.")
        answer = await gw.call(api, talk.session, talk.agent, talk.body())
        if not answer.ok:
            raise Fatal(f"the gateway answered {answer.status} ({answer.refusal}) to {api}")
        if FAKE_REPLY not in json.dumps(answer.body):
            raise Fatal(
                f"the {api} upstream is not the fake provider: this traffic would spend real "
                "tokens (set GATEWAY_OPENAI_UPSTREAM and GATEWAY_ANTHROPIC_UPSTREAM to "
                "the fake provider, or TRAFFIC_REAL_PROVIDERS=yes)"
            )


async def run(
    url: str,
    key: str,
    *,
    seconds: float = 0.0,
    pace: float = 1.0,
    real_providers: bool = False,
    report: Callable[[str], None] = print,
) -> dict[str, Tally]:
    """Every agent against the gateway at ``url`` for ``seconds`` (0: until cancelled);
    ``pace`` scales every pause. Returns what each agent did; ``Fatal`` stops it early."""
    tallies = {name: Tally() for name in AGENTS}
    timeout = aiohttp.ClientTimeout(total=120, sock_connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        gw = Gateway(http, url, key)
        if not real_providers:
            await fake_provider_check(gw)
        try:
            async with asyncio.TaskGroup() as group:
                for name, agent in AGENTS.items():
                    group.create_task(keep_going(name, agent, gw, tallies[name], pace))
                group.create_task(_report(tallies, report, max(pace * 30, 1.0)))
                if seconds:
                    group.create_task(_stop_after(seconds))
        except ExceptionGroup as group:
            # A task's exception cancels the others: _Elapsed on time, Fatal when it cannot
            # go on (raised as itself), anything else as it came.
            fatal, rest = group.split(Fatal)
            if fatal is not None:
                raise fatal.exceptions[0] from None
            if rest is not None and rest.split(_Elapsed)[1] is not None:
                raise
    return tallies


class _Elapsed(Exception):
    """``seconds`` have gone by: every agent stops."""


async def _stop_after(seconds: float) -> None:
    await asyncio.sleep(seconds)
    raise _Elapsed


async def _report(
    tallies: Mapping[str, Tally], report: Callable[[str], None], every: float
) -> None:
    while True:
        await asyncio.sleep(every)
        report(summary(tallies))


def summary(tallies: Mapping[str, Tally]) -> str:
    lines = []
    for name, tally in tallies.items():
        refused = ", ".join(f"{code} x{n}" for code, n in tally.refused.most_common()) or "none"
        failed = sum(tally.failed.values())
        lines.append(
            f"{name}: {tally.turns} turns in {tally.sessions} sessions; refused: {refused}; "
            f"connection failures: {failed}"
        )
    return "\n".join(lines)


# -- the command -------------------------------------------------------------------------------
class Usage(Exception):
    """The environment does not say what to do: exit 2 with the message."""


def settings(env: Mapping[str, str]) -> tuple[str, str, float, bool]:
    """(url, key, seconds, real providers) from the environment, or ``Usage``."""
    url = env.get("GATEWAY_URL", "").strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Usage(
            f"GATEWAY_URL must be the gateway's http(s) URL, e.g. http://lb:8787, not {url!r}"
        )
    key = env.get("GATEWAY_API_KEY", "").strip()
    if not key:
        raise Usage(
            "GATEWAY_API_KEY is not set: make a key with "
            "`gateway keys create --team demo --name traffic` and set it"
        )
    if not key.isascii() or not key.isprintable() or " " in key:
        raise Usage("GATEWAY_API_KEY holds characters no key has")
    raw = env.get("TRAFFIC_SECONDS", "0").strip() or "0"
    try:
        seconds = float(raw)
    except ValueError:
        raise Usage(f"TRAFFIC_SECONDS must be a number of seconds, not {raw!r}") from None
    if not 0 <= seconds < 1e9:
        raise Usage(f"TRAFFIC_SECONDS must be 0 (until stopped) or more, not {raw!r}")
    real = env.get("TRAFFIC_REAL_PROVIDERS", "").strip().lower() in ("yes", "true", "1")
    return url, key, seconds, real


def main(env: Mapping[str, str] | None = None) -> int:
    try:
        url, key, seconds, real = settings(os.environ if env is None else env)
    except Usage as exc:
        print(f"traffic: {exc}", file=sys.stderr)
        return 2
    print(f"traffic: {len(AGENTS)} agents against {url}", flush=True)
    try:
        tallies = asyncio.run(run(url, key, seconds=seconds, real_providers=real))
    except Fatal as exc:
        print(f"traffic: stopped: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(summary(tallies), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
