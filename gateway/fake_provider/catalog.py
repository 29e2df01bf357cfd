"""The non-chat endpoints: the model list and tiny deterministic embeddings."""

from __future__ import annotations

import base64
import hashlib
import math
import struct

from .api import JsonObject
from .errors import invalid_request

MODELS = (
    "gpt-5",
    "gpt-5-codex",
    "gpt-4.1",
    "gpt-4o",
    "gpt-4o-mini",
    "text-embedding-3-small",
    "claude-opus-4-8",
    "claude-sonnet-4-6",
    "claude-haiku-4-5",
)
MODELS_CREATED = 1_735_689_600  # 2025-01-01, fixed so answers are deterministic
DEFAULT_DIMENSIONS = 8
MAX_DIMENSIONS = 3072


def openai_models() -> JsonObject:
    return {
        "object": "list",
        "data": [
            {"id": model, "object": "model", "created": MODELS_CREATED, "owned_by": "system"}
            for model in MODELS
        ],
    }


def anthropic_models() -> JsonObject:
    """The same list in Anthropic's shape (asked for with an ``anthropic-version`` header)."""
    data = [
        {
            "type": "model",
            "id": model,
            "display_name": model.replace("-", " ").title(),
            "created_at": "2025-01-01T00:00:00Z",
        }
        for model in MODELS
        if model.startswith("claude")
    ]
    return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}


def embedding_inputs(body: JsonObject) -> list[str]:
    """Validate an embeddings request and return its inputs as text."""
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise invalid_request("you must provide a model parameter")
    raw = body.get("input")
    if raw is None:
        raise invalid_request(
            "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
        )
    items = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
    texts: list[str] = []
    for item in items:
        if isinstance(item, str) and item:
            texts.append(item)
        elif isinstance(item, list) and item and all(isinstance(t, int) for t in item):
            texts.append(" ".join(map(str, item)))
        else:
            raise invalid_request(
                "'$.input' is invalid. Please check the API reference: "
                "https://platform.openai.com/docs/api-reference.",
            )
    return texts


def _dimensions(body: JsonObject) -> int:
    dimensions = body.get("dimensions", DEFAULT_DIMENSIONS)
    if not isinstance(dimensions, int) or not 1 <= dimensions <= MAX_DIMENSIONS:
        raise invalid_request(
            f"Invalid 'dimensions': expected an integer between 1 and {MAX_DIMENSIONS}.",
            param="dimensions",
        )
    return dimensions


def vector(text: str, dimensions: int) -> list[float]:
    """A unit vector derived from the SHA-256 of the text: same text, same vector."""
    seed = text.encode()
    raw: list[float] = []
    counter = 0
    while len(raw) < dimensions:
        digest = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        raw.extend(byte / 127.5 - 1.0 for byte in digest)
        counter += 1
    raw = raw[:dimensions]
    norm = math.sqrt(sum(value * value for value in raw)) or 1.0
    return [value / norm for value in raw]


def embeddings(body: JsonObject, texts: list[str], prompt_tokens: int) -> JsonObject:
    dimensions = _dimensions(body)
    as_base64 = body.get("encoding_format") == "base64"
    data: list[JsonObject] = []
    for index, text in enumerate(texts):
        values = vector(text, dimensions)
        embedding: object = (
            base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
            if as_base64
            else values
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    return {
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }
