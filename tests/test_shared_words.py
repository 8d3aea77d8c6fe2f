"""Counts in messages agree with their nouns."""

from __future__ import annotations

from shared.words import counted


def test_one_is_singular_and_every_other_count_plural() -> None:
    assert counted(1, "subscription") == "1 subscription"
    assert [counted(n, "site") for n in (0, 2, 10)] == ["0 sites", "2 sites", "10 sites"]
    assert counted(2, "custom hostname") == "2 custom hostnames"
    assert counted(3, "entry", "entries") == "3 entries" and counted(1, "entry", "entries") == "1 entry"
