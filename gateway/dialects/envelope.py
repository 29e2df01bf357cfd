"""Reading a request body without building all of it.

An agent's request is mostly history, resent every turn. The gateway needs a few small fields
and the two ends of the history (its start for identity, its newest items for loops), so the
body is decoded into an ``Envelope``: small fields as values, big arrays as a list of raw JSON
slices (one scan, no objects built). ``Items`` decodes an item only when it is read.

A body is refused (``EnvelopeError``, a 400) in that one scan if anything of it could fail to
decode later: malformed JSON, nesting past the decoder's depth, lone surrogate escapes
(msgspec checks these even in the slices it skips), and invalid UTF-8 (msgspec does not look
inside skipped strings, so the body is checked once, free for ASCII). What msgspec accepts and
orjson alone refuses (a number out of a double's range) is read by ``load_json``'s fallback:
an item decoded later never raises.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar, overload

import msgspec
import orjson


class Items(Sequence[Any]):
    """A JSON array whose elements are decoded on first access (and then kept)."""

    __slots__ = ("_decoded", "_raw")

    def __init__(self, raw: list[msgspec.Raw]) -> None:
        self._raw = raw
        self._decoded: list[Any] = [_UNREAD] * len(raw)

    def __len__(self) -> int:
        return len(self._raw)

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        value = self._decoded[index]
        if value is _UNREAD:
            # ``load_json``, with orjson's common case inline: items are read on every call.
            try:
                value = orjson.loads(memoryview(self._raw[index]))
            except orjson.JSONDecodeError:
                value = load_json(self._raw[index])
            self._decoded[index] = value
        return value

    def __iter__(self) -> Iterator[Any]:
        decoded, raw = self._decoded, self._raw
        for index, value in enumerate(decoded):
            if value is _UNREAD:
                try:
                    value = orjson.loads(memoryview(raw[index]))
                except orjson.JSONDecodeError:
                    value = load_json(raw[index])
                decoded[index] = value
            yield value

    def raw(self) -> Iterator[msgspec.Raw]:
        """The elements as sent, undecoded: token counting keys its cache on these bytes."""
        return iter(self._raw)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Items({len(self)} items)"


_UNREAD: Any = object()


Field = Any
"""A small field, decoded as it is; absent stays ``msgspec.UNSET``."""
Array = list[msgspec.Raw] | None | msgspec.UnsetType
"""A big array: its elements kept as raw JSON."""
ArrayOrText = list[msgspec.Raw] | str | None | msgspec.UnsetType
"""A big array, or a plain string in its place (Responses ``input``, Anthropic ``system``)."""
UNSET = msgspec.UNSET


class Envelope(msgspec.Struct):
    """A request body's fields that a dialect reads; everything else stays as bytes.

    ``get`` makes an envelope read like the parsed dict it stands for, so dialects (and their
    tests) take either. The fields all three APIs have are here; each dialect adds its own.
    """

    _field_set: ClassVar[frozenset[str]] = frozenset()
    """``__struct_fields__`` as a set (set by ``decoder``): ``get`` looks a name up in it."""

    model: Field = UNSET
    stream: Field = UNSET
    tools: Array = UNSET
    metadata: Field = UNSET
    # Sampling settings all three APIs have (read only by tracing).
    temperature: Field = UNSET
    top_p: Field = UNSET

    def get(self, key: str, default: Any = None) -> Any:
        # Not ``getattr`` with a default: a field this API lacks would raise (and format) an
        # AttributeError on every call. Read a dozen times per call, so kept to set lookups.
        if key not in self._field_set:
            return default
        value = getattr(self, key)
        if value is UNSET:
            return default
        if type(value) is list and value and type(value[0]) is msgspec.Raw:
            # Kept in the field's place: every later reader shares what was decoded.
            value = Items(value)
            setattr(self, key, value)
        return value

    def __contains__(self, key: str) -> bool:
        """Whether the body has the field at all (``null`` counts)."""
        return key in self._field_set and getattr(self, key) is not UNSET


class EnvelopeError(ValueError):
    """Not JSON, or not the shape of a request (the message says where)."""


def decoder(envelope: type[Envelope]) -> msgspec.json.Decoder[Envelope]:
    envelope._field_set = frozenset(envelope.__struct_fields__)
    return msgspec.json.Decoder(envelope)


def decode(dec: msgspec.json.Decoder[Envelope], raw: bytes) -> Envelope:
    try:
        envelope = dec.decode(raw)
    except msgspec.DecodeError as exc:
        raise EnvelopeError(str(exc)) from exc
    except RecursionError as exc:
        raise EnvelopeError("JSON is nested too deeply") from exc
    except UnicodeDecodeError as exc:  # in a field decoded as a value
        raise EnvelopeError(f"invalid UTF-8 at byte {exc.start}") from exc
    if not raw.isascii():
        # The slices msgspec skipped are not checked for UTF-8; orjson would refuse them later.
        try:
            raw.decode()
        except UnicodeDecodeError as exc:
            raise EnvelopeError(f"invalid UTF-8 at byte {exc.start}") from exc
    return envelope


def load_json(data: Buffer) -> Any:
    """One element of a body ``decode`` accepted: orjson, or for what only it refuses (a number
    past a double's range), the standard library, reading such numbers as infinities."""
    try:
        return orjson.loads(memoryview(data))
    except orjson.JSONDecodeError:
        return json.loads(bytes(data), parse_int=_int, parse_constant=_refuse)


Buffer = bytes | msgspec.Raw | memoryview


def _int(text: str) -> int | float:
    # As orjson reads them: past 64 bits a float (and no slow parse of a huge integer).
    if len(text) <= 20:
        value = int(text)
        if -(2**63) <= value < 2**64:
            return value
    return float(text)


def _refuse(text: str) -> Any:
    raise ValueError(f"not JSON: {text}")


_MARK = orjson.dumps("\u0000gateway:array\u0000")


def replace_array(raw: bytes, field: str, elements: list[Any]) -> bytes:
    """The body with one top-level array replaced by ``elements`` (raw JSON each, joined as
    they are: items kept from the request stay byte for byte). Every other field is kept."""
    body = load_json(raw)
    body[field] = "\u0000gateway:array\u0000"
    return orjson.dumps(body).replace(_MARK, b"[" + b",".join(elements) + b"]", 1)
