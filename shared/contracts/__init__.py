"""Typed messages that cross a role boundary: one definition each, produced with ``to_json()`` and
consumed with ``parse()``, which validates once and raises the errors of :mod:`shared.errors`.

The field types in :mod:`shared.contracts.fields` are the same checks management applies to user
input, so a value one side accepts is never refused by the other.
"""

from shared.contracts._base import Contract

__all__ = ["Contract"]
