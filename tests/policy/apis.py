"""One call, or one agent-like loop, through each API with its official SDK.

``call`` answers an ``Outcome`` whether the gateway let the call through or refused it, so a
test can run the same steps over Chat Completions, Responses and Messages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import anthropic
import httpx2
import openai

from tests.conftest import ANTHROPIC_MODEL
from tests.harness import Gateway

Api = Literal["chat", "responses", "messages"]
APIS: tuple[Api, ...] = ("chat", "responses", "messages")
OPENAI_MODEL = "gpt-4o"

READ_FILE_SCHEMA = {
    "type": "object",
    "properties": {"path": {"type": "string"}},
    "required": ["path"],
}


@dataclass
class Outcome:
    status: int
    headers: httpx2.Headers
    body: Any
    """The answer (an SDK object) on success; the full error JSON on a refusal."""

    @property
    def ok(self) -> bool:
        return self.status == 200

    @property
    def message(self) -> str:
        """The error message, in either provider's shape."""
        assert not self.ok, "the call succeeded"
        return str(self.body["error"]["message"])

    def code(self, api: Api) -> str | None:
        """The OpenAI error code; Anthropic's shape has none, the gateway's header says it."""
        if api == "messages":
            return f"gateway_policy_{self.headers['x-gateway-policy-limit']}"
        code = self.body["error"]["code"]
        return str(code) if code is not None else None


def default_model(api: Api) -> str:
    return ANTHROPIC_MODEL if api == "messages" else OPENAI_MODEL


async def call(
    gw: Gateway,
    api: Api,
    headers: dict[str, str],
    *,
    text: str = "hi",
    model: str | None = None,
    max_tokens: int = 64,
) -> Outcome:
    """One plain call (no tools); refusals are caught and returned."""
    model = model or default_model(api)
    try:
        if api == "chat":
            chat = await gw.openai.chat.completions.with_raw_response.create(
                model=model,
                messages=[{"role": "user", "content": text}],
                max_tokens=max_tokens,
                extra_headers=headers,
            )
            return Outcome(chat.status_code, chat.headers, chat.parse())
        if api == "responses":
            response = await gw.openai.responses.with_raw_response.create(
                model=model, input=text, max_output_tokens=max_tokens, extra_headers=headers
            )
            return Outcome(response.status_code, response.headers, response.parse())
        message = await gw.anthropic.messages.with_raw_response.create(
            model=model,
            max_tokens=max_tokens,
            messages=[{"role": "user", "content": text}],
            extra_headers=headers,
        )
        return Outcome(message.status_code, message.headers, await message.parse())
    except (openai.APIStatusError, anthropic.APIStatusError) as exc:
        return Outcome(exc.status_code, exc.response.headers, exc.response.json())


class AgentLoop:
    """An agent's conversation: each turn sends the whole history with the tools; a tool call
    in the answer is appended, with its result, before the next turn (as real agents do)."""

    def __init__(self, gw: Gateway, api: Api, headers: dict[str, str], task: str) -> None:
        self.gw, self.api, self.headers = gw, api, headers
        self.history: list[dict[str, Any]] = [{"role": "user", "content": task}]
        self.tool_calls_made = 0
        self.refusal: Outcome | None = None
        """The first refusal ``until_refused`` met."""
        self.tool_output: Callable[[int], str] = lambda n: "same contents"
        """The result of the n-th tool call (1-based)."""

    async def until_refused(self, turns: int = 12) -> int:
        """Turns that went through before the first refusal (kept in ``refusal``)."""
        for done in range(turns):
            outcome = await self.turn()
            if not outcome.ok:
                self.refusal = outcome
                return done
        raise AssertionError(f"no refusal in {turns} turns")

    async def turn(self, extra_headers: dict[str, str] | None = None) -> Outcome:
        headers = {**self.headers, **(extra_headers or {})}
        try:
            if self.api == "chat":
                return await self._chat(headers)
            if self.api == "responses":
                return await self._responses(headers)
            return await self._messages(headers)
        except (openai.APIStatusError, anthropic.APIStatusError) as exc:
            return Outcome(exc.status_code, exc.response.headers, exc.response.json())

    async def _chat(self, headers: dict[str, str]) -> Outcome:
        raw = await self.gw.openai.chat.completions.with_raw_response.create(
            model=OPENAI_MODEL,
            messages=self.history,  # type: ignore[arg-type]
            tools=[
                {
                    "type": "function",
                    "function": {"name": "read_file", "parameters": READ_FILE_SCHEMA},
                }
            ],
            extra_headers=headers,
        )
        completion = raw.parse()
        message = completion.choices[0].message
        self.history.append(message.model_dump(exclude_none=True))
        for tool_call in message.tool_calls or []:
            self.tool_calls_made += 1
            self.history.append(
                {
                    "role": "tool",
                    "tool_call_id": tool_call.id,
                    "content": self.tool_output(self.tool_calls_made),
                }
            )
        return Outcome(raw.status_code, raw.headers, completion)

    async def _responses(self, headers: dict[str, str]) -> Outcome:
        raw = await self.gw.openai.responses.with_raw_response.create(
            model=OPENAI_MODEL,
            input=self.history,  # type: ignore[arg-type]
            tools=[
                {
                    "type": "function",
                    "name": "read_file",
                    "parameters": READ_FILE_SCHEMA,
                    "strict": False,
                }
            ],
            extra_headers=headers,
        )
        response = raw.parse()
        for item in response.output:
            if item.type == "function_call":
                self.tool_calls_made += 1
                self.history.append(
                    {
                        "type": "function_call",
                        "call_id": item.call_id,
                        "name": item.name,
                        "arguments": item.arguments,
                    }
                )
                self.history.append(
                    {
                        "type": "function_call_output",
                        "call_id": item.call_id,
                        "output": self.tool_output(self.tool_calls_made),
                    }
                )
            elif item.type == "message":
                self.history.append(
                    {"role": "assistant", "content": "".join(c.text for c in item.content)}  # type: ignore[union-attr]
                )
        return Outcome(raw.status_code, raw.headers, response)

    async def _messages(self, headers: dict[str, str]) -> Outcome:
        raw = await self.gw.anthropic.messages.with_raw_response.create(
            model=ANTHROPIC_MODEL,
            max_tokens=256,
            messages=self.history,  # type: ignore[arg-type]
            tools=[
                {
                    "name": "read_file",
                    "description": "Read a file.",
                    "input_schema": READ_FILE_SCHEMA,
                }
            ],
            extra_headers=headers,
        )
        message = await raw.parse()
        blocks = [block.model_dump(exclude_none=True) for block in message.content]
        self.history.append({"role": "assistant", "content": blocks})
        results = []
        for block in message.content:
            if block.type == "tool_use":
                self.tool_calls_made += 1
                content = self.tool_output(self.tool_calls_made)
                results.append({"type": "tool_result", "tool_use_id": block.id, "content": content})
        if results:
            self.history.append({"role": "user", "content": results})
        return Outcome(raw.status_code, raw.headers, message)
