"""The strict request checks of the real APIs, with messages worded like theirs.

Each ``validate_*`` takes the parsed JSON body and raises ``FakeError`` (400) on the first
problem, the way the real provider refuses a request before generating anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import FakeError, invalid_request

JsonObject = dict[str, Any]

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
RESPONSES_ROLES = ("user", "assistant", "system", "developer")
_RESPONSES_CALLS = {"function_call": "function call", "custom_tool_call": "custom tool call"}
_RESPONSES_OUTPUTS = {
    "function_call_output": "function call output",
    "custom_tool_call_output": "custom tool call output",
}
MID_CONVERSATION_SYSTEM_BETA = "mid-conversation-system"


def _missing(param: str) -> FakeError:
    return invalid_request(
        f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


def _invalid_value(value: object, allowed: tuple[str, ...], param: str) -> FakeError:
    quoted = [f"'{name}'" for name in allowed]
    listed = ", ".join(quoted[:-1]) + f", and {quoted[-1]}"
    return invalid_request(
        f"Invalid value: '{value}'. Supported values are: {listed}.",
        param=param,
        code="invalid_value",
    )


def _invalid_type(param: str, expected: str, value: object) -> FakeError:
    return invalid_request(
        f"Invalid type for '{param}': expected {expected}, but got {type(value).__name__} instead.",
        param=param,
        code="invalid_type",
    )


def _model(body: JsonObject) -> None:
    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str) or not model:
        raise _invalid_type("model", "a string", model)


# --- OpenAI Chat Completions -------------------------------------------------------------


def validate_chat(body: JsonObject) -> None:
    """Model, non-empty messages, known roles, every tool call answered, stream_options."""
    if body.get("model") is None:
        raise invalid_request("you must provide a model parameter")
    _model(body)
    messages = body.get("messages")
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _invalid_type("messages", "an array", messages)
    if not messages:
        raise invalid_request(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            param="messages",
            code="empty_array",
        )
    _chat_tool_pairing(messages)
    if body.get("stream_options") is not None and body.get("stream") is not True:
        raise invalid_request(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )


def _chat_tool_pairing(messages: list[Any]) -> None:
    pending: list[str] = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _invalid_type(f"messages[{index}]", "an object", message)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise _invalid_value(role, CHAT_ROLES, f"messages[{index}].role")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise _missing(f"messages[{index}].tool_call_id")
            if call_id not in pending:
                raise invalid_request(
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    param=f"messages.[{index}].role",
                )
            pending.remove(call_id)
            continue
        if pending:
            raise _unanswered_chat_calls(pending, index)
        if role == "assistant":
            pending = _chat_call_ids(message, index)
    if pending:
        raise _unanswered_chat_calls(pending, len(messages))


def _chat_call_ids(message: JsonObject, index: int) -> list[str]:
    tool_calls = message.get("tool_calls")
    if tool_calls is None:
        return []
    if not isinstance(tool_calls, list):
        raise _invalid_type(f"messages[{index}].tool_calls", "an array", tool_calls)
    ids: list[str] = []
    for position, call in enumerate(tool_calls):
        call_id = call.get("id") if isinstance(call, dict) else None
        if not isinstance(call_id, str):
            raise _missing(f"messages[{index}].tool_calls[{position}].id")
        ids.append(call_id)
    return ids


def _unanswered_chat_calls(pending: list[str], index: int) -> FakeError:
    return invalid_request(
        "An assistant message with 'tool_calls' must be followed by tool messages responding "
        "to each 'tool_call_id'. The following tool_call_ids did not have response messages: "
        + ", ".join(pending),
        param=f"messages.[{index}].role",
    )


# --- OpenAI Responses ----------------------------------------------------------------------


def validate_responses(body: JsonObject) -> None:
    """Model; input a string or items; calls and outputs paired; no trailing reasoning item."""
    _model(body)
    items = body.get("input")
    if items is None or isinstance(items, str):
        return
    if not isinstance(items, list):
        raise _invalid_type("input", "one of a string or array of input items", items)
    chained = bool(body.get("previous_response_id") or body.get("conversation"))
    calls: dict[str, str] = {}
    answered: set[str] = set()
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise _invalid_type(f"input[{index}]", "an object", item)
        kind = item.get("type")
        if kind is not None and not isinstance(kind, str):
            raise _invalid_type(f"input[{index}].type", "a string", kind)
        if kind in _RESPONSES_OUTPUTS:
            call_id = _call_id(item, index)
            if call_id not in calls and not chained:
                raise invalid_request(
                    f"No tool call found for {_RESPONSES_OUTPUTS[kind]} with call_id {call_id}.",
                    param="input",
                )
            answered.add(call_id)
        elif kind in _RESPONSES_CALLS:
            calls[_call_id(item, index)] = _RESPONSES_CALLS[kind]
        elif kind == "reasoning" and index == len(items) - 1:
            item_id = item.get("id")
            if not isinstance(item_id, str) or not item_id:
                item_id = "rs_unknown"
            raise invalid_request(
                f"Item '{item_id}' of type 'reasoning' was provided without its required "
                "following item.",
                param="input",
            )
        elif kind == "message" or (kind is None and "role" in item):
            _responses_message(item, index)
        elif kind is None:
            raise _missing(f"input[{index}].type")
    for call_id, label in calls.items():
        if call_id not in answered:
            raise invalid_request(f"No tool output found for {label} {call_id}.", param="input")


def _responses_message(item: JsonObject, index: int) -> None:
    role = item.get("role")
    if role not in RESPONSES_ROLES:
        raise _invalid_value(role, RESPONSES_ROLES, f"input[{index}].role")
    if "content" not in item:
        raise _missing(f"input[{index}].content")


def _call_id(item: JsonObject, index: int) -> str:
    call_id = item.get("call_id")
    if not isinstance(call_id, str) or not call_id:
        raise _missing(f"input[{index}].call_id")
    return call_id


# --- Anthropic Messages ----------------------------------------------------------------------


def check_anthropic_version(headers: Mapping[str, str]) -> None:
    if not headers.get("anthropic-version"):
        raise invalid_request("anthropic-version: header is required")


def validate_messages(
    body: JsonObject, headers: Mapping[str, str], *, require_max_tokens: bool = True
) -> None:
    """Model, max_tokens, user/assistant turns starting with user, tool_use/tool_result pairs."""
    required = ("model", "max_tokens", "messages") if require_max_tokens else ("model", "messages")
    for name in required:
        if name not in body:
            raise invalid_request(f"{name}: Field required")
    if not isinstance(body["model"], str) or not body["model"]:
        raise invalid_request("model: Input should be a valid string")
    if require_max_tokens:
        _max_tokens(body["max_tokens"])
    _system(body.get("system"))
    messages = body["messages"]
    if not isinstance(messages, list):
        raise invalid_request("messages: Input should be a valid list")
    if not messages:
        raise invalid_request("messages: at least one message is required")
    allow_system = MID_CONVERSATION_SYSTEM_BETA in headers.get("anthropic-beta", "")
    _anthropic_turns(messages, allow_system)


def _max_tokens(value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise invalid_request("max_tokens: Input should be a valid integer")
    if value < 1:
        raise invalid_request("max_tokens: Input should be greater than or equal to 1")


def _system(system: object) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise invalid_request("system: Input should be a valid list")
    for index, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise invalid_request(f"system.{index}.type: Input should be 'text'")
        if not isinstance(block.get("text"), str):
            raise invalid_request(f"system.{index}.text: Field required")


def _anthropic_turns(messages: list[Any], allow_system: bool) -> None:
    roles = ("user", "assistant", "system") if allow_system else ("user", "assistant")
    pending: list[str] = []  # tool_use ids of the previous message, not yet answered
    pending_at = 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise invalid_request(f"messages.{index}: Input should be a valid dictionary")
        role = message.get("role")
        if role not in roles:
            allowed = " or ".join(f"'{name}'" for name in roles)
            raise invalid_request(f"messages.{index}.role: Input should be {allowed}")
        if index == 0 and role != "user":
            raise invalid_request('messages: first message must use the "user" role')
        blocks = _blocks(message, index)
        results = _tool_results(blocks, index, set(pending)) if role == "user" else []
        missing = [tool_id for tool_id in pending if tool_id not in results]
        if missing:
            raise _unanswered_tool_uses(pending_at, missing)
        pending = [
            block["id"]
            for block in blocks
            if role == "assistant"
            and block["type"] == "tool_use"
            and isinstance(block.get("id"), str)
        ]
        pending_at = index
    if pending:
        raise _unanswered_tool_uses(pending_at, pending)


def _blocks(message: JsonObject, index: int) -> list[JsonObject]:
    if "content" not in message:
        raise invalid_request(f"messages.{index}.content: Field required")
    content = message["content"]
    if isinstance(content, str):
        return []
    if not isinstance(content, list):
        raise invalid_request(f"messages.{index}.content: Input should be a valid list")
    for position, block in enumerate(content):
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise invalid_request(f"messages.{index}.content.{position}.type: Field required")
    return content


def _tool_results(blocks: list[JsonObject], index: int, previous_uses: set[str]) -> list[str]:
    results: list[str] = []
    for position, block in enumerate(blocks):
        if block["type"] != "tool_result":
            continue
        tool_use_id = block.get("tool_use_id")
        if not isinstance(tool_use_id, str) or tool_use_id not in previous_uses:
            raise invalid_request(
                f"messages.{index}.content.{position}: unexpected `tool_use_id` found in "
                f"`tool_result` blocks: {tool_use_id}. Each `tool_result` block must have a "
                "corresponding `tool_use` block in the previous message."
            )
        results.append(tool_use_id)
    return results


def _unanswered_tool_uses(index: int, missing: list[str]) -> FakeError:
    return invalid_request(
        f"messages.{index}: `tool_use` ids were found without `tool_result` blocks immediately "
        f"after: {', '.join(missing)}. Each `tool_use` block must have a corresponding "
        "`tool_result` block in the next message."
    )
