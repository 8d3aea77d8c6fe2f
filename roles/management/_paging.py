"""Pages of a list answer: ``limit`` items after an opaque ``cursor``; the answer's ``next_cursor``
continues it (null at the end).

A cursor is the sort key of the last item given, base64url-encoded JSON: keyset paging, so an item
added or removed between two pages neither repeats nor skips another one.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from shared.errors import InvalidInput

__all__ = ["DEFAULT_LIMIT", "MAX_LIMIT", "Key", "Page", "decode_cursor", "encode_cursor", "paged"]

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_MAX_CURSOR = 512

Key = str | int
T = TypeVar("T")


def encode_cursor(key: Key) -> str:
    return base64.urlsafe_b64encode(json.dumps([key]).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, kind: type[Key]) -> Key:
    """The sort key inside a cursor this API gave; anything else is refused with a 400."""
    refused = InvalidInput(
        "the cursor is not one this list gave", hint="pass the next_cursor of the previous page, or none"
    )
    if len(cursor) > _MAX_CURSOR:
        raise refused
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        (key,) = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise refused from None
    if not isinstance(key, kind) or isinstance(key, bool):
        raise refused
    return key


@dataclass(frozen=True)
class Page:
    """Which part of a list to answer with; the default is the whole list (the portals' view)."""

    limit: int | None = None
    cursor: str | None = None

    def after(self, kind: type[Key]) -> Key | None:
        return None if self.cursor is None else decode_cursor(self.cursor, kind)

    def cut(self, rows: list[T], key: Callable[[T], Key]) -> tuple[list[T], str | None]:
        """``rows`` (fetched with one more than ``limit``, after the cursor) and the next cursor."""
        if self.limit is None or len(rows) <= self.limit:
            return rows, None
        rows = rows[: self.limit]
        return rows, encode_cursor(key(rows[-1]))


def paged(
    items: Iterable[T], key: Callable[[T], Key], page: Page, kind: type[Key]
) -> tuple[list[T], str | None]:
    """A page of a list already in memory and sorted by ``key`` (short lists: plans, tokens, roles)."""
    after = page.after(kind)
    rest = [item for item in items if after is None or _greater(key(item), after)]
    return page.cut(rest if page.limit is None else rest[: page.limit + 1], key)


def _greater(a: Key, b: Key) -> bool:
    return (a > b) if type(a) is type(b) else str(a) > str(b)  # type: ignore[operator]
