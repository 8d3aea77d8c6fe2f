"""The wheelhouse: the project and all its dependencies as wheels, built once per code version.

Role hosts have no internet (BRIEF rule 6), so the controller builds the wheels here with ``pip wheel``
and ships them. A wheelhouse is keyed by the hash of the code it was built from, kept under
``<root>/<code hash>/`` and reused while the code is the same. It is built in a scratch directory and
renamed into place, so a half-built one is never used.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

from shared.errors import InvalidInput, SitecloudError

__all__ = ["PROJECT_ROOT", "Wheelhouse", "code_hash"]

PROJECT_ROOT = Path(__file__).resolve().parents[3]

# What goes into the project wheel, and so into the code hash.
_PACKAGES = ("roles", "shared")
_TOP_FILES = ("pyproject.toml", "README.md", "LICENSE")
_SUFFIXES = {".py", ".html", ".css", ".ini", ".mako", ".typed", ".js", ".json", ".txt"}
_MARKER = ".complete"
_LOCK_POLL = 0.2
_BUILD_TIMEOUT = 900.0


def _source_files(root: Path) -> Iterator[Path]:
    for name in _TOP_FILES:
        if (root / name).is_file():
            yield root / name
    for package in _PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if "__pycache__" in path.parts or not path.is_file() or path.suffix not in _SUFFIXES:
                continue
            yield path


def code_hash(root: Path = PROJECT_ROOT) -> str:
    """A short hash of the code a wheelhouse would be built from: it changes when any source does."""
    digest = hashlib.sha256()
    for path in _source_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


class Wheelhouse:
    """Wheelhouses under ``root`` (see :attr:`CloudConfig.wheelhouse_dir`), one per code hash."""

    def __init__(self, root: Path, *, project: Path = PROJECT_ROOT, keep: int = 3) -> None:
        self.root = root
        self.project = project
        self.keep = keep

    def path(self, digest: str) -> Path:
        return self.root / digest

    def ready(self, digest: str) -> bool:
        """Whether the wheelhouse of ``digest`` is built (a half-built one never counts)."""
        return (self.path(digest) / _MARKER).exists()

    async def ensure(self) -> tuple[str, Path]:
        """(code hash, directory) of the wheelhouse for the current code; built if not there yet.

        Cancelling it (``up`` stopping while it builds ahead) kills pip and leaves nothing half-built:
        a build in a thread would hold the process's exit until pip finished.
        """
        digest = await asyncio.to_thread(code_hash, self.project)
        target = self.path(digest)
        if not self.ready(digest):
            await self._build_locked(digest, target)
        return digest, target

    def files(self, digest: str) -> list[Path]:
        return sorted(p for p in self.path(digest).iterdir() if p.suffix == ".whl")

    async def _build_locked(self, digest: str, target: Path) -> None:
        if not (self.project / "pyproject.toml").exists():
            raise InvalidInput(
                f"no sitecloud checkout at {self.project} to build a wheelhouse from",
                hint="run the controller from a checkout of sitecloud",
            )
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("w") as lock:
            # Another controller (or test worker) may be building the same one: wait for it, politely
            # (a blocking flock in a thread could not be cancelled).
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    await asyncio.sleep(_LOCK_POLL)
            if (target / _MARKER).exists():
                return
            scratch = Path(tempfile.mkdtemp(prefix=f".build-{digest}-", dir=self.root))
            try:
                await self._build(scratch)
                (scratch / _MARKER).write_text(digest + "\n")
                shutil.rmtree(target, ignore_errors=True)
                os.replace(scratch, target)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            self._prune(keep=self.keep)

    def _prune(self, keep: int) -> None:
        """Drop all but the ``keep`` newest wheelhouses: hosts already installed from older ones."""
        built = sorted(
            (p for p in self.root.iterdir() if (p / _MARKER).exists()),
            key=lambda p: (p / _MARKER).stat().st_mtime,
            reverse=True,
        )
        for old in built[keep:]:
            shutil.rmtree(old, ignore_errors=True)

    async def _build(self, out: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="sitecloud-src-") as src:
            await asyncio.to_thread(self._copy_sources, Path(src))
            argv = [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--disable-pip-version-check",
                "--quiet",
                "--wheel-dir",
                str(out),
                src,
                # pip itself, so a host makes its venv without ensurepip (seconds faster) and still installs.
                f"pip=={version('pip')}",
            ]
            # Niced: it is often built ahead, beside roles that are serving.
            proc = await asyncio.create_subprocess_exec(
                "nice",
                "-n",
                "10",
                *argv,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            try:
                output, _ = await asyncio.wait_for(proc.communicate(), timeout=_BUILD_TIMEOUT)
            except BaseException as exc:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
                if isinstance(exc, TimeoutError):
                    raise SitecloudError(
                        f"building the wheelhouse took over {_BUILD_TIMEOUT:.0f}s and was stopped",
                        hint="check that the package index (or the pip cache) answers",
                    ) from None
                raise
        if proc.returncode != 0:
            tail = "\n".join(output.decode(errors="replace").strip().splitlines()[-15:])
            raise SitecloudError(
                f"building the wheelhouse failed (exit {proc.returncode}): {tail}",
                hint="the controller needs pip and access to a package index (or a warm pip cache)",
            )

    def _copy_sources(self, dest_root: Path) -> None:
        # Build from a copy of exactly the hashed files: the checkout gets no build/ or egg-info, and
        # the wheel holds what the hash says.
        for path in _source_files(self.project):
            dest = dest_root / path.relative_to(self.project)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
