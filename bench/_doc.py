"""docs/benchmarks.md: each bench owns one section between its own markers and leaves the rest alone."""

from __future__ import annotations

from pathlib import Path

__all__ = ["DOC", "write_section"]

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def write_section(name: str, body: str) -> None:
    """Replace the section ``name`` (markers ``<!-- bench.NAME:begin/end -->``), or append it."""
    begin, end = f"<!-- bench.{name}:begin -->", f"<!-- bench.{name}:end -->"
    old = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in old and end in old:
        before, rest = old.split(begin, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = old.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)
