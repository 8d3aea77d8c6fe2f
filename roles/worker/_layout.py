"""Where a worker keeps what its sites' apps must reach: content, app homes and temp directories.

Apps run as uids of their own, so every directory above their files must be searchable by others. A
role home under such a path (e.g. the default ``~/.local/share/sitecloud`` under root's 0700 ``/root``)
keeps only the worker's private files (keys, config, state); the content cache (``blobs/``,
``packs/``, ``sites/``, ``trash/``), ``apps/`` and ``run/`` then live in a root-owned, search-only directory
``/var/lib/sitecloud/apps-<hash of the home>`` instead. Blobs move with the version trees: those are
hard links to them, which need one filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import stat
from pathlib import Path

from roles.worker.config import WorkerConfig
from shared.errors import Unavailable
from shared.logs import ContextLogger

__all__ = [
    "APPS_BASE",
    "CACHE_DIRS",
    "apps_root",
    "apps_root_home",
    "prepare_apps_root",
    "searchable_by_others",
]

APPS_BASE = Path("/var/lib/sitecloud")
# What lives in the apps root (beside the home's tls/, state/, role.json).
CACHE_DIRS = ("blobs", "packs", "sites", "trash", "apps")
# The content cache, which the fileserver has: dropped when the root outlives its home.
STALE_ON_NEW_HOME = ("blobs", "packs", "sites", "trash")


def searchable_by_others(path: Path) -> bool:
    """Whether another uid can pass through every directory from ``/`` down to ``path``."""
    real = Path(os.path.realpath(path))
    for d in (real, *real.parents):
        try:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
        except FileNotFoundError:
            continue  # made later, with our modes
    return True


def apps_root(config: WorkerConfig) -> Path:
    """The configured ``apps_dir``; else the home when apps can reach it (or run as the worker's
    own user); else a directory of this home's own under :data:`APPS_BASE`."""
    if config.apps_dir is not None:
        return config.apps_dir
    if os.geteuid() != 0 or searchable_by_others(config.home):
        return config.home
    digest = hashlib.sha256(os.path.realpath(config.home).encode()).hexdigest()[:12]
    return APPS_BASE / f"apps-{digest}"


def apps_root_home(root: Path) -> str | None:
    """The worker home an apps root under :data:`APPS_BASE` belongs to, from its marker (its first
    line; the second is the token tying the two together); None when it has none."""
    try:
        lines = (root / "role-home").read_text().splitlines()
    except OSError:
        return None
    return lines[0].strip() if lines else None


def _claim_apps_root(config: WorkerConfig, root: Path, log: ContextLogger) -> None:
    """Tie the apps root to this home: a home made again at the same path (a new cloud) must not
    serve the content cached for the old one, whose version numbers the new fileserver reuses."""
    token_file = config.home / "apps-root-id"
    marker = root / "role-home"  # whose this is, for an admin cleaning up /var/lib/sitecloud
    token = token_file.read_text().strip() if token_file.exists() else ""
    claimed = marker.read_text().splitlines() if marker.exists() else []
    if token and claimed[1:2] == [token]:
        return
    stale = [name for name in STALE_ON_NEW_HOME if (root / name).exists()]
    for name in stale:
        shutil.rmtree(root / name, ignore_errors=True)
    if stale:
        log.info("dropped %s cached in %s for an earlier home at this path", ", ".join(stale), root)
    token = token or secrets.token_hex(16)
    token_file.write_text(f"{token}\n")
    marker.write_text(f"{os.path.realpath(config.home)}\n{token}\n")
    os.chmod(marker, 0o600)


def prepare_apps_root(config: WorkerConfig, root: Path, log: ContextLogger) -> None:
    """Create the apps root (root-owned, 0711, when running as root) and move an older cache into it."""
    if root == config.home:
        return
    if os.geteuid() == 0:
        if not root.parent.exists():
            root.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(root.parent, 0o711)  # noqa: S103 - search only, as the apps root itself
        with contextlib.suppress(FileExistsError):
            root.mkdir(mode=0o711)
        st = root.lstat()
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0:
            raise Unavailable(f"{root} is not a directory owned by root; site content cannot go there")
        os.chmod(root, 0o711)  # noqa: S103 - search only: a site reaches its own directory
        if not searchable_by_others(root):
            log.warning("apps dir %s is not searchable by other users: dynamic sites will fail", root)
    else:
        root.mkdir(parents=True, exist_ok=True)
    _claim_apps_root(config, root, log)
    for name in CACHE_DIRS:
        old, new = config.home / name, root / name
        if not old.is_dir() or new.exists():
            continue
        try:
            os.rename(old, new)
            log.info("moved %s to %s (apps must reach it)", old, new)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # Another filesystem: the fileserver has the content; it is pulled again.
            shutil.rmtree(old, ignore_errors=True)
            log.info("dropped %s (content is pulled again into %s)", old, new)
