"""A Python site's ``requirements.txt``, installed into a package directory of its own at publish time.

The directory is named by a hash of the requirements, so a publish that keeps them reuses the install
and a change builds the new one beside the old. Wheels only (``--only-binary=:all:``): installing runs
no code from the index, since pip runs as the worker. The index is the one the admin configured.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sys
from pathlib import Path

from roles.worker.apps._sitelog import SiteLog
from shared.errors import Unavailable

__all__ = ["install_requirements", "packages_dir"]

INSTALL_TIMEOUT = 600.0


def packages_dir(base: Path, root: str) -> Path | None:
    """Where the site's packages for this version live; None when it has no requirements.txt."""
    try:
        data = Path(root, "requirements.txt").read_bytes()
    except OSError:
        return None
    return base / f"packages-{hashlib.sha256(data).hexdigest()[:16]}"


async def install_requirements(*, root: str, target: Path, index_url: str, python: str, log: SiteLog) -> bool:
    """Install into ``target`` unless it is there; False (logged) when it cannot be done."""
    if (target / ".complete").exists():
        return True
    if not index_url:
        log.write(
            "worker",
            "requirements.txt found but this worker has no package index configured "
            "(package_index_url); skipping the install",
        )
        return False
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    log.write("worker", f"installing requirements.txt from {index_url}")
    version = await _python_version(python)
    argv = [
        sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
        "--no-cache-dir", "--only-binary=:all:", "--target", str(building), "--index-url", index_url,
        "--python-version", version, "-r", str(Path(root, "requirements.txt")),
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(target.parent), "PIP_NO_COLOR": "1"},
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), INSTALL_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise Unavailable("installing the site's requirements took too long") from None
    log.write("worker", out.decode("utf-8", "replace")[-4000:] or "(pip said nothing)")
    if proc.returncode != 0:
        log.write("worker", f"installing requirements.txt failed (pip exit {proc.returncode})")
        shutil.rmtree(building, ignore_errors=True)
        return False
    (building / ".complete").write_text("")
    for dirpath, dirnames, filenames in os.walk(building):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)  # noqa: S103 - behind the site's 0750 directory
        for name in filenames:
            path = os.path.join(dirpath, name)
            os.chmod(path, os.stat(path).st_mode & 0o755 | 0o444)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(building, target)
    log.write("worker", "requirements installed")
    return True


async def _python_version(python: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])",
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return out.decode().strip() or "{}.{}".format(*sys.version_info[:2])
