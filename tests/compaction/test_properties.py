"""Compaction strategies on random agent histories of the three APIs.

Whatever a strategy does, what comes out is still a request the provider accepts (the fake's
strict validators), the items it keeps are byte for byte as sent, the system prompt, the task
and the latest exchanges stay, and the saved rewrite replays to the same bytes on the session's
next, longer requests.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.compaction.compactor import matching
from gateway.compaction.conversation import ELIDE_MIN_BYTES, Conversation, Rewrite
from gateway.compaction.job import Job, Summary
from gateway.compaction.strategies import STRATEGIES
from gateway.compaction.strategies.summarize import MIN_TOKENS as SUMMARY_MIN_TOKENS
from gateway.dialects.anthropic_messages import AnthropicMessages
from gateway.dialects.base import Dialect, History, Layout
from gateway.dialects.envelope import replace_array
from gateway.dialects.openai_chat import OpenAIChat
from gateway.dialects.openai_responses import OpenAIResponses
from gateway.fake_provider.validation import validate_chat, validate_messages, validate_responses
from gateway.policy.model import Context
from gateway.tokens import TokenCounter

MODEL = "gpt-4o"
# Exact counts: these tests check compaction's arithmetic, and on a loaded machine the
# per-loop-turn budget (tests/test_tokens.py tests it) would turn some counts into estimates.
COUNTER = TokenCounter(budget=math.inf)
COUNTER.count_text("load the table once", MODEL)

PROFILE = settings(
    max_examples=60,
    deadline=None,
    report_multiple_bugs=False,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)

SUMMARY_TEXT = "short summary text"
NOTE_PREFIXES = ("[The gateway ", "[Summary of the earlier part of this conversation")
ELIDED_PREFIX = "[Tool output removed by the gateway"
SECRETS = ("private thought", "sig-", "enc-")
"""Thinking text, signatures and encrypted reasoning: never sent to the summary call."""

WORDS = ("alpha", "beta", "gamma", "delta", "zeta", "theta", "kappa", "sigma", "omega", "parser")
FILLER = " ".join(f"{WORDS[i % len(WORDS)]}{i % 97}" for i in range(1200))
IMAGE_DATA = "iVBORw0KGgoAAAANSUhEUgAA" + "A" * 1400
TOOLS = ("read_file", "shell", "grep", "apply_patch")
SHORT = st.integers(0, 160)
OUTPUT = st.sampled_from([0, 30, 200, 1200, 2020, 2040, 2500, 4000, 6000])
"""Tool output sizes: small ones, some either side of ``ELIDE_MIN_BYTES``, large ones."""
BITS = st.integers(0, 2**12 - 1)


def count(raw: Any) -> int:
    return COUNTER.count_item(raw, MODEL)


def text(tag: str, size: int) -> str:
    """About ``size`` characters of words, starting with ``tag`` (which makes items unique)."""
    return f"{tag} {FILLER[:size]}"


def size_of(value: Any) -> int:
    return len(value.encode()) if isinstance(value, str) else len(orjson.dumps(value))


class Ids:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def tool(self) -> str:
        return TOOLS[self.n % len(TOOLS)]


Draw = Callable[[st.SearchStrategy[Any]], Any]


class Flags:
    """An item's yes-or-no choices, from one draw (draws are most of what generating costs)."""

    def __init__(self, draw: Draw) -> None:
        self.bits: int = draw(BITS)

    def __call__(self) -> bool:
        bit, self.bits = self.bits & 1, self.bits >> 1
        return bool(bit)


def sprinkle(item: dict[str, Any], add: bool) -> dict[str, Any]:
    """A field no API knows: it must survive whatever compaction does."""
    if add:
        item["x_extra"] = {"kept": [1, "two"]}
    return item


def shuffled(draw: Draw, items: list[Any]) -> list[Any]:
    return list(draw(st.permutations(items))) if len(items) > 1 else items


@dataclass(slots=True)
class Sample:
    lead: list[Any]
    """System and developer items, then the first user message."""
    exchanges: list[list[Any]]
    extra: list[list[Any]]
    """Two more exchanges: the session's next requests."""

    @property
    def items(self) -> list[Any]:
        return self.lead + [item for exchange in self.exchanges for item in exchange]


def samples(lead: Callable[..., list[Any]], exchange: Callable[..., list[Any]]) -> Any:
    @st.composite
    def build(draw: Draw) -> Sample:
        ids = Ids()
        first = lead(draw, ids)
        exchanges = [exchange(draw, ids) for _ in range(draw(st.integers(1, 10)))]
        return Sample(first, exchanges, [exchange(draw, ids) for _ in range(2)])

    return build()


LEADS = ([], [], [], ["system"], ["developer"], ["system", "developer"], ["developer", "system"])


def system_roles(draw: Draw) -> list[str]:
    """Often none, else one or two leading system or developer messages."""
    return LEADS[draw(st.integers(0, len(LEADS) - 1))]


# --- Chat Completions --------------------------------------------------------------------------

CHAT_IMAGE = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMAGE_DATA}"}}


def chat_user(draw: Draw, ids: Ids) -> dict[str, Any]:
    flag = Flags(draw)
    content: Any = text(ids("user "), draw(SHORT))
    if flag():
        content = [{"type": "text", "text": content}]
        if flag():
            content.append(CHAT_IMAGE)
    return sprinkle({"role": "user", "content": content}, flag())


def chat_lead(draw: Draw, ids: Ids) -> list[Any]:
    flag = Flags(draw)
    system = [
        sprinkle({"role": role, "content": text(ids("system "), 40)}, flag())
        for role in system_roles(draw)
    ]
    return [*system, chat_user(draw, ids)]


def chat_exchange(draw: Draw, ids: Ids) -> list[Any]:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return [chat_user(draw, ids)]
    flag = Flags(draw)
    if kind == 1:
        reply = {"role": "assistant", "content": text(ids("reply "), draw(SHORT))}
        return [sprinkle(reply, flag())]
    calls = [
        {
            "id": ids("call_"),
            "type": "function",
            "function": {
                "name": ids.tool(),
                "arguments": orjson.dumps({"path": ids("src/file")}).decode(),
            },
        }
        for _ in range(draw(st.integers(1, 3)))
    ]
    content = text(ids("calling "), draw(SHORT)) if flag() else None
    assistant = sprinkle({"role": "assistant", "content": content, "tool_calls": calls}, flag())
    answers = []
    for call in calls:
        output: Any = text(ids("output "), draw(OUTPUT))
        if flag():
            output = [{"type": "text", "text": output}]
        answer = {"role": "tool", "tool_call_id": call["id"], "content": output}
        answers.append(sprinkle(answer, flag()))
    return [assistant, *shuffled(draw, answers)]


# --- Responses ---------------------------------------------------------------------------------


def responses_message(role: str, kind: str, body: str) -> dict[str, Any]:
    return {"type": "message", "role": role, "content": [{"type": kind, "text": body}]}


def responses_user(draw: Draw, ids: Ids) -> dict[str, Any]:
    flag = Flags(draw)
    item = responses_message("user", "input_text", text(ids("user "), draw(SHORT)))
    if flag():
        item["content"].append(
            {"type": "input_image", "image_url": f"data:image/png;base64,{IMAGE_DATA}"}
        )
    return sprinkle(item, flag())


def responses_lead(draw: Draw, ids: Ids) -> list[Any]:
    flag = Flags(draw)
    system = [
        sprinkle(responses_message(role, "input_text", text(ids("system "), 40)), flag())
        for role in system_roles(draw)
    ]
    return [*system, responses_user(draw, ids)]


def reasoning(ids: Ids, extra: bool) -> dict[str, Any]:
    number = ids("")
    item = {
        "type": "reasoning",
        "id": f"rs_{number}",
        "summary": [],
        "encrypted_content": f"enc-{number}-" + "Z" * 60,
    }
    return sprinkle(item, extra)


def responses_exchange(draw: Draw, ids: Ids) -> list[Any]:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return [responses_user(draw, ids)]
    flag = Flags(draw)
    items = [reasoning(ids, flag())] if flag() else []
    if kind == 1:
        message = responses_message("assistant", "output_text", text(ids("reply "), draw(SHORT)))
        message.update(id=ids("msg_"), status="completed")
        return [*items, sprinkle(message, flag())]
    calls, outputs = [], []
    for _ in range(draw(st.integers(1, 3))):
        call_id = ids("call_")
        arguments = orjson.dumps({"cmd": ids("ls dir")}).decode()
        call = {"type": "function_call", "id": ids("fc_"), "call_id": call_id}
        call.update(name=ids.tool(), arguments=arguments, status="completed")
        calls.append(sprinkle(call, flag()))
        output: Any = text(ids("output "), draw(OUTPUT))
        if flag():
            output = [{"type": "input_text", "text": output}]
            if flag():
                output.append({"type": "input_image", "image_url": IMAGE_DATA})
        answer = {"type": "function_call_output", "call_id": call_id, "output": output}
        outputs.append(sprinkle(answer, flag()))
    if flag():  # parallel calls: fc1, fc2, out1, out2
        return [*items, *calls, *shuffled(draw, outputs)]
    # one after the other: fc1, out1, (reasoning), fc2, out2
    for number, (call, output) in enumerate(zip(calls, outputs, strict=True)):
        if number and flag():
            items.append(reasoning(ids, False))
        items += [call, output]
    return items


# --- Anthropic Messages ------------------------------------------------------------------------

ANTHROPIC_IMAGE = {
    "type": "image",
    "source": {"type": "base64", "media_type": "image/png", "data": IMAGE_DATA},
}


def anthropic_user(draw: Draw, ids: Ids) -> dict[str, Any]:
    flag = Flags(draw)
    content: Any = text(ids("user "), draw(SHORT))
    if flag():
        content = [{"type": "text", "text": content}]
        if flag():
            content.insert(0, ANTHROPIC_IMAGE)
    return sprinkle({"role": "user", "content": content}, flag())


def anthropic_lead(draw: Draw, ids: Ids) -> list[Any]:
    return [anthropic_user(draw, ids)]


def anthropic_exchange(draw: Draw, ids: Ids) -> list[Any]:
    """An assistant turn and the user message after it (its tool results, or a reply)."""
    flag = Flags(draw)
    blocks: list[Any] = []
    if flag():
        number = ids("")
        blocks.append(
            {
                "type": "thinking",
                "thinking": f"private thought {number}",
                "signature": f"sig-{number}-" + "S" * 60,
            }
        )
    if flag():
        blocks.append({"type": "text", "text": text(ids("reply "), draw(SHORT))})
        assistant = sprinkle({"role": "assistant", "content": blocks}, flag())
        return [assistant, anthropic_user(draw, ids)]
    if flag():
        blocks.append({"type": "text", "text": text(ids("calling "), draw(SHORT))})
    uses = [
        {"type": "tool_use", "id": ids("toolu_"), "name": ids.tool(), "input": {"n": ids("")}}
        for _ in range(draw(st.integers(1, 3)))
    ]
    results = []
    for use in uses:
        content: Any = text(ids("output "), draw(OUTPUT))
        if flag():
            content = [{"type": "text", "text": content}, ANTHROPIC_IMAGE]
        result = {"type": "tool_result", "tool_use_id": use["id"], "content": content}
        if flag():
            result["is_error"] = True
        results.append(sprinkle(result, flag()))
    user_blocks = shuffled(draw, results)
    if flag():
        user_blocks.append({"type": "text", "text": text(ids("also "), draw(SHORT))})
    return [
        sprinkle({"role": "assistant", "content": blocks + uses}, flag()),
        sprinkle({"role": "user", "content": user_blocks}, flag()),
    ]


# --- The three APIs ----------------------------------------------------------------------------


def _chat_valid(items: list[Any]) -> None:
    validate_chat({"model": MODEL, "messages": items})


def _responses_valid(items: list[Any]) -> None:
    validate_responses({"model": MODEL, "input": items})


def _messages_valid(items: list[Any]) -> None:
    body = {"model": "claude-sonnet-4-6", "max_tokens": 1024, "messages": items}
    validate_messages(body, {"anthropic-version": "2023-06-01"})


def _string_note(value: Any) -> str | None:
    content = value.get("content") if isinstance(value, dict) else None
    return content if isinstance(content, str) else None


def _block_note(value: Any) -> str | None:
    content = value.get("content") if isinstance(value, dict) else None
    if isinstance(content, list) and len(content) == 1 and isinstance(content[0], dict):
        found = content[0].get("text")
        return found if isinstance(found, str) else None
    return None


def check_output_elided(original: dict[str, Any], elided: dict[str, Any], field: str) -> None:
    """Only ``field`` changed, to the note, and it was big enough to elide."""
    assert list(elided) == list(original), "fields lost or reordered by eliding"
    for key, value in original.items():
        if key != field:
            assert elided[key] == value, f"{key} changed by eliding"
    note = elided[field]
    assert isinstance(note, str) and note.startswith(ELIDED_PREFIX), note
    size = size_of(original[field])
    assert size >= ELIDE_MIN_BYTES
    assert f"{size:,} bytes" in note


def _chat_elided(original: Any, elided: Any) -> None:
    assert original["role"] == "tool"
    check_output_elided(original, elided, "content")


def _responses_elided(original: Any, elided: Any) -> None:
    assert original["type"] == "function_call_output"
    check_output_elided(original, elided, "output")


def _messages_elided(original: Any, elided: Any) -> None:
    assert original["role"] == "user"
    assert list(elided) == list(original)
    assert {k: v for k, v in elided.items() if k != "content"} == {
        k: v for k, v in original.items() if k != "content"
    }
    assert len(elided["content"]) == len(original["content"])
    changed = False
    for before, after in zip(original["content"], elided["content"], strict=True):
        big = (
            before["type"] == "tool_result"
            and size_of(before.get("content", "")) >= ELIDE_MIN_BYTES
        )
        if big:  # a big result goes whole (images with it), others stay whole
            check_output_elided(before, after, "content")
            changed = True
        else:
            assert after == before
    assert changed


def _chat_elidable(value: Any) -> bool:
    return value.get("role") == "tool" and size_of(value["content"]) >= ELIDE_MIN_BYTES


def _responses_elidable(value: Any) -> bool:
    kind = value.get("type")
    return kind == "function_call_output" and size_of(value["output"]) >= ELIDE_MIN_BYTES


def _messages_elidable(value: Any) -> bool:
    return value.get("role") == "user" and any(
        isinstance(block, dict)
        and block.get("type") == "tool_result"
        and size_of(block.get("content", "")) >= ELIDE_MIN_BYTES
        for block in (value["content"] if isinstance(value["content"], list) else [])
    )


@dataclass(frozen=True, repr=False)
class Api:
    name: str
    dialect: Dialect
    validate: Callable[[list[Any]], None]
    samples: st.SearchStrategy[Sample]
    note_text: Callable[[Any], str | None]
    check_elided: Callable[[Any, Any], None]
    elidable: Callable[[Any], bool]
    signed_assistant: bool = False
    """Assistant messages carry signed thinking: never re-serialized."""

    @property
    def history(self) -> History:
        return self.dialect.history

    def __repr__(self) -> str:
        return self.name

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.name)


CHAT = Api(
    "chat",
    OpenAIChat(),
    _chat_valid,
    samples(chat_lead, chat_exchange),
    _string_note,
    _chat_elided,
    _chat_elidable,
)
RESPONSES = Api(
    "responses",
    OpenAIResponses(),
    _responses_valid,
    samples(responses_lead, responses_exchange),
    _block_note,
    _responses_elided,
    _responses_elidable,
)
ANTHROPIC = Api(
    "anthropic",
    AnthropicMessages(),
    _messages_valid,
    samples(anthropic_lead, anthropic_exchange),
    _block_note,
    _messages_elided,
    _messages_elidable,
    signed_assistant=True,
)
APIS = [CHAT, RESPONSES, ANTHROPIC]
NAMES_OF_STRATEGIES = sorted(STRATEGIES)


# --- Running a strategy ------------------------------------------------------------------------


@dataclass(slots=True)
class Run:
    conversation: Conversation
    job: Job
    transcripts: list[str]
    before: int

    @property
    def items(self) -> list[bytes]:
        return [bytes(raw) for raw in self.conversation.items()]


def compact(
    api: Api,
    originals: Sequence[bytes],
    name: str,
    keep_last: int,
    fraction: float,
    rewrite: Rewrite | None = None,
    goal: int | None = None,
) -> Run:
    """Runs strategy ``name`` towards ``fraction`` of the tokens (or an exact ``goal``)."""
    conversation = Conversation.of(api.history, originals, count, 0, rewrite)
    transcripts: list[str] = []

    async def summarize(transcript: str) -> Summary:
        transcripts.append(transcript)
        return Summary(SUMMARY_TEXT, "m")

    before = conversation.total
    job = Job(
        settings=Context(keep_last=keep_last),
        goal=int(before * fraction) if goal is None else goal,
        summarize=summarize,
    )
    asyncio.run(STRATEGIES[name](conversation, job))
    return Run(conversation, job, transcripts, before)


def encode(items: Sequence[Any]) -> list[bytes]:
    return [orjson.dumps(item) for item in items]


def request(api: Api, items: list[bytes]) -> tuple[bytes, list[Any]]:
    """A request body holding ``items``, and its items as the gateway reads them: raw slices
    of the body, through the dialect's own decoder."""
    field = api.history.field.encode()
    conversation = b"[" + b",".join(items) + b"]"
    body = b'{"model":"%s","%s":%s,"max_tokens":1024,"x_top":{"kept":true}}' % (
        MODEL.encode(),
        field,
        conversation,
    )
    envelope = api.dialect.decode(body)
    raws = list(envelope.get(api.history.field).raw())
    assert [bytes(raw) for raw in raws] == items
    return body, raws


def note_count(text: str) -> int:
    found = re.search(r"(\d+) (?:oldest |earlier )?messages?\b", text)
    assert found is not None, text
    return int(found.group(1))


def check_result(api: Api, originals: Sequence[bytes], run: Run) -> None:
    """What holds after any strategy, on any conversation (rewritten before or not): a valid
    request; each item an original byte for byte, an original with its tool output elided, or
    a gateway note; originals in order; notes counting what they stand for."""
    conversation = run.conversation
    originals = [bytes(raw) for raw in originals]
    items = run.items
    values = [orjson.loads(raw) for raw in items]
    api.validate(values)
    assert conversation.total == sum(count(raw) for raw in items)
    assert len(conversation.entries) == len(items)
    index_of = {bytes(raw): index for index, raw in enumerate(originals)}
    sources: list[int | None] = []
    notes = 0
    for entry, raw, value in zip(conversation.entries, items, values, strict=True):
        index = index_of.get(raw)
        if index is not None:
            sources.append(index)
            continue
        note = api.note_text(value)
        if note is not None and note.startswith(NOTE_PREFIXES):
            assert value == api.history.note(note)
            notes += note_count(note)
            sources.append(None)
            continue
        assert isinstance(entry.op, list) and entry.op[0] == "elide", value
        index = entry.op[1]
        api.check_elided(orjson.loads(originals[index]), value)
        sources.append(index)
    present = [index for index in sources if index is not None]
    assert present == sorted(set(present)), "originals reordered or duplicated"
    assert notes == len(originals) - len(present), "notes do not count what they stand for"
    if api.signed_assistant:
        for source, raw, value in zip(sources, items, values, strict=True):
            if value.get("role") == "assistant":
                assert source is not None and raw == bytes(originals[source])
    system = api.history.layout([orjson.loads(raw) for raw in originals]).system
    assert items[:system] == [bytes(raw) for raw in originals[:system]]
    assert all(source is not None for source in sources[:system])
    for transcript in run.transcripts:
        for secret in SECRETS:
            assert secret not in transcript, f"{secret!r} sent to the summary call"


def first_change(items: list[bytes], sent: list[bytes]) -> int:
    pairs = enumerate(zip(items, sent, strict=False))
    return next((i for i, (raw, original) in pairs if raw != original), min(len(items), len(sent)))


def unit_items(originals: Sequence[bytes], unit: tuple[int, int]) -> list[bytes]:
    return [bytes(raw) for raw in originals[unit[0] : unit[1]]]


NOTE_BUDGET = 100
"""More tokens than any gateway note costs: old exchanges worth more than this are replaced.
(A strategy may leave cheaper ones alone: its note would cost more than it saves.)"""


def check_first_run(
    api: Api, originals: list[bytes], layout: Layout, run: Run, name: str, keep_last: int
) -> None:
    """The exact shape each strategy gives a history as the agent sent it."""
    items, sent = run.items, [bytes(raw) for raw in originals]
    units, system = layout.units, layout.system
    old = units[: max(0, len(units) - keep_last)]
    tail = sent[units[-keep_last][0] :] if len(units) >= keep_last else sent[system:]
    # Summarize and truncate pin the task: the first user message, and maybe the user messages
    # right after it (an agent may send its context files and the task apart).
    opening = 0
    while opening < len(old) and layout.inputs[opening]:
        opening += 1
    droppable = old[opening:]
    starts = [start for start, _ in old[min(1, opening) : opening + 1]]
    """Where the first rewritten item may be, by how many opening messages are pinned."""
    conversation = run.conversation

    def left_alone(dropped: list[tuple[int, int]], budget: int = NOTE_BUDGET) -> None:
        """Nothing changed: allowed only when there was little to gain."""
        worth = sum(count(raw) for start, end in dropped for raw in sent[start:end])
        assert worth <= budget, f"{worth} tokens of old exchanges left as they were"

    if name in ("elide_tool_output", "summarize", "truncate"):
        assert items[len(items) - len(tail) :] == tail, "the last keep_last exchanges changed"
        if layout.inputs[0]:
            first = unit_items(originals, units[0])
            assert items[system : system + len(first)] == first, "the task changed"
    if name == "elide_tool_output":
        assert len(items) == len(sent)
        old_items = {i for start, end in old for i in range(start, end)}
        for index, (raw, original) in enumerate(zip(items, sent, strict=True)):
            assert raw == original or index in old_items
        if conversation.total > run.job.goal:  # short of the goal: every old output is gone
            for index in old_items:
                if api.elidable(orjson.loads(sent[index])):
                    assert items[index] != sent[index], f"item {index} could have been elided"
    elif name == "summarize":
        if items == sent:
            left_alone(droppable, budget=SUMMARY_MIN_TOKENS)  # too little to pay a call for
            return
        # Everything old but the task became one summary note.
        assert len(run.transcripts) == 1
        start = first_change(items, sent)
        assert start in starts, "summarize did not keep the task, or kept more"
        assert items[start + 1 :] == sent[old[-1][1] :]
        assert SUMMARY_TEXT in (api.note_text(orjson.loads(items[start])) or "")
    elif name == "truncate":
        if items == sent:
            left_alone(droppable)
            return
        # The oldest exchanges after the task, up to a unit's end, became one note.
        start = first_change(items, sent)
        assert start in starts, "truncate did not keep the task, or kept more"
        cut = len(sent) - (len(items) - start - 1)
        ends = [end for _, end in old if end > start]
        assert cut in ends, "truncate split an exchange"
        assert items[start + 1 :] == sent[cut:]
        if cut != ends[0]:  # it dropped no more than it needed to reach the goal
            previous = ends[ends.index(cut) - 1]
            saved = sum(count(raw) for raw in sent[start:previous])
            assert run.before - saved + count(items[start]) > run.job.goal
    elif name == "clear":
        inputs = [position for position, is_input in enumerate(layout.inputs) if is_input]
        keep = {len(units) - 1, *inputs[-1:]}
        if items == sent:
            left_alone([unit for position, unit in enumerate(units) if position not in keep])
            return
        # Only the latest input and the last exchange stay; one note stands for the rest.
        expected = sent[:system]
        noted = False
        for position, unit in enumerate(units):
            if position in keep:
                expected += unit_items(originals, unit)
            elif not noted:
                note = api.note_text(orjson.loads(items[len(expected)])) or ""
                assert note.startswith("[The gateway cleared "), note
                expected.append(items[len(expected)])
                noted = True
        assert items == expected
        last = unit_items(originals, units[-1])
        assert items[len(items) - len(last) :] == last


def check_replay(api: Api, originals: list[bytes], extra: list[bytes], run: Run, name: str) -> None:
    """The saved rewrite gives the same bytes on the next requests of the session."""
    conversation = run.conversation
    rewrite = conversation.rewrite([name], 0.0, None)
    if run.items == [bytes(raw) for raw in originals]:
        assert rewrite is None
        return
    assert rewrite is not None
    stored = Rewrite.from_json(orjson.loads(orjson.dumps(rewrite.to_json())))
    later = originals + extra
    assert matching([stored], later) is stored
    assert matching([stored], originals) is stored
    replay = Conversation.of(api.history, later, count, 0, stored)
    assert [bytes(raw) for raw in replay.items()] == run.items + extra
    assert replay.total == conversation.total + sum(count(raw) for raw in extra)
    api.validate([orjson.loads(raw) for raw in replay.items()])
    first = orjson.loads(originals[0])
    changed = [orjson.dumps({**first, "x_changed": True}), *later[1:]]
    assert matching([stored], changed) is None
    assert matching([stored], later[: stored.count - 1]) is None


# --- Properties --------------------------------------------------------------------------------

KEEP_LAST = st.integers(1, 4)
FRACTION = st.floats(0.1, 0.9)


@pytest.mark.parametrize("api", APIS, ids=repr)
@PROFILE
@given(data=st.data())
def test_generated_histories_are_valid(api: Api, data: st.DataObject) -> None:
    sample = data.draw(api.samples)
    items = sample.items
    api.validate(items)
    for extra in range(1, len(sample.extra) + 1):
        api.validate(items + [item for exchange in sample.extra[:extra] for item in exchange])
    everything = encode(items + [item for exchange in sample.extra for item in exchange])
    assert len(set(everything)) == len(everything), "items are not unique"
    layout = api.history.layout(items)
    assert layout.inputs[0], "the first unit is the first user message"
    # Each generated exchange is whole units: the layout never binds across them.
    starts = {start for start, _ in layout.units}
    position = len(sample.lead)
    for exchange in sample.exchanges:
        assert position in starts
        position += len(exchange)


@pytest.mark.parametrize("name", NAMES_OF_STRATEGIES)
@pytest.mark.parametrize("api", APIS, ids=repr)
@PROFILE
@given(data=st.data(), keep_last=KEEP_LAST, fraction=FRACTION)
def test_strategy_keeps_the_request_valid_and_the_bytes(
    api: Api, name: str, data: st.DataObject, keep_last: int, fraction: float
) -> None:
    sample = data.draw(api.samples)
    originals = encode(sample.items)
    run = compact(api, originals, name, keep_last, fraction)
    check_result(api, originals, run)
    if name != "elide_tool_output" and run.items != originals:
        assert len(run.items) <= len(originals)
    layout = api.history.layout(sample.items)
    check_first_run(api, originals, layout, run, name, keep_last)
    extra = encode([item for exchange in sample.extra for item in exchange])
    check_replay(api, originals, extra, run, name)


@pytest.mark.parametrize("api", APIS, ids=repr)
@PROFILE
@given(
    data=st.data(),
    names=st.lists(st.sampled_from(NAMES_OF_STRATEGIES), min_size=2, max_size=3),
    keep_last=KEEP_LAST,
    fraction=FRACTION,
)
def test_compactions_build_on_saved_rewrites(
    api: Api, data: st.DataObject, names: list[str], keep_last: int, fraction: float
) -> None:
    """A session compacted turn after turn, as the gateway does it: the items are slices of the
    request body, each request starts from the saved rewrite, and the body sent upstream is the
    agent's with only the conversation replaced."""
    sample = data.draw(api.samples)
    sent = encode(sample.items)
    saved: list[Rewrite] = []
    previous: list[bytes] = []
    for turn, name in enumerate(names):
        before = len(sent)
        if turn:
            sent = sent + encode(sample.extra[(turn - 1) % len(sample.extra)])
        body, originals = request(api, sent)
        rewrite = matching(saved, originals)
        assert rewrite is (saved[-1] if saved else None)
        if turn:  # the saved rewrite gives the last request's bytes, then the new items
            replayed = Conversation.of(api.history, originals, count, 0, rewrite)
            assert [bytes(raw) for raw in replayed.items()] == previous + sent[before:]
        run = compact(api, originals, name, keep_last, fraction, rewrite)
        check_result(api, originals, run)
        upstream = orjson.loads(replace_array(body, api.history.field, run.conversation.items()))
        assert upstream.pop(api.history.field) == [orjson.loads(raw) for raw in run.items]
        assert upstream == {"model": MODEL, "max_tokens": 1024, "x_top": {"kept": True}}
        previous = run.items
        made = run.conversation.rewrite([name], float(turn), None)
        if made is not None:
            saved.append(Rewrite.from_json(orjson.loads(orjson.dumps(made.to_json()))))


@pytest.mark.parametrize("name", NAMES_OF_STRATEGIES)
@pytest.mark.parametrize("api", APIS, ids=repr)
@PROFILE
@given(data=st.data(), keep_last=KEEP_LAST, fraction=FRACTION)
def test_strategy_never_makes_the_request_bigger(
    api: Api, name: str, data: st.DataObject, keep_last: int, fraction: float
) -> None:
    sample = data.draw(api.samples)
    run = compact(api, encode(sample.items), name, keep_last, fraction)
    assert run.conversation.total <= run.before


@pytest.mark.parametrize("api", APIS, ids=repr)
@PROFILE
@given(data=st.data(), keep_last=KEEP_LAST, fraction=FRACTION)
def test_truncate_stops_over_the_goal_only_when_nothing_old_is_left(
    api: Api, data: st.DataObject, keep_last: int, fraction: float
) -> None:
    """Truncate's promise, the oldest exchanges go until the request fits: over the goal, no
    old exchange is left."""
    sample = data.draw(api.samples)
    originals = encode(sample.items)
    run = compact(api, originals, "truncate", keep_last, fraction)
    if run.conversation.total <= run.job.goal or run.items == originals:
        return
    layout = api.history.layout(sample.items)
    old = layout.units[: len(layout.units) - keep_last]
    kept_tail = originals[old[-1][1] :]
    note = len(run.items) - len(kept_tail) - 1
    assert run.items[note + 1 :] == kept_tail
    assert run.items[:note] == originals[:note], "over the goal with old exchanges left"


@pytest.mark.parametrize("api", APIS, ids=repr)
@PROFILE
@given(data=st.data(), keep_last=KEEP_LAST, fraction=FRACTION)
def test_elide_takes_the_largest_outputs_of_an_exchange_first(
    api: Api, data: st.DataObject, keep_last: int, fraction: float
) -> None:
    """Elide's promise, the largest go first within each exchange: no item with an elidable
    output stays that is bigger than one elided."""
    sample = data.draw(api.samples)
    originals = encode(sample.items)
    run = compact(api, originals, "elide_tool_output", keep_last, fraction)
    items = sample.items
    for start, end in api.history.layout(items).units:
        unit = range(start, end)
        elided = [len(originals[i]) for i in unit if run.items[i] != originals[i]]
        kept = [
            len(originals[i])
            for i in unit
            if run.items[i] == originals[i] and api.elidable(items[i])
        ]
        if elided and kept:
            assert max(kept) <= min(elided), "a smaller output was elided before a larger one"


# --- The smallest cases the properties found ---------------------------------------------------


@pytest.mark.parametrize("name", ["summarize", "truncate", "clear"])
def test_a_note_does_not_replace_less_than_it_costs(name: str) -> None:
    """A task, a short reply, a question: the note standing for the old part is longer."""
    messages = [
        {"role": "user", "content": "user 1"},
        {"role": "assistant", "content": "reply 2"},
        {"role": "user", "content": "user 3"},
    ]
    originals = encode(messages)
    run = compact(CHAT, originals, name, keep_last=1, fraction=0.5)
    assert run.conversation.total <= run.before, (
        f"{name}: {run.before} -> {run.conversation.total} tokens: {run.items}"
    )


def test_truncate_counts_its_own_note() -> None:
    """Dropping the first old exchange meets the goal only if the note is free: truncate must
    go on to the next (large) one rather than stop over the goal."""
    messages = [
        {"role": "user", "content": "user 1"},
        {"role": "assistant", "content": text("reply 2", 400)},
        {"role": "assistant", "content": text("reply 3", 4000)},
        {"role": "user", "content": "user 4"},
    ]
    originals = encode(messages)
    before = sum(count(raw) for raw in originals)
    goal = before - count(originals[1])
    run = compact(CHAT, originals, "truncate", keep_last=1, fraction=0, goal=goal)
    assert run.conversation.total <= goal, (
        f"stopped at {run.conversation.total} tokens > goal {goal} with an old exchange left: "
        f"{[raw[:40] for raw in run.items]}"
    )


def test_elide_takes_the_largest_output_of_an_exchange_first() -> None:
    """Two outputs of one turn, the smaller first; eliding either meets the goal."""
    calls = [
        {"id": f"call_{n}", "type": "function", "function": {"name": "read", "arguments": "{}"}}
        for n in (1, 2)
    ]
    messages = [
        {"role": "user", "content": "user 1"},
        {"role": "assistant", "content": None, "tool_calls": calls},
        {"role": "tool", "tool_call_id": "call_1", "content": text("small", 3000)},
        {"role": "tool", "tool_call_id": "call_2", "content": text("large", 6000)},
        {"role": "user", "content": "user 2"},
    ]
    originals = encode(messages)
    elided = orjson.dumps(CHAT.history.elide(messages[2], ELIDE_MIN_BYTES))
    goal = sum(count(raw) for raw in originals) - (count(originals[2]) - count(elided))
    run = compact(CHAT, originals, "elide_tool_output", keep_last=1, fraction=0, goal=goal)
    assert run.items[3] != originals[3], "the 6,000-byte output stayed"
    assert run.items[2] == originals[2], "the 3,000-byte output went first"
