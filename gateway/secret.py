"""``Secret``: how every secret value is held, in the config and in memory.

It prints masked (``repr``, ``str``, f-strings, tracebacks with locals), refuses to be
serialised (pickle, JSON, a pydantic JSON dump; a Python-mode dump keeps the ``Secret``), and
compares in constant time. The one way to the value is ``reveal()``, so each place that needs
it is a grep away. Every ``Secret`` made is known to the redactor (``gateway.redact``), which
scrubs its exact value from every sink.
"""

from __future__ import annotations

import hmac
from typing import Any, NoReturn

from pydantic import GetCoreSchemaHandler
from pydantic_core import core_schema

MASK = "**********"


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        if not isinstance(value, str):
            raise TypeError("a Secret holds a string")
        self._value = value
        from gateway.redact import REDACTOR  # every secret's exact value is scrubbed

        REDACTOR.know(value)

    def reveal(self) -> str:
        """The value itself: only where it is used (a header upstream, an HMAC key)."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{MASK}')"

    def __str__(self) -> str:
        return MASK

    def __format__(self, spec: str) -> str:
        return MASK

    def __bool__(self) -> bool:
        return bool(self._value)

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Secret):
            other = other._value
        if not isinstance(other, str):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other.encode())

    def __hash__(self) -> int:
        return hash((Secret, len(self._value)))  # never of the value: hashes can leak it

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Secret cannot be pickled")

    def __getstate__(self) -> NoReturn:
        raise TypeError("a Secret cannot be serialised")

    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(
            _from_value,
            core_schema.union_schema(
                [core_schema.is_instance_schema(cls), core_schema.str_schema()]
            ),
            serialization=core_schema.plain_serializer_function_ser_schema(
                _refuse, when_used="json"
            ),
        )


def _from_value(value: Secret | str) -> Secret:
    return value if isinstance(value, Secret) else Secret(value)


def _refuse(value: Any) -> NoReturn:
    raise TypeError("a Secret cannot be serialised; use reveal() where the value is needed")
