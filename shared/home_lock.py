"""``HOME/controller.pid``: held by the `sitecloud up` that runs a cloud home, for as long as it runs.

The controller holds it (:func:`hold_home`) so that a second `up` on the same home is refused before
it starts anything; the CLI looks at it (:func:`home_holder`) to say whether `up` runs when the
management API does not answer.

An flock rather than the pid alone: the kernel drops it when its holder dies, so a controller killed
with SIGKILL leaves no lock behind and the next `up` adopts its roles. The descriptor is not inherited
(Python's default), so the role processes, which outlive the controller, never hold it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from shared.errors import InUse, InvalidInput

__all__ = ["LOCK_FILE", "hold_home", "home_holder"]

LOCK_FILE = "controller.pid"


@contextlib.contextmanager
def hold_home(home: Path) -> Iterator[None]:
    """Hold ``HOME/controller.pid`` (with this pid in it) while the body runs; refuse if another
    process holds it."""
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(
            f"cannot make the cloud home {home}: {exc.strerror}",
            hint="give a --home (or SITECLOUD_HOME) in a folder you can write",
        ) from None
    path = home / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise InvalidInput(
            f"cannot open {path}: {exc.strerror}", hint="check the home's owner and mode"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            raise InUse(
                f"a cloud is already running on this home ({home}, pid {pid or 'unknown'}); stop it first",
                hint=f"Ctrl-C where that `sitecloud up` runs, or `kill {pid}`" if pid else None,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            # Emptied, not removed: an `up` that opened it just before a removal would lock the
            # removed file while the next one locks a new file.
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def home_holder(home: Path) -> int | None:
    """The pid of the `sitecloud up` running on ``home`` (0 if it runs but its pid cannot be read);
    None when none runs, or when this cannot be told (no such file, another machine's home)."""
    try:
        fd = os.open(home / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else 0
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
