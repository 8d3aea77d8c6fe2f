"""Reading another role's answer: a message that does not parse is that role's fault, not the caller's."""

from __future__ import annotations

from typing import TypeVar

from shared.contracts._base import Contract
from shared.errors import InvalidInput, Unavailable

__all__ = ["parse_answer"]

C = TypeVar("C", bound=Contract)


def parse_answer(kind: type[C], data: object, *, peer: str) -> C:
    """``kind.parse(data)``, refused as :class:`Unavailable` (503): the caller asked nothing wrong, and
    a user must not be told their input was bad because ``peer`` answered something unexpected."""
    try:
        return kind.parse(data)
    except InvalidInput as err:
        raise Unavailable(f"{peer} gave an unexpected answer: {err.message}") from None
