"""Role output files kept to a bound, as logrotate's ``copytruncate`` keeps them.

A role's stdout and stderr go to a file its supervisor opened in append mode, and the role keeps that
descriptor for its whole life: the file cannot be renamed away under it. Past the bound, the file's
content is copied to ``<name>.1`` (replacing the one before) and the file is cut to nothing; the
role's next write lands at its new end. A line written between the copy and the cut is lost, as
with ``copytruncate``. So a role's log takes at most about twice the bound on its host's disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

__all__ = ["ROLE_LOG_CHECK_EVERY", "ROLE_LOG_MAX_BYTES", "keep_bounded"]

ROLE_LOG_MAX_BYTES = 64 * 1024 * 1024
# How often (seconds) a supervisor looks at its role's log size.
ROLE_LOG_CHECK_EVERY = 30.0


def keep_bounded(path: Path, max_bytes: int = ROLE_LOG_MAX_BYTES) -> bool:
    """Move ``path``'s content to ``<path>.1`` once it is past ``max_bytes``; whether it did."""
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    older = path.with_name(path.name + ".1")
    partial = path.with_name(path.name + ".1.partial")
    shutil.copyfile(path, partial)
    os.replace(partial, older)
    os.truncate(path, 0)
    return True
