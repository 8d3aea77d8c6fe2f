"""A site's newest versions as the ops that made them, kept after retention has dropped the versions.

Under a trickle of FTP changes retention drops versions within a fraction of a second (the last N of
hundreds a second), while a worker that applies them is always a few behind. What made each version,
and how to take it back, lets the fileserver rebuild the tree a worker has from a newer one, and so
answer it with the few paths that changed instead of "build the whole site again".

It outlives a restart: each checkpoint writes it beside the version it holds (``encode``), and the
start reads it back and adds the journal records it replays (``decode``), so a worker behind by
dropped versions is not sent a whole rebuild after every restart of the fileserver.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from roles.fileserver._manifest import FileEntry, Tree, Undo, undo_ops

__all__ = ["HISTORY_OPS", "History"]

# Ops remembered per site, oldest forgotten first: well past the paths a worker applies one by one
# (beyond that it builds anew anyway), and a few hundred KB of memory at most.
HISTORY_OPS = 4096


@dataclass(frozen=True, slots=True)
class _Step:
    # A deploy or rollback: the site changed whole, so a worker builds it anew past this version.
    flipped: bool
    # How to take the version back; None when it cannot be (it replaced the site whole).
    undos: tuple[Undo, ...] | None


class History:
    """What made each of a site's last versions, in version order, up to ``max_ops`` ops in all."""

    def __init__(self, max_ops: int = HISTORY_OPS) -> None:
        self._max_ops = max_ops
        self._steps: deque[_Step] = deque()
        self._first = 0  # the version of ``_steps[0]``
        self._ops = 0

    def add(self, version: int, *, flipped: bool, undos: Sequence[Undo] | None) -> None:
        """Remember version ``version``, the one after the last added (else what came before is
        forgotten: a gap would rebuild a wrong tree)."""
        if undos is not None and len(undos) > self._max_ops:
            undos = None
        if self._steps and version != self._first + len(self._steps):
            self._steps.clear()
            self._ops = 0
        if not self._steps:
            self._first = version
        step = _Step(flipped, None if undos is None else tuple(undos))
        self._steps.append(step)
        self._ops += self._cost(step)
        while self._ops > self._max_ops:
            self._ops -= self._cost(self._steps.popleft())
            self._first += 1

    @staticmethod
    def _cost(step: _Step) -> int:
        return max(1, len(step.undos or ()))

    def _step(self, version: int) -> _Step | None:
        index = version - self._first
        return self._steps[index] if 0 <= index < len(self._steps) else None

    def flipped(self, version: int) -> bool | None:
        """Whether ``version`` changed the site whole; None when it is not remembered."""
        step = self._step(version)
        return None if step is None else step.flipped

    def rewind(self, tree: Tree, at: int, to: int) -> Tree | None:
        """``tree``, the content of version ``at``, as it was at version ``to`` (a new tree; ``tree``
        stays as it is); None unless every version after ``to`` up to ``at`` can be taken back."""
        steps = [self._step(n) for n in range(at, to, -1)]
        undos = [s.undos for s in steps if s is not None and s.undos is not None]
        if to < 0 or len(undos) != at - to:
            return None
        past = tree.begin()
        for version_undos in undos:
            undo_ops(past, version_undos)
        return past

    @property
    def newest(self) -> int | None:
        """The last version remembered, None when none is."""
        return self._first + len(self._steps) - 1 if self._steps else None

    def encode(self) -> bytes:
        steps = [
            [s.flipped, None if s.undos is None else [_undo_json(u) for u in s.undos]] for s in self._steps
        ]
        return json.dumps({"first": self._first, "steps": steps}, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes, max_ops: int = HISTORY_OPS) -> History:
        """What :meth:`encode` wrote; an unreadable one is forgotten (a worker then builds anew: slower,
        never wrong)."""
        history = cls(max_ops)
        try:
            value = json.loads(raw)
            first, steps = int(value["first"]), value["steps"]
            for offset, (flipped, undos) in enumerate(steps):
                history.add(
                    first + offset,
                    flipped=bool(flipped),
                    undos=None if undos is None else [_undo(u) for u in undos],
                )
        except (ValueError, KeyError, TypeError, IndexError):
            return cls(max_ops)
        return history


def _undo_json(undo: Undo) -> list[Any]:
    before = undo.before
    entry = None if before is None else [before.sha256, before.size, before.mtime]
    return [undo.op, undo.path, entry, list(undo.made), undo.dst]


def _undo(value: list[Any]) -> Undo:
    op, path, entry, made, dst = value
    before = None if entry is None else FileEntry(str(entry[0]), int(entry[1]), float(entry[2]))
    return Undo(str(op), str(path), before, tuple(str(m) for m in made), str(dst))
