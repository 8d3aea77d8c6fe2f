"""A Python site's ``requirements.txt``, installed into a package directory of its own at publish time.

The directory is named by a hash of the requirements, so a publish that keeps them reuses the install
and a change builds the new one beside the old. pip runs as the worker (root), outside the sandbox, so
the tenant's file is a trust boundary (:func:`checked_requirements`): only named requirements from the
host's pip configuration (or the index the admin set) reach pip -- no options (``-r``, ``-e``, ``--index-url``, ``-f``), no paths,
no URLs, no direct references, any of which would make pip read host files or build (run) tenant code
as root, and no ``${NAME}``, which pip fills in from the worker's environment and prints in its
errors -- and wheels only (``--only-binary=:all:``), so installing runs no code from the index.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sys
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from roles.worker.apps._build import failure_lines, run_logged
from roles.worker.apps._sitelog import SiteLog
from shared.errors import BuildFailed, InvalidInput

__all__ = ["checked_requirements", "install_requirements", "packages_dir", "prune_packages"]

MAX_REQUIREMENTS = 500

INSTALL_TIMEOUT = 600.0
# ``package_index_url`` that turns installs off.
NO_INDEX = "none"
# Installs take wheels only: a package the index has only as source is "not found" too.
_WHEELS = "each package must be on the index as a wheel for the site's Python"
# What pip may take from the worker's environment: where packages come from and how to reach it
# (the host's pip configuration, as ``pip install`` on the host would use it), nothing that changes
# where or what it installs.
_PIP_ENV = (
    "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_CERT", "PIP_CLIENT_CERT",
    "PIP_TRUSTED_HOST", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES", "PIP_PROXY", "PIP_CONFIG_FILE",
    "PIP_CONSTRAINT", "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "XDG_CONFIG_DIRS",
)  # fmt: skip


def _pip_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in _PIP_ENV}
    return {**env, "PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(home), "PIP_NO_COLOR": "1"}


def packages_dir(base: Path, root: str) -> Path | None:
    """Where the site's packages for this version live; None when it has no requirements.txt."""
    try:
        data = Path(root, "requirements.txt").read_bytes()
    except OSError:
        return None
    return base / f"packages-{hashlib.sha256(data).hexdigest()[:16]}"


def checked_requirements(text: str) -> list[str]:
    """The requirement lines of a site's requirements.txt that pip may be given, normalised; anything
    else is refused with the line that is wrong (the site's log shows it)."""
    lines: list[str] = []
    pending = ""
    for number, raw in enumerate(text.splitlines(), 1):
        line = pending + raw
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        pending = ""
        # A comment starts at '#' at the start or after whitespace (pip's own rule).
        for i, ch in enumerate(line):
            if ch == "#" and (i == 0 or line[i - 1].isspace()):
                line = line[:i]
                break
        line = line.strip()
        if not line:
            continue
        if line.startswith("-"):
            raise InvalidInput(
                f"requirements.txt line {number}: options such as {line.split()[0]!r} are not allowed",
                hint="list packages by name (e.g. flask==3.0.3); the index is the platform's",
            )
        if "$" in line:
            # pip replaces ${NAME} with the worker's environment (its index credentials, proxies)
            # and prints the line back in its errors, which reach the tenant.
            raise InvalidInput(
                f"requirements.txt line {number}: environment variables ('$') are not allowed",
                hint="write the version out (e.g. flask==3.0.3)",
            )
        try:
            req = Requirement(line)
        except InvalidRequirement:
            raise InvalidInput(
                f"requirements.txt line {number} is not a package requirement: {line[:80]!r}",
                hint="list packages by name and version (e.g. flask==3.0.3); paths and URLs are not allowed",
            ) from None
        if req.url is not None:
            raise InvalidInput(
                f"requirements.txt line {number}: direct references ({req.name} @ ...) are not allowed",
                hint="name the package and a version; it comes from the platform's index",
            )
        lines.append(str(req))
        if len(lines) > MAX_REQUIREMENTS:
            raise InvalidInput(f"requirements.txt lists more than {MAX_REQUIREMENTS} packages")
    return lines


async def install_requirements(*, root: str, target: Path, index_url: str, python: str, log: SiteLog) -> bool:
    """Install into ``target`` unless it is there; False (logged) when installs are off here. A
    requirements.txt that cannot be installed raises :class:`BuildFailed` (logged too)."""
    if (target / ".complete").exists():
        return True
    if index_url == NO_INDEX:
        log.write(
            "worker",
            "requirements.txt found but installs are off on this worker (package_index_url is "
            f"{NO_INDEX!r}); skipping the install",
        )
        return False
    try:
        wanted = checked_requirements(await asyncio.to_thread(_read_text, Path(root, "requirements.txt")))
    except (OSError, UnicodeDecodeError) as exc:
        log.write("worker", f"requirements.txt cannot be read as UTF-8 text ({exc}); not installed")
        raise BuildFailed(f"requirements.txt cannot be read as UTF-8 text ({exc})") from None
    except InvalidInput as exc:
        log.write("worker", f"{exc}; not installed ({exc.hint})")
        raise BuildFailed(exc.message, hint=exc.hint) from None
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    checked = target.with_name(target.name + ".requirements.txt")
    await asyncio.to_thread(checked.write_text, "".join(f"{line}\n" for line in wanted))
    log.write("worker", f"installing requirements.txt from {index_url or 'the host pip configuration'}")
    version = await _python_version(python)
    argv = [
        sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-input",
        "--no-cache-dir", "--only-binary=:all:", "--target", str(building),
        *(["--index-url", index_url] if index_url else []),
        "--python-version", version, "-r", checked.name,
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=_pip_env(target.parent),
        # Named relative to it, so pip's lines (which reach the deployer) show no path of the host.
        cwd=target.parent,
    )
    step = await run_logged(proc, log, timeout=INSTALL_TIMEOUT)
    checked.unlink(missing_ok=True)
    if step.status != 0:
        shutil.rmtree(building, ignore_errors=True)
        why = (
            f"took longer than {INSTALL_TIMEOUT:.0f} s"
            if step.status is None
            else f"failed (pip exit {step.status})"
        )
        log.write("worker", f"installing requirements.txt {why}")
        raise BuildFailed(
            "\n".join([f"installing requirements.txt {why}:", *failure_lines(step.tail)]), hint=_WHEELS
        )
    _point_scripts_at(building / "bin", python)
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


# Installed package directories of a site, Python's and Node's (the ``.building`` ones are in progress).
_PACKAGE_DIRS = ("packages-*", "node-packages-*")


def prune_packages(base: Path, in_use: Path, *, building: set[Path]) -> list[str]:
    """Blocking: remove the site's installed package directories but ``in_use`` and the newest
    other one (an instance of the version before may still run on it; a rollback finds it ready).
    Each publish that changes requirements.txt installs beside the old one, and these live outside
    the site's storage quota, so they are pruned rather than kept. Returns the names removed."""
    found: list[tuple[float, Path]] = []
    for pattern in _PACKAGE_DIRS:
        for path in base.glob(pattern):
            if path == in_use or path in building or not path.is_dir() or path.name.endswith(".building"):
                continue
            try:
                found.append((path.stat().st_mtime, path))
            except OSError:
                continue
    found.sort(reverse=True)
    removed = []
    for _, path in found[1:]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def _point_scripts_at(scripts: Path, python: str) -> None:
    """pip writes the scripts it installs (gunicorn, uvicorn) to run under the Python that ran pip,
    the worker's; a Procfile runs them under the apps' Python."""
    try:
        entries = list(scripts.iterdir())
    except OSError:
        return
    for path in entries:
        if path.is_symlink() or not path.is_file():
            continue
        data = path.read_bytes()
        end = data.find(b"\n")
        if data.startswith(b"#!") and b"python" in data[:end]:
            path.write_bytes(b"#!" + os.fsencode(python) + data[end:])


def _read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="strict")


async def _python_version(python: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])",
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return out.decode().strip() or "{}.{}".format(*sys.version_info[:2])
