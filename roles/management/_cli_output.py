"""How the CLI prints for people: lines, aligned tables, field lists, relative times."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["ago", "dumps", "one_line", "out", "print_fields", "print_table", "printable"]

# Control characters (C0 but tab and newline, DEL, C1) shown as escapes: app output and settings are a
# tenant's bytes, and a terminal acts on escape sequences (titles, colours, OSC 52 clipboard writes).
_ESCAPED = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c not in (0x09, 0x0A)}


# JSON escapes C0 itself; DEL and C1 are left raw by ensure_ascii=False, so they get \\u escapes here.
_JSON_ESCAPED = {c: f"\\u{c:04x}" for c in (0x7F, *range(0x80, 0xA0))}


# A value shown as one line (an app setting): a line break in it would read as a second setting.
_ESCAPED_IN_LINE = {**_ESCAPED, 0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}


def printable(text: str) -> str:
    return text.translate(_ESCAPED)


def one_line(text: str) -> str:
    return text.translate(_ESCAPED_IN_LINE)


def dumps(answer: Any, *, indent: int | None = 2) -> str:
    """``answer`` as JSON for the terminal: readable non-ASCII text, no raw control characters."""
    return json.dumps(answer, indent=indent, ensure_ascii=False).translate(_JSON_ESCAPED)


def out(line: str = "") -> None:
    sys.stdout.write(line.translate(_ESCAPED) + "\n")
    sys.stdout.flush()


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, empty: str) -> None:
    if not rows:
        out(empty)
        return
    cells = [[str(h) for h in headers]] + [["-" if c is None or c == "" else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        out("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_fields(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        out(f"  {key.ljust(width)}  {value}")


def ago(when: str | None) -> str:
    if not when:
        return "never"
    try:
        seen = dt.datetime.fromisoformat(when)
    except ValueError:
        return when
    seconds = int((dt.datetime.now(dt.UTC) - seen).total_seconds())
    if seconds < 120:
        return f"{max(seconds, 0)}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return seen.strftime("%Y-%m-%d %H:%M:%S UTC")
