"""A Node site's ``package.json`` dependencies, installed by npm into a package directory of its own.

As with ``requirements.txt`` (``_packages.py``): the directory is named by a hash of ``package.json``
and ``package-lock.json``, built once per package set outside the request path; a failure is in the
site's log and fails the deploy that caused it. npm runs as the worker, outside the sandbox, so
the tenant's two files are a trust boundary (:func:`checked_manifest`): dependencies are registry
packages only -- no ``file:``/``link:`` paths, git, URLs or workspaces, any of which would make npm
read host files or fetch from anywhere -- and a lock file may only point at the registry. npm runs
with ``--ignore-scripts``: no install script of any package (or of the site) runs as root, so
packages that compile native code at install time do not work, as pip's wheels-only rule.

The app finds the packages by Node's own lookup: ``<site dir>/node_modules`` (a link to the package
directory) is an ancestor of every version's directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from roles.worker.apps._build import failure_lines, run_logged
from roles.worker.apps._sitelog import SiteLog
from shared.errors import BuildFailed, InvalidInput

__all__ = [
    "NO_REGISTRY",
    "build_command",
    "checked_manifest",
    "install_node_packages",
    "link_node_modules",
    "node_packages_dir",
]

INSTALL_TIMEOUT = 600.0
# ``npm_registry`` that turns installs off.
NO_REGISTRY = "none"
MAX_MANIFEST = 4 * 1024 * 1024
MAX_PACKAGES = 5000
NPMJS = "https://registry.npmjs.org/"
_DEP_FIELDS = ("dependencies", "devDependencies", "optionalDependencies", "peerDependencies")
# npm's package names: lower-case, URL-safe, optionally scoped.
_NAME = re.compile(r"^(@[a-z0-9][a-z0-9._~-]*/)?[a-z0-9][a-z0-9._~-]*$")
# A registry spec: a version, a range or a dist-tag (``^4.19.2``, ``>=1 <2``, ``1.x``, ``latest``).
_RANGE = re.compile(r"^[0-9A-Za-z.*^~<>=|+\- ]{0,200}$")
_ALIAS = re.compile(r"^npm:((?:@[a-z0-9][a-z0-9._~-]*/)?[a-z0-9][a-z0-9._~-]*)(?:@(.*))?$")
# What npm may take from the worker's environment: where packages come from and how to reach it.
_NPM_ENV = frozenset(
    {
        "npm_config_registry", "npm_config_proxy", "npm_config_https_proxy", "npm_config_noproxy",
        "npm_config_cafile", "npm_config_ca", "npm_config_strict_ssl", "npm_config_fetch_retries",
        "npm_config_fetch_timeout", "npm_config_userconfig", "npm_config_globalconfig",
        "http_proxy", "https_proxy", "no_proxy", "ssl_cert_file", "node_extra_ca_certs",
    }
)  # fmt: skip


def build_script(pkg: object) -> str | None:
    """The ``build`` script of a parsed package.json (``tsc``, ``vite build``), or None."""
    scripts = pkg.get("scripts") if isinstance(pkg, dict) else None
    script = scripts.get("build") if isinstance(scripts, dict) else None
    return script if isinstance(script, str) and script.strip() else None


def _parsed(root: str) -> object:
    try:
        with open(os.path.join(root, "package.json"), "rb") as f:
            return json.loads(f.read(MAX_MANIFEST))
    except (OSError, ValueError):
        return None


def build_command(root: str) -> str | None:
    """What builds a Node app before it starts, as Heroku and App Service do: ``npm run build`` when
    its package.json has a ``build`` script (TypeScript compiled to ``dist/``, a bundle), else None."""
    if build_script(_parsed(root)) is None:
        return None
    return "npm --no-update-notifier --no-fund --no-audit run build"


def node_packages_dir(base: Path, root: str) -> Path | None:
    """Where the site's Node packages for this version live; None when its package.json lists none.

    An app with a build script gets its devDependencies too (the compiler, the bundler): a
    package set of its own, so one installed without them is never taken for it."""
    try:
        manifest = Path(root, "package.json").read_bytes()
    except OSError:
        return None
    try:
        lock = Path(root, "package-lock.json").read_bytes()
    except OSError:
        lock = b""
    try:
        parsed = json.loads(manifest)
    except ValueError:
        parsed = None
    builds = build_script(parsed) is not None
    fields = ("dependencies", "optionalDependencies", *(("devDependencies",) if builds else ()))
    if isinstance(parsed, dict) and not any(parsed.get(f) for f in fields):
        return None
    digest = hashlib.sha256(manifest + b"\0" + lock + (b"\0dev" if builds else b"")).hexdigest()[:16]
    return base / f"node-packages-{digest}"


def _object(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_MANIFEST:
        raise InvalidInput(f"{what} is larger than {MAX_MANIFEST // 2**20} MB")
    try:
        parsed = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{what} is not valid JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise InvalidInput(f"{what} must be a JSON object")
    return parsed


def _check_spec(where: str, name: Any, spec: Any) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidInput(f"{where}: {str(name)[:80]!r} is not an npm package name")
    if not isinstance(spec, str):
        raise InvalidInput(f"{where}: the version of {name} must be a string")
    alias = _ALIAS.match(spec)
    if alias is not None:
        spec = alias.group(2) or ""
    if not _RANGE.match(spec):
        raise InvalidInput(
            f"{where}: {name} is {spec[:80]!r}; only versions, ranges and tags from the registry are "
            "allowed here",
            hint="file:, link:, git and URL dependencies are not installed; publish the package to the registry",
        )


def checked_manifest(manifest: bytes, lock: bytes | None, registries: tuple[str, ...]) -> None:
    """Refuse (InvalidInput, with what is wrong) a package.json or package-lock.json npm may not be
    given: anything but registry dependencies, and a lock file whose packages come from elsewhere
    than ``registries`` (URL prefixes)."""
    pkg = _object(manifest, "package.json")
    if "workspaces" in pkg:
        raise InvalidInput("package.json: workspaces are not installed here", hint="publish one app per site")
    count = 0
    for field in _DEP_FIELDS:
        deps = pkg.get(field, {})
        if not isinstance(deps, dict):
            raise InvalidInput(f"package.json: {field} must be an object of package names and versions")
        for name, spec in deps.items():
            _check_spec(f"package.json {field}", name, spec)
            count += 1
    if count > MAX_PACKAGES:
        raise InvalidInput(f"package.json lists more than {MAX_PACKAGES} packages")
    for field in ("bundleDependencies", "bundledDependencies"):
        if pkg.get(field):
            raise InvalidInput(f"package.json: {field} are not installed here")
    if "overrides" in pkg:
        raise InvalidInput("package.json: overrides are not supported here", hint="pin the versions instead")
    if lock is None:
        return
    locked = _object(lock, "package-lock.json")
    version = locked.get("lockfileVersion")
    if version not in (2, 3) or not isinstance(locked.get("packages"), dict):
        raise InvalidInput(
            f"package-lock.json has lockfileVersion {version!r}; only 2 and 3 (npm 7 and later) are read",
            hint="run npm install with npm 7 or later, or publish without the lock file",
        )
    packages: dict[str, Any] = locked["packages"]
    if len(packages) > MAX_PACKAGES:
        raise InvalidInput(f"package-lock.json lists more than {MAX_PACKAGES} packages")
    for key, entry in packages.items():
        if key == "":
            continue
        where = f"package-lock.json {key[:80]!r}"
        if not isinstance(entry, dict):
            raise InvalidInput(f"{where} is not an object")
        parts = key.split("node_modules/")
        if parts[0] != "" or any(not _NAME.match(p.rstrip("/")) for p in parts[1:]):
            raise InvalidInput(
                f"{where} is not a package under node_modules (workspaces and links are not installed)"
            )
        if entry.get("link"):
            raise InvalidInput(f"{where} is a link to a local folder; only registry packages are installed")
        resolved = entry.get("resolved")
        if resolved is None:
            continue
        if not isinstance(resolved, str) or not any(resolved.startswith(r) for r in registries):
            raise InvalidInput(
                f"{where} comes from {str(resolved)[:120]!r}, not from the registry",
                hint=f"packages are installed from {' or '.join(registries)} only",
            )
        if ".." in resolved.split("?", 1)[0].split("/"):
            raise InvalidInput(f"{where} has a resolved address with '..' in it")


def _npm_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() in _NPM_ENV}
    if not any(k.lower() == "npm_config_userconfig" for k in env):
        # The worker user's own ~/.npmrc, as `npm install` on the host would read it (HOME moves below).
        user = Path(pwd.getpwuid(os.geteuid()).pw_dir, ".npmrc")
        if user.exists():
            env["npm_config_userconfig"] = str(user)
    return {
        **env,
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "NO_COLOR": "1",
        "npm_config_update_notifier": "false",
        "npm_config_fund": "false",
        "npm_config_audit": "false",
    }


async def _configured_registry(env: dict[str, str]) -> str:
    proc = await asyncio.create_subprocess_exec(
        "npm", "config", "get", "registry",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        env=env,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return out.decode("utf-8", "replace").strip()


def _prefix(url: str) -> str:
    return url if url.endswith("/") else url + "/"


async def install_node_packages(*, root: str, target: Path, registry: str, log: SiteLog) -> bool:
    """``npm ci`` (with a lock file) or ``npm install`` into ``target`` unless it is there; False
    (logged) when installs are off here or there is no npm. A package.json that cannot be installed
    raises :class:`BuildFailed` (logged too)."""
    if (target / ".complete").exists():
        return True
    if registry == NO_REGISTRY:
        log.write(
            "worker",
            f"package.json found but npm installs are off on this worker (npm_registry is {NO_REGISTRY!r}); "
            "skipping the install",
        )
        return False
    npm = shutil.which("npm", path="/usr/local/bin:/usr/bin:/bin")
    if npm is None:
        log.write("worker", "package.json found but this worker has no npm (apt-get install npm); skipping")
        return False
    try:
        manifest, lock = await asyncio.to_thread(_read_manifest, root)
    except OSError as exc:
        log.write("worker", f"package.json cannot be read ({exc}); not installed")
        raise BuildFailed(f"package.json cannot be read ({exc})") from None
    building = target.with_name(target.name + ".building")
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(mode=0o700)
    scratch = Path(tempfile.mkdtemp(prefix=".npm-", dir=target.parent))
    env = _npm_env(scratch)
    try:
        host_registry = registry or await _configured_registry(env)
        registries = tuple(dict.fromkeys(_prefix(r) for r in (NPMJS, host_registry) if r))
        try:
            checked_manifest(manifest, lock, registries)
        except InvalidInput as exc:
            log.write("worker", f"{exc}; not installed" + (f" ({exc.hint})" if exc.hint else ""))
            raise BuildFailed(exc.message, hint=exc.hint) from None
        (building / "package.json").write_bytes(manifest)
        if lock is not None:
            (building / "package-lock.json").write_bytes(lock)
        verb = ["ci"] if lock is not None else ["install", "--no-package-lock"]
        # The build needs its tools; an app that builds nothing gets what it runs with only.
        omit = [] if build_script(json.loads(manifest)) is not None else ["--omit=dev"]
        argv = [
            npm, *verb, *omit, "--ignore-scripts", "--no-audit", "--no-fund", "--no-update-notifier",
            "--loglevel=warn", "--cache", str(scratch / "cache"), "--logs-dir", str(scratch / "logs"),
            *(["--registry", registry] if registry else []),
        ]  # fmt: skip
        log.write("worker", f"installing package.json with npm {verb[0]} from {registry or host_registry}")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=building,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        step = await run_logged(proc, log, timeout=INSTALL_TIMEOUT)
        if step.status != 0:
            why = (
                f"took longer than {INSTALL_TIMEOUT:.0f} s (npm {verb[0]} was stopped)"
                if step.status is None
                else f"failed (npm exit {step.status})"
            )
            log.write("worker", f"installing package.json {why}")
            raise BuildFailed("\n".join([f"installing package.json {why}:", *failure_lines(step.tail)]))
        await asyncio.to_thread(_finish, building, target)
        log.write("worker", "node packages installed")
        return True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(building, ignore_errors=True)


def _read_manifest(root: str) -> tuple[bytes, bytes | None]:
    manifest = Path(root, "package.json").read_bytes()
    try:
        return manifest, Path(root, "package-lock.json").read_bytes()
    except FileNotFoundError:
        return manifest, None


def _finish(building: Path, target: Path) -> None:
    (building / ".complete").write_text("")
    for dirpath, dirnames, filenames in os.walk(building):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)  # noqa: S103 - behind the site's 0750 directory
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode & 0o755 | 0o444)
    os.chmod(building, 0o755)  # noqa: S103 - as above
    shutil.rmtree(target, ignore_errors=True)
    os.rename(building, target)


def link_node_modules(site_dir: Path, packages: Path | None) -> None:
    """Point ``<site dir>/node_modules`` at the package directory (or remove it): Node looks for
    packages in every ancestor of the app's directory, and a version's own directory is read-only."""
    link = site_dir / "node_modules"
    if packages is None:
        if link.is_symlink():
            link.unlink(missing_ok=True)
        return
    wanted = str(packages / "node_modules")
    try:
        if os.readlink(link) == wanted:
            return
    except OSError:
        pass
    temp = site_dir / f".node_modules-{os.getpid()}"
    temp.unlink(missing_ok=True)
    os.symlink(wanted, temp)
    os.replace(temp, link)
