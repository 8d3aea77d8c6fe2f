"""Counts in messages people read: "1 site", "2 sites", never "1 site(s)"."""

from __future__ import annotations

__all__ = ["counted"]


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """``count`` with ``noun`` agreeing with it (``plural`` when adding an "s" will not do)."""
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
