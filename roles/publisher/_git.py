"""Deploy by ``git push``: git's smart HTTP served by Debian's ``git http-backend`` CGI, one bare
repository per site in the publisher's home.

``git push https://<user>:<password>@<publisher>:<deploy port>/<site>.git main`` authenticates with the
site's publishing credentials (the shared login throttle applies), then ``git http-backend`` runs for
that one request. A push that moves ``main`` or ``master`` is exported with ``git archive`` and deployed
as one version through the zip deploy's own path; the outcome reaches the pusher as ``remote:`` lines on
git's side band (band 2, as a ``post-receive`` hook's output would). A deploy that fails puts the
branch back where it was, so pushing again retries it.

The trust boundary: the repository path comes only from a validated site name and the site's uid (a
deleted and re-created site gets a fresh repository); hooks are the publisher's own (``core.hooksPath``
outside any repository, nothing a push can write); ``GIT_PROJECT_ROOT`` names that one site's
directory, set per request; request bodies are capped at ``max_deploy_bytes`` and a push's pack at
the site's storage quota (``receive.maxInputSize``, set per push), so git refuses a bigger one while it
arrives. A push git accepts but the deploy refuses leaves objects no ref reaches (``gc.auto`` is off):
they are dropped after it (``git gc --prune=now``), off the request path, under the site's push lock.
A pushed tree's own ``export-subst`` attribute is overridden (its expansion has no bound).
A pushed tree is listed before it is exported: one naming more files than a zip may hold, or more
bytes than the quota (trees naming trees many times make millions of files of a few KB), is refused.
The repository itself, history included, may hold at most the site's storage quota: a push that would
take it past that is refused (its branch put back, its objects dropped), after a ``git gc`` has
dropped what no branch reaches any more (the old history a ``--force`` push replaced).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import BasicAuth, web

from roles.publisher._deploy import Deployer
from roles.publisher._sites import SiteInfo, SiteTable
from roles.publisher.config import PublisherConfig
from shared.contracts.content import SITE_ENTRIES_MAX
from shared.errors import (
    BadRequest,
    InvalidInput,
    NotFound,
    NotServed,
    QuotaExceeded,
    SitecloudError,
    Unavailable,
)
from shared.logs import ContextLogger, get_logger
from shared.names import validate_site_name
from shared.paths import MAX_PATH_BYTES

__all__ = ["GitDeploy"]

_CHUNK = 64 * 1024
_DEPLOYED = ("refs/heads/main", "refs/heads/master")
_SERVICES = ("git-receive-pack", "git-upload-pack")
# Longest a pushed response may be buffered before the deploy's lines are added to it.
_MAX_REPORT = 4 * 1024 * 1024
# The longest band-2 payload one pkt-line carries (side-band-64k).
_MAX_BAND = 65515
# What index-pack says past receive.maxInputSize (LANG=C).
_PACK_TOO_BIG = b"pack exceeds maximum allowed size"
# What outranks every .gitattributes of a pushed tree ($GIT_DIR/info/attributes is read first):
# export-subst would expand each $Format:%B$ to the whole commit message, so a few KB of file would
# make git archive build gigabytes, in memory.
_ATTRIBUTES = "* -export-subst\n"
# Longest ``ls-tree --long`` record read: mode, type, object id, size and a path zipsafe would take.
_MAX_RECORD = MAX_PATH_BYTES + 256

# Refuses every ref but the two that deploy, and deleting them; tenants never write hooks. An
# ``update`` hook, run per ref, not a pre-receive one: a push of main with a tag (``--follow-tags``)
# deploys main and refuses only the tag, where a pre-receive hook refused the whole push.
_UPDATE = """#!/bin/sh
# Written by the sitecloud publisher: only a push to main or master deploys.
ref="$1" new="$3"
case "$ref" in
  refs/heads/main|refs/heads/master)
    if [ "$new" = "0000000000000000000000000000000000000000" ]; then
      echo "sitecloud: $ref cannot be deleted: it is the branch the site deploys from" >&2
      exit 1
    fi ;;
  *)
    echo "sitecloud: $ref refused: only a push to main or master deploys this site" >&2
    echo "sitecloud: push with 'git push <remote> HEAD:main'" >&2
    exit 1 ;;
esac
exit 0
"""


def _pkt(payload: bytes) -> bytes:
    return f"{len(payload) + 4:04x}".encode() + payload


def _progress(text: str) -> bytes:
    """``text`` as band-2 pkt-lines, which git prints as ``remote: ...``."""
    data = text.encode()
    return b"".join(_pkt(b"\x02" + data[i : i + _MAX_BAND]) for i in range(0, len(data), _MAX_BAND))


def _split_report(body: bytes) -> tuple[bytes, bool] | None:
    """git's report to a push without its closing flush-pkt, and whether it had one; None unless the
    report is multiplexed on side bands (every pkt-line starts with a band number), so band-2 lines
    may be added to it."""
    at = 0
    while at < len(body):
        try:
            length = int(body[at : at + 4], 16)
        except ValueError:
            return None
        if length == 0:
            if at + 4 == len(body):
                return body[:at], True
            at += 4
            continue
        if length < 5 or body[at + 4 : at + 5] not in (b"\x01", b"\x02", b"\x03") or at + length > len(body):
            return None
        at += length
    return body, False


def _plain_errors(
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """git shows an HTTP error's body to the pusher only as text/plain (each line as ``remote:``):
    a refusal (a suspended subscription, a full quota) is said that way rather than as JSON. A 401
    stays as it is: git answers it by asking for the password."""

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except SitecloudError as err:
            if err.status == 401:
                raise
            text = f"sitecloud: {err.message}\n" + (f"sitecloud: {err.hint}\n" if err.hint else "")
            return web.Response(status=err.status, text=text, content_type="text/plain")

    return handle


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _pkt_lines(data: bytes) -> list[bytes] | None:
    """``data`` cut into its pkt-lines (a flush-pkt as b""); None unless it is exactly pkt-lines."""
    lines: list[bytes] = []
    at = 0
    while at < len(data):
        try:
            length = int(data[at : at + 4], 16)
        except ValueError:
            return None
        if length == 0:
            lines.append(b"")
            at += 4
            continue
        if length < 4 or at + length > len(data):
            return None
        lines.append(data[at + 4 : at + length])
        at += length
    return lines


def _encode(lines: list[bytes]) -> bytes:
    return b"".join(_pkt(line) if line else b"0000" for line in lines)


def _rejected_status(status: bytes, ref: str, why: str) -> bytes | None:
    """A report-status (v1 or v2, as git's ``send-pack`` reads it) with ``ok <ref>`` turned into
    ``ng <ref> <why>``, the ``option`` lines v2 puts after an ``ok`` dropped with it."""
    lines = _pkt_lines(status)
    if lines is None:
        return None
    out: list[bytes] = []
    dropping = False
    for line in lines:
        if dropping and line.startswith(b"option "):
            continue
        dropping = line.rstrip(b"\n") == f"ok {ref}".encode()
        out.append(f"ng {ref} {why}\n".encode() if dropping else line)
    return _encode(out)


def _rejected(report: bytes, ref: str, why: str) -> bytes:
    """git's answer to a push with ``ref`` reported as refused for ``why``: in the report-status
    itself, or in band 1 when the answer is multiplexed on side bands (the other bands kept)."""
    packets = _pkt_lines(report)
    if packets is None:
        return report
    if not all(p == b"" or p[:1] in (b"\x01", b"\x02", b"\x03") for p in packets):
        return _rejected_status(report, ref, why) or report
    status = b"".join(p[1:] for p in packets if p[:1] == b"\x01")
    rewritten = _rejected_status(status, ref, why)
    if rewritten is None:
        return report
    others = [p for p in packets if p and p[:1] != b"\x01"]
    band1 = [b"\x01" + rewritten[i : i + _MAX_BAND] for i in range(0, len(rewritten), _MAX_BAND)]
    flushed = [b""] if packets and packets[-1] == b"" else []
    return _encode([*others, *band1, *flushed])


def _bytes_on_disk(root: Path) -> int:
    """Blocking: the bytes of every file under ``root`` (a repository's objects)."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _mb(size: int) -> str:
    return f"{size / 2**20:.1f} MB"


def _pin_attributes(repo: Path) -> None:
    """Blocking: the repository's own attributes in place (a repository made before them gets them)."""
    path = repo / "info" / "attributes"
    with contextlib.suppress(OSError):
        if path.read_text() == _ATTRIBUTES:
            return
    path.parent.mkdir(exist_ok=True)
    fresh = path.with_name("attributes.new")
    fresh.write_text(_ATTRIBUTES)
    fresh.replace(path)


def _remove_quarantines(objects: Path) -> None:
    """Blocking: what pushes killed midway left (git 2.35 and later name it tmp_objdir-incoming-*,
    before that incoming-*). Only while no push of the repository is in flight: none is live then."""
    for pattern in ("tmp_objdir-*", "incoming-*"):
        for quarantine in objects.glob(pattern):
            shutil.rmtree(quarantine, ignore_errors=True)


class _Cgi:
    """One ``git http-backend`` run: CGI headers parsed, body readable."""

    def __init__(self, proc: asyncio.subprocess.Process, log: ContextLogger) -> None:
        self.proc = proc
        self.status = 200
        self.headers: dict[str, str] = {}
        self.too_big = False
        # Killed mid-push, git leaves what it received in a quarantine directory of the repository.
        self.killed = False
        self._log = log
        # Drained all along, so git never blocks on a full stderr pipe; logged when it ends.
        self._stderr = asyncio.create_task(self._drain_stderr())

    async def _drain_stderr(self) -> bytes:
        assert self.proc.stderr is not None
        kept = b""
        while chunk := await self.proc.stderr.read(_CHUNK):
            kept = (kept + chunk)[:4096]
        return kept

    async def wait(self, *, kill: bool = False) -> None:
        if kill and self.proc.returncode is None:
            self.killed = True
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()
        errors = await self._stderr
        if errors.strip():
            self._log.info("git http-backend: %s", errors.decode(errors="replace").strip())

    async def read_headers(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line or line in (b"\r\n", b"\n"):
                return
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip(), value.strip()
            if name.lower() == "status":
                self.status = int(value.split()[0])
            else:
                self.headers[name] = value


class GitDeploy:
    def __init__(self, config: PublisherConfig, sites: SiteTable, deployer: Deployer) -> None:
        self._config = config
        self._sites = sites
        self._deployer = deployer
        self._log = get_logger(config.role, host=config.host)
        self._root = config.home / "git"
        self._hooks = config.home / "git-hooks"
        self._git = shutil.which("git")
        # Per site: one push at a time (a push and its deploy are one step); and one repository made
        # at a time, as two first requests could race to create it.
        self._locks: dict[str, asyncio.Lock] = {}
        self._creating = asyncio.Lock()
        # Repositories to drop a refused push's objects from, each with its one pending run.
        self._tidying: dict[Path, asyncio.Task[None]] = {}

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/{site}.git/info/refs", _plain_errors(self._info_refs)),
            web.post("/{site}.git/{service}", _plain_errors(self._service)),
        ]

    # --- the repository of a site

    def _project_root(self, site: SiteInfo) -> Path:
        # The uid makes a re-created site's repository a new one; hashed, so no uid shapes a path.
        tag = hashlib.sha256(site.content_id.encode()).hexdigest()[:16]
        return self._root / f"{site.name}@{tag}"

    async def _run(self, *args: str, cwd: Path, stdin: bytes | None = None) -> tuple[int, bytes]:
        proc = await asyncio.create_subprocess_exec(
            *args,
            cwd=cwd,
            env=self._env(),
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate(stdin)
        return proc.returncode or 0, out

    def _env(self) -> dict[str, str]:
        # No system or user git config: the repository's own, which the publisher writes, is all.
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self._hooks),
            "LANG": "C",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
        }

    def sweep(self) -> None:
        """Remove the repositories of sites this publisher no longer has (deleted, or re-created under
        the same name). Runs in a worker thread after each snapshot."""
        if not self._root.is_dir():
            return
        keep = {self._project_root(site).name for site in self._sites.all()}
        for project in self._root.iterdir():
            if project.name not in keep:
                shutil.rmtree(project, ignore_errors=True)
                self._log.info("git repository %s removed: its site is gone", project.name)

    async def _repository(self, site: SiteInfo) -> Path:
        """The site's bare repository, made on first use."""
        project = self._project_root(site)
        repo = project / f"{site.name}.git"
        if (repo / "config").exists():
            return repo
        async with self._creating:
            if (repo / "config").exists():
                return repo
            return await self._create(site, project, repo)

    async def _create(self, site: SiteInfo, project: Path, repo: Path) -> Path:
        if self._git is None:
            raise Unavailable("git is not installed on this publisher", hint="install Debian's 'git'")
        building = await asyncio.to_thread(self._prepare, site, project)
        code, out = await self._run(
            self._git,
            "init",
            "--quiet",
            "--bare",
            "--template=",
            "--initial-branch=main",
            str(building),
            cwd=project,
        )
        if code != 0:
            raise Unavailable(f"could not create the git repository: {out.decode(errors='replace')}")
        settings = {
            "core.hooksPath": str(self._hooks),
            "http.receivepack": "true",
            "http.uploadpack": "true",
            "receive.denyNonFastForwards": "false",
            "receive.fsckObjects": "true",
            "receive.maxInputSize": str(self._config.max_deploy_bytes),
            "gc.auto": "0",
        }
        for key, value in settings.items():
            code, out = await self._run(self._git, "config", key, value, cwd=building)
            if code != 0:
                raise Unavailable(f"could not configure the git repository: {out.decode(errors='replace')}")
        building.rename(repo)
        self._log.bind(site=site.name).info("git repository created")
        return repo

    def _prepare(self, site: SiteInfo, project: Path) -> Path:
        """Hooks in place, an earlier incarnation's repository gone; the directory to build in."""
        self._write_hooks()
        for old in self._root.glob(f"{site.name}@*"):
            if old != project:
                shutil.rmtree(old, ignore_errors=True)
        project.mkdir(parents=True, exist_ok=True)
        building = project / f".{site.name}.git.new"
        shutil.rmtree(building, ignore_errors=True)
        return building

    def _write_hooks(self) -> None:
        # (A publisher before this one refused in a pre-receive hook: the whole push.)
        (self._hooks / "pre-receive").unlink(missing_ok=True)
        hook = self._hooks / "update"
        if hook.exists() and hook.read_text() == _UPDATE:
            return
        self._hooks.mkdir(mode=0o755, parents=True, exist_ok=True)
        fresh = hook.with_suffix(".new")
        fresh.write_text(_UPDATE)
        fresh.chmod(0o755)
        fresh.replace(hook)

    # --- the smart HTTP endpoints

    async def _site(self, request: web.Request) -> SiteInfo:
        name = validate_site_name(request.match_info["site"])
        return await self._deployer.authenticate(request, name)

    async def _info_refs(self, request: web.Request) -> web.StreamResponse:
        service = request.query.get("service")
        if service not in _SERVICES:
            raise BadRequest(
                "only git's smart HTTP protocol is served here",
                hint="use git 1.6.6 or later; the dumb HTTP protocol is not supported",
            )
        site = await self._site(request)
        repo = await self._repository(site)
        return await self._stream(request, site, repo, "info/refs")

    async def _service(self, request: web.Request) -> web.StreamResponse:
        service = request.match_info["service"]
        if service not in _SERVICES:
            raise NotFound(f"no such git endpoint: {service}", hint="push or fetch with git's smart HTTP")
        site = await self._site(request)
        repo = await self._repository(site)
        if service == "git-upload-pack":
            return await self._stream(request, site, repo, service)
        lock = self._locks.setdefault(site.name, asyncio.Lock())
        async with lock:
            kept = False
            try:
                response, kept = await self._push(request, site, repo)
            finally:
                if not kept:
                    self._tidy_later(site.name, repo, lock)
            return response

    def _tidy_later(self, name: str, repo: Path, lock: asyncio.Lock) -> None:
        """Drop what a refused push left, once its request has been answered; the site's push lock
        held, as ``--prune=now`` would take the objects of a push in flight."""
        if repo in self._tidying:
            return  # the pending one runs after this push: it covers it

        async def tidy() -> None:
            try:
                async with lock:
                    await self._tidy(name, repo)
            finally:
                del self._tidying[repo]

        self._tidying[repo] = asyncio.get_running_loop().create_task(tidy())

    async def _tidy(self, name: str, repo: Path) -> None:
        assert self._git is not None
        await asyncio.to_thread(_remove_quarantines, repo / "objects")
        if not (repo / "config").exists():
            return  # the site went meanwhile, and its repository with it
        code, out = await self._run(self._git, "gc", "--quiet", "--prune=now", cwd=repo)
        log = self._log.bind(site=name)
        if code != 0:
            log.warning("git gc after a refused push failed: %s", out.decode(errors="replace").strip()[:300])
        else:
            log.info("git repository: a refused push's objects dropped")

    async def close(self) -> None:
        """Let pending clean-ups finish (a few seconds at most), then stop them."""
        pending = list(self._tidying.values())
        if pending:
            _, late = await asyncio.wait(pending, timeout=10)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _start(self, request: web.Request, site: SiteInfo, repo: Path, path: str) -> _Cgi:
        """Start ``git http-backend`` for this request and feed it the (size-capped) request body."""
        assert self._git is not None
        env = {
            **self._env(),
            "GIT_PROJECT_ROOT": str(repo.parent),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": f"/{repo.name}/{path}",
            "REQUEST_METHOD": request.method,
            "QUERY_STRING": request.query_string,
            "CONTENT_TYPE": request.headers.get("Content-Type", ""),
            "REMOTE_USER": BasicAuth.decode(request.headers["Authorization"]).login,
            "REMOTE_ADDR": request.remote or "",
        }
        if "Git-Protocol" in request.headers:
            env["GIT_PROTOCOL"] = request.headers["Git-Protocol"]
        if path == "git-receive-pack":
            # Per push, as the plan may change: git's index-pack stops at this many bytes of pack.
            # Config from the environment outranks the repository's.
            env |= {
                "GIT_CONFIG_COUNT": "1",
                "GIT_CONFIG_KEY_0": "receive.maxInputSize",
                "GIT_CONFIG_VALUE_0": str(self._max_pack(site)),
            }
        proc = await asyncio.create_subprocess_exec(
            self._git,
            "http-backend",
            env=env,
            cwd=repo.parent,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        cgi = _Cgi(proc, self._log.bind(site=site.name))
        feeding = asyncio.create_task(self._feed(request, cgi))
        try:
            await cgi.read_headers()
            await feeding
        except BaseException:
            feeding.cancel()
            await cgi.wait(kill=True)
            raise
        if cgi.too_big:
            await cgi.wait(kill=True)
            raise QuotaExceeded(
                f"the push is larger than the {self._config.max_deploy_bytes} bytes this publisher accepts",
                hint="push less at once, or deploy a zip",
            )
        return cgi

    async def _feed(self, request: web.Request, cgi: _Cgi) -> None:
        stdin = cgi.proc.stdin
        assert stdin is not None
        limit = self._config.max_deploy_bytes
        total = 0
        try:
            async for chunk in request.content.iter_chunked(_CHUNK):
                total += len(chunk)
                if total > limit:
                    cgi.too_big = cgi.killed = True
                    with contextlib.suppress(ProcessLookupError):
                        cgi.proc.kill()
                    return
                stdin.write(chunk)
                await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            return  # git stopped reading: its answer says why
        finally:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                stdin.close()

    def _response(self, cgi: _Cgi) -> web.StreamResponse:
        response = web.StreamResponse(status=cgi.status)
        for name, value in cgi.headers.items():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                response.headers[name] = value
        return response

    async def _stream(
        self, request: web.Request, site: SiteInfo, repo: Path, path: str
    ) -> web.StreamResponse:
        cgi = await self._start(request, site, repo, path)
        assert cgi.proc.stdout is not None
        response = self._response(cgi)
        try:
            await response.prepare(request)
            while chunk := await cgi.proc.stdout.read(_CHUNK):
                await response.write(chunk)
            await response.write_eof()
        finally:
            await cgi.wait(kill=not cgi.proc.stdout.at_eof())
        return response

    def _max_pack(self, site: SiteInfo) -> int:
        # 0 would mean no limit to git.
        return max(1, min(self._config.max_deploy_bytes, site.quota_bytes))

    async def _refs(self, repo: Path) -> dict[str, str]:
        assert self._git is not None
        _, out = await self._run(
            self._git, "for-each-ref", "--format=%(refname) %(objectname)", *_DEPLOYED, cwd=repo
        )
        refs = {}
        for line in out.decode().splitlines():
            name, _, sha = line.partition(" ")
            refs[name] = sha
        return refs

    async def _push(
        self, request: web.Request, site: SiteInfo, repo: Path
    ) -> tuple[web.StreamResponse, bool]:
        """The answer to a push, and whether all it left in the repository is kept (nothing to tidy)."""
        before = await self._refs(repo)
        cgi = await self._start(request, site, repo, "git-receive-pack")
        assert cgi.proc.stdout is not None
        report = b""
        try:
            while len(report) <= _MAX_REPORT and (chunk := await cgi.proc.stdout.read(_CHUNK)):
                report += chunk
        finally:
            await cgi.wait(kill=len(report) > _MAX_REPORT or not cgi.proc.stdout.at_eof())
        after = await self._refs(repo)
        moved = [ref for ref in _DEPLOYED if ref in after and after[ref] != before.get(ref)]
        response = self._response(cgi)
        await response.prepare(request)
        if not moved:
            if cgi.status == 200 and _PACK_TOO_BIG in report and _split_report(report) is not None:
                # git's own line names no figure: say which limit it was.
                most = self._max_pack(site)
                limit = "the site's storage quota" if most == site.quota_bytes else "a push's limit here"
                await response.write(
                    _progress(
                        f"sitecloud: the push is larger than {limit} ({most} bytes): push less history "
                        "at once, or deploy a zip\n"
                    )
                )
            await response.write(report)
            await response.write_eof()
            # A push git refused left nothing: it removes its own quarantine.
            return response, not cgi.killed
        # git's report (``ok <ref>``) is held back until the deploy is done: the deploy's lines go
        # first on band 2, and a failed deploy turns it into ``ng <ref> <why>``, so that git says the
        # push was rejected and exits non-zero.
        ref = moved[0]
        multiplexed = cgi.status == 200 and _split_report(report) is not None
        failure = await self._history_fits(site, repo)
        if failure is not None:
            await self._rewind(repo, ref, before.get(ref), after[ref])
            self._log.bind(site=site.name).warning("git push of %s refused: %s", after[ref][:10], failure)
            if multiplexed:
                await response.write(_progress(f"sitecloud: {failure}\n"))
        else:
            failure = await self._deploy(
                site, repo, ref, before.get(ref), after[ref], response if multiplexed else None
            )
        if failure is not None and cgi.status == 200:
            report = _rejected(report, ref, failure)
        await response.write(report)
        await response.write_eof()
        return response, failure is None and not cgi.killed

    async def _history_fits(self, site: SiteInfo, repo: Path) -> str | None:
        """None when the repository, this push included, fits in the site's storage quota; else
        why not, for the pusher. Over it, what no branch reaches (history a force push replaced)
        is dropped first and the repository measured again."""
        assert self._git is not None
        objects = repo / "objects"
        size = await asyncio.to_thread(_bytes_on_disk, objects)
        if size > site.quota_bytes:
            code, out = await self._run(self._git, "gc", "--quiet", "--prune=now", cwd=repo)
            if code != 0:
                self._log.bind(site=site.name).warning(
                    "git gc before the history check failed: %s", out.decode(errors="replace").strip()[:300]
                )
            size = await asyncio.to_thread(_bytes_on_disk, objects)
        if size <= site.quota_bytes:
            return None
        return (
            f"the site's git history would take {_mb(size)}, more than its storage quota of "
            f"{_mb(site.quota_bytes)}: push a shorter history (an orphan or squashed branch, with "
            "--force), or deploy a zip"
        )

    async def _deploy(
        self,
        site: SiteInfo,
        repo: Path,
        ref: str,
        old: str | None,
        new: str,
        response: web.StreamResponse | None,
    ) -> str | None:
        """Export ``new`` and deploy it as the whole site; on failure put ``ref`` back to ``old`` and
        say why (one line, for git's report)."""
        assert self._git is not None
        log = self._log.bind(site=site.name)
        branch = ref.removeprefix("refs/heads/")

        async def say(line: str) -> None:
            if response is not None:
                await response.write(_progress(f"sitecloud: {line}\n"))

        async def tell(source: str, text: str) -> None:
            # The build's lines as pip or npm wrote them; the publisher's own ones marked as such.
            if source == "deploy":
                await say(text)
            elif response is not None:
                await response.write(_progress(f"{text}\n"))

        await say(f"deploying {new[:10]} ({branch}) to site {site.name}")
        record = self._deployer.deployments.start(site.name, deployer="git", author=f"git push to {branch}")
        try:
            await self._check_tree(site, repo, new)
            await asyncio.to_thread(_pin_attributes, repo)
            with tempfile.NamedTemporaryFile(prefix="sitecloud-git-", suffix=".zip") as spool:
                code, out = await self._run(
                    self._git, "archive", "--format=zip", f"--output={spool.name}", new, cwd=repo
                )
                if code != 0:
                    raise BadRequest(f"git archive failed: {out.decode(errors='replace').strip()}")
                size = os.fstat(spool.fileno()).st_size
                await self._deployer.deploy_zip(
                    site, spool, record, via="git push", size=size, follow_build=True, emit=tell, source="git"
                )
        except NotServed as err:
            # Stored, and served once a worker runs: the push stands (put back, the branch would
            # say the site holds the old commit while it holds this one).
            log.warning("git push of %s stored, but not served: %s", new[:10], err)
            await say(f"WARNING: {err}")
            return None
        except SitecloudError as err:
            if not record.complete:
                self._deployer.deployments.finish(record, version=None, message=str(err))
            await self._rewind(repo, ref, old, new)
            log.warning("git push of %s not deployed: %s", new[:10], err)
            await say(f"deploy FAILED: {err}")
            await say(f"{branch} is back at {old[:10] if old else 'nothing'}; fix and push again")
            return _one_line(f"deploy failed: {err.message}")
        if not site.state.serving:
            # Its deploy said so already: kept, served once the site is started.
            return None
        url = self._sites.site_url(site.address)
        await say(f"live at {url}" if url else f"site {site.address} is live")
        return None

    async def _check_tree(self, site: SiteInfo, repo: Path, commit: str) -> None:
        """Refuse a commit naming more files than a zip deploy may hold, or more bytes than the site's
        quota, before ``git archive`` writes them out. A tree can name another tree many times, so a
        push of a few KB can name millions of files, each a full copy in the export: the listing is
        read only as far as it fits."""
        assert self._git is not None
        proc = await asyncio.create_subprocess_exec(
            self._git,
            "ls-tree",
            "-r",
            "-z",
            "--long",
            commit,
            cwd=repo,
            env=self._env(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        assert proc.stdout is not None
        files = total = 0
        pending = b""
        try:
            while chunk := await proc.stdout.read(_CHUNK):
                *records, pending = (pending + chunk).split(b"\0")
                for record in records:
                    files += 1
                    if files > SITE_ENTRIES_MAX:
                        raise InvalidInput(
                            f"the commit names more than {SITE_ENTRIES_MAX} files; at most {SITE_ENTRIES_MAX} are allowed",
                            hint="a tree named many times counts each time: deploy fewer files",
                        )
                    size = record.partition(b"\t")[0].split()[-1:]
                    total += int(size[0]) if size and size[0].isdigit() else 0  # "-" for a submodule
                    if total > site.quota_bytes:
                        raise QuotaExceeded(
                            f"the commit's files take more than the site's quota of {site.quota_bytes} bytes",
                            hint="remove files or ask for a bigger plan",
                        )
                if len(pending) > _MAX_RECORD:
                    raise InvalidInput(f"the commit has a path longer than {MAX_PATH_BYTES} bytes")
        finally:
            if not proc.stdout.at_eof():
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await proc.wait()

    async def _rewind(self, repo: Path, ref: str, old: str | None, new: str) -> None:
        assert self._git is not None
        if old:
            await self._run(self._git, "update-ref", ref, old, new, cwd=repo)
        else:
            await self._run(self._git, "update-ref", "-d", ref, new, cwd=repo)
