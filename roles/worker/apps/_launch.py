"""How each runtime's process is started: its command line, environment and working directory.

``python`` and ``php`` get a listening unix socket as file descriptor 0, bound by the worker in a
directory only the worker can reach (socket activation: no readiness wait, no path the app or
another site could connect to). ``command`` and ``node`` get ``$PORT``: in a sandbox that port is in the app's
own network namespace, which the worker connects into itself (``_netns.py``); unsandboxed it is a
host loopback port. Either way the worker polls until something listens there.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from roles.worker._appserver import APPSERVER_PATH
from roles.worker.apps._isolation import usable_by_others
from roles.worker.apps._spec import AppLimits, Runtime
from shared.errors import NotSupported

__all__ = [
    "LaunchPlan",
    "SiteDirs",
    "app_threads",
    "appserver_for_apps",
    "compile_appserver",
    "find_php_cgi",
    "node_command",
    "php_children",
    "pick_python",
    "plan_launch",
]

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True, slots=True)
class SiteDirs:
    base: Path  # root:<gid> 0750
    home: Path  # the app's own, 0700
    tmp: Path  # TMPDIR, 0700
    log: Path  # root only: the app cannot rewrite its history

    @classmethod
    def under(cls, apps: Path, number: int) -> SiteDirs:
        base = apps / str(number)
        return cls(base, base / "home", base / "tmp", base / "log")


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    # "unix": the listener goes in as fd 0; "tcp": the process binds $PORT itself, on the host's
    # loopback; "netns": the same in its sandbox's network namespace.
    listen: str
    port: int = 0


def pick_python(configured: str, *, isolate: bool) -> str:
    """The interpreter apps run under: the configured one, else ours if other uids can run it."""
    if configured:
        return configured
    if not isolate or usable_by_others(sys.executable):
        return sys.executable
    return shutil.which("python3", path=SAFE_PATH) or sys.executable


def appserver_for_apps(root: Path, *, isolate: bool) -> str:
    """The directory apps put on PYTHONPATH for our app server: ours where the code is, unless other
    uids cannot read it there (code installed under a private home); then a copy in the apps root."""
    if not isolate or usable_by_others(APPSERVER_PATH, read=True):
        return APPSERVER_PATH
    source = Path(APPSERVER_PATH, "sitecloud_appserver")
    files = sorted(p for p in source.glob("*.py"))
    digest = hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()[:12]
    base = root / f"appserver-{digest}"
    if not (base / "sitecloud_appserver" / "__main__.py").exists():
        building = root / f".appserver-{digest}.building"
        shutil.rmtree(building, ignore_errors=True)
        (building / "sitecloud_appserver").mkdir(parents=True)
        for p in files:
            shutil.copyfile(p, building / "sitecloud_appserver" / p.name)
            os.chmod(building / "sitecloud_appserver" / p.name, 0o644)
        for d in (building, building / "sitecloud_appserver"):
            os.chmod(d, 0o755)  # noqa: S103 - our own code, the same for every site
        os.rename(building, base)
    return str(base)


async def compile_appserver(python: str, appserver: str) -> None:
    """Our app server's bytecode for the apps' Python, made once: apps run with
    PYTHONDONTWRITEBYTECODE (their code is read-only to them), so without it every cold start would
    compile the server again. Best effort: where the directory is not ours to write, apps compile
    it in memory as before."""
    proc = await asyncio.create_subprocess_exec(
        python,
        "-I",
        "-m",
        "compileall",
        "-q",
        os.path.join(appserver, "sitecloud_appserver"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await proc.wait()


def find_php_cgi() -> str | None:
    return shutil.which("php-cgi", path=SAFE_PATH)


def _base_env(site: str, dirs: SiteDirs, settings: tuple[tuple[str, str], ...]) -> dict[str, str]:
    env = dict(settings)
    env.update(
        {
            "PATH": SAFE_PATH,
            "HOME": str(dirs.home),
            "TMPDIR": str(dirs.tmp),
            "LANG": "C.UTF-8",
            "SITECLOUD_SITE": site,
            # Fewer malloc arenas: much less address space per thread, which RLIMIT_AS counts.
            "MALLOC_ARENA_MAX": "2",
        }
    )
    return env


def plan_launch(
    *,
    site: str,
    runtime: Runtime,
    entry: str,
    root: str,
    dirs: SiteDirs,
    settings: tuple[tuple[str, str], ...],
    limits: AppLimits,
    python: str,
    packages: Path | None,
    node_packages: bool = False,
    tools: str = "",
    max_body: int = 32 * 1024 * 1024,
    appserver: str = APPSERVER_PATH,
    port: int = 0,
    sandboxed: bool = False,
) -> LaunchPlan:
    """``sandboxed``: a ``command`` app's $PORT is in its own network namespace. ``packages``: the site's installed packages, Node's
    when ``node_packages``, else Python's; ``tools``: a directory of launchers for every app's PATH."""
    env = _base_env(site, dirs, settings)
    if tools:
        env["PATH"] = f"{tools}:{SAFE_PATH}"
    if runtime == "python":
        path = [appserver] + ([str(packages)] if packages is not None else [])
        env.update({"PYTHONPATH": ":".join(path), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"})
        # -c, not -m: runpy and importlib.util would cost every cold start a few ms.
        argv = [python, "-s", "-c", "from sitecloud_appserver.__main__ import main; main()", "--app", entry]
        argv += ["--threads", str(app_threads(limits))]
        return LaunchPlan(argv, env, root, "unix")
    if runtime == "php":
        php = find_php_cgi()
        if php is None:
            raise NotSupported(
                "this worker has no php-cgi", hint="install it on the worker host: apt-get install php-cgi"
            )
        # php-cgi serves FastCGI on fd 0 when it is a socket; a few children answer at once.
        env.update({"PHP_FCGI_CHILDREN": str(php_children(limits)), "PHP_FCGI_MAX_REQUESTS": "1000"})
        ini = {
            "memory_limit": f"{limits.memory_mb}M",
            "display_errors": "Off",
            "log_errors": "On",
            "upload_tmp_dir": str(dirs.tmp),
            "session.save_path": str(dirs.tmp),
            "sys_temp_dir": str(dirs.tmp),
            "open_basedir": f"{root}:{dirs.tmp}:{dirs.home}",
            "cgi.fix_pathinfo": "0",
            # PHP's own 2 MB would refuse a phone's photo; the worker's body cap (413) is the limit.
            "upload_max_filesize": str(max_body),
            "post_max_size": str(max_body),
        }
        argv = [php]
        for key, value in ini.items():
            argv += ["-d", f"{key}={value}"]
        return LaunchPlan(argv, env, root, "unix")
    if runtime in ("command", "node"):
        env["PORT"] = str(port)
        if runtime == "command" and packages is not None:
            # As on Heroku: the Procfile's command finds what requirements.txt (gunicorn, uvicorn)
            # or package.json installed, by name and by import.
            scripts = packages / "node_modules" / ".bin" if node_packages else packages / "bin"
            env["PATH"] = f"{scripts}:{env['PATH']}"
            if not node_packages:
                env.update(
                    {"PYTHONPATH": str(packages), "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
                )
        if runtime == "node":
            entry = node_command(entry)
            env.setdefault("NODE_ENV", "production")
        command = ["/bin/sh", "-c", f"exec {entry}" if _simple(entry) else entry]
        return LaunchPlan(command, env, root, "netns" if sandboxed else "tcp", port)
    raise NotSupported(f"runtime {runtime!r} runs no process")


def app_threads(limits: AppLimits) -> int:
    """Threads of a WSGI app's server, by its CPU share, as gunicorn's gthread advice goes (a few
    per core: requests wait on I/O): 4 for half a core, 8 for one, 16 for two."""
    return max(4, limits.cpu_percent * 8 // 100)


def php_children(limits: AppLimits) -> int:
    """php-cgi's FastCGI children, by CPU share: 2 for half a core, 4 for one, 8 for two."""
    return max(2, limits.cpu_percent * 4 // 100)


def node_command(entry: str) -> str:
    """A Node app's entry as a command: a script name alone (``server.js``) runs under node."""
    if entry.endswith((".js", ".mjs", ".cjs")) and _simple(entry) and len(shlex.split(entry)) == 1:
        return f"node {entry}"
    return entry


# Words that ``exec`` cannot run as the command: the shell's keywords and its builtins that have no
# program of the same name (``exec cd src`` fails where ``cd src`` works).
_SHELL_WORDS = frozenset(
    {
        "!", "{", "}", "case", "do", "done", "elif", "else", "esac", "fi", "for", "if", "in", "then",
        "until", "while", ".", ":", "alias", "break", "cd", "continue", "eval", "exec", "exit",
        "export", "readonly", "return", "set", "shift", "source", "trap", "ulimit", "umask",
        "unalias", "unset", "wait",
    }
)  # fmt: skip
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def _simple(command: str) -> bool:
    """A plain command (no shell syntax beyond words): exec it so signals reach it, not the shell.
    Not one that starts with a variable assignment (``NODE_ENV=production node app.js``: ``exec``
    would take ``NODE_ENV=production`` for the program) or a shell keyword or builtin."""
    try:
        words = shlex.split(command)
    except ValueError:
        return False
    if not words or _ASSIGNMENT.match(words[0]) or words[0] in _SHELL_WORDS:
        return False
    return not any(c in command for c in ";&|<>`()\n")
