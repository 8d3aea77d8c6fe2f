"""Web deploy: a zip replaces a site's whole content in one fileserver version.

Three doors lead to the same code: ``POST /api/deploy/{site}`` and Kudu's ``POST /api/zipdeploy`` on
the public HTTPS port with the site's publishing credentials (HTTP basic auth), and
``POST /v1/deploy/{site}`` on the control port for the management role (mTLS); a git push deploys
through it too (:mod:`roles.publisher._git`). The body is spooled to a temporary file, checked by
:func:`roles.publisher.zipsafe.check_zip`, each file uploaded as a blob, and one ``replace`` commit flips
the site; any error before that commit leaves the site as it was.

Kudu's zip deploy (and its OneDeploy, ``POST /api/publish?type=zip``) names the site by the publishing
user (``?site=`` or a ``<site>.scm.`` host name it too) and, as Kudu's does, answers 200 once the site's
workers have built and serve the new version, or with ``?isAsync=true`` (``?async=true``) 202 at once and a ``Location`` to poll at ``GET /api/deployments/{id}``
(:mod:`roles.publisher._deployments`), which stays incomplete until then (a git push follows the build
too). ``GET /api/deployments/{id}/log`` lists the build's lines (:mod:`shared.builds`), and ``GET /api/deployments``
the site's recent deployments, newest first.
``/api/deploy/{site}`` answers at the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import IO, Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import BasicAuth, web

from roles.publisher._deployments import Deployment, DeploymentLog
from roles.publisher._fileserver import FileserverClient
from roles.publisher._sites import Credentials, SiteInfo, SiteTable, suspended_error
from roles.publisher._slots import FairSlots
from roles.publisher._throttle import LoginThrottle
from roles.publisher.config import PublisherConfig
from roles.publisher.zipsafe import ZipMember, check_zip, copy_member, open_zip, read_member
from shared.builds import NOT_SERVED_HINT, BuildFollow, BuildFollower, BuildOutcome, Emit, build_failure
from shared.contracts.apps import CommandResult, CommandRun
from shared.contracts.content import CommitSource, DeployResult, PathOp, encode_commit
from shared.errors import (
    BuildFailed,
    InvalidInput,
    NotFound,
    NotServed,
    QuotaExceeded,
    RateLimited,
    SitecloudError,
    Unauthorized,
    Unavailable,
)
from shared.internal import InternalClient, error_middleware, require_role
from shared.logs import ContextLogger, get_logger
from shared.states import SiteState
from shared.words import counted

__all__ = ["Deployer"]


_CHUNK = 256 * 1024
# Members up to this size go to the fileserver in batches of up to _BATCH_BYTES / _BATCH_FILES.
_BATCH_FILE = 256 * 1024
_BATCH_BYTES = 4 * 1024 * 1024
_BATCH_FILES = 2000
_REALM = 'Basic realm="sitecloud web deploy", charset="UTF-8"'
# Deploys unpack and upload whole sites; a few at a time keep disk and fileserver load bounded.
_CONCURRENT_DEPLOYS = 4
# Of them, one subscription's at once: the rest are another tenant's to take at once (_slots.py).
_DEPLOYS_PER_SUBSCRIPTION = 2
# Zips of one site on this publisher's disk at once, being received or waiting for their deploy (an
# async one answers 202 and waits): the password of one's own site bought any number of them, each
# up to max_deploy_bytes, and a hundred 1 GiB uploads fill the disk every site's content is on.
UPLOADS_PER_SITE = 2
# What a zip may be beyond the site's quota: its own headers and directory (some 100 bytes and twice
# the name per member, 100 000 members at most); a bigger one could never deploy.
ZIP_OVERHEAD = 64 * 1024 * 1024
# How long a deployer refused for the site's uploads in progress is told to wait.
_UPLOAD_RETRY = 5

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_RETRY_AFTER = web.RequestKey("retry_after", int)
# What management asks for to see the deploy's build as it runs.
NDJSON = "application/x-ndjson"
# What a site's owner does about a failed build (the site's app serves no version until one builds).
_BUILD_HINT = "fix what the build says and deploy again (`sitecloud site logs {site}` shows the whole build)"
_APP_HINT = "fix the app and deploy again (`sitecloud site logs {site}` shows its output)"
# How long a deploy waits for its app's first answer once the version is served.
APP_PROBE_SECONDS = 20.0
# How long a command sent to Kudu's /api/command may run (Kudu's own default idle limit).
KUDU_COMMAND_SECONDS = 60.0
# How long a failed deploy waits for the workers to serve the version it put back.
RESTORE_WAIT_SECONDS = 60.0


async def _unheard(source: str, text: str) -> None:
    """Lines nobody is shown (the put-back version's, built before)."""


async def _app_failure(follow: BuildFollow, version: int, host: str, tell: Emit) -> str | None:
    """Why a served version's app does not run (None: it answered, or there is nothing to ask); what
    it answered is told to the deployer either way."""
    probe = await follow.probe(version, host=host, timeout=APP_PROBE_SECONDS, emit=tell)
    if probe is None or probe.outcome == "none":
        if probe is not None and probe.detail:
            await tell("deploy", probe.detail)
        return None
    if probe.outcome == "crashed":
        await tell("deploy", f"its app does not start: {probe.detail}")
        return f"its app does not start: {probe.detail}"
    if probe.outcome == "slow":
        await tell("deploy", f"its app has not answered yet ({probe.detail}); it may still be starting")
    else:
        await tell("deploy", f"its app answered GET / with {probe.status}")
    return None


def _not_served(site: SiteInfo, outcome: BuildOutcome) -> bool:
    """Whether a deploy's version, stored and built, is served by none of the site's workers. A
    stopped site is meant to serve nothing; workers this publisher cannot reach may serve it, so then
    it says nothing either way."""
    return outcome.unserved and not outcome.failed and site.state.serving and not site.unreached_workers


def _switch(request: web.Request, name: str, *, default: bool) -> bool:
    """A Kudu query switch (``isAsync``, ``async``, ``clean``): true or false, in any case."""
    value = request.query.get(name)
    if value is None:
        return default
    if value.lower() not in ("true", "false"):
        raise InvalidInput(f"{name} must be true or false, not {value!r}")
    return value.lower() == "true"


def _ndjson(line: dict[str, Any]) -> bytes:
    return json.dumps(line).encode() + b"\n"


@web.middleware
async def _challenge(request: web.Request, handler: Handler) -> web.StreamResponse:
    response = await handler(request)
    if response.status == 401:
        response.headers["WWW-Authenticate"] = _REALM
    elif response.status == 429 and _RETRY_AFTER in request:
        response.headers["Retry-After"] = str(request[_RETRY_AFTER])
    return response


class Deployer:
    def __init__(
        self,
        config: PublisherConfig,
        sites: SiteTable,
        credentials: Credentials,
        ssl_context: Any,
        throttle: LoginThrottle,
    ) -> None:
        self._config = config
        self._sites = sites
        self._credentials = credentials
        self._throttle = throttle
        self._ssl = ssl_context
        self._log = get_logger(config.role, host=config.host)
        self._slots = FairSlots(_CONCURRENT_DEPLOYS, _DEPLOYS_PER_SUBSCRIPTION)
        self._uploads: dict[str, int] = {}  # site -> its zips on disk now (UPLOADS_PER_SITE)
        # Running totals for metrics.
        self.deploys = 0
        self.deploys_refused = 0
        self.deployments = DeploymentLog()
        self.builds = BuildFollower(
            InternalClient(ssl_context, timeout=10), self._log, unreached_grace=config.build_unreached_grace
        )
        self._background: set[asyncio.Task[None]] = set()

    # --- the doors

    def public_app(self, extra_routes: Iterable[web.RouteDef] = ()) -> web.Application:
        app = web.Application(middlewares=[_challenge, error_middleware], client_max_size=1024**2)
        app.router.add_post("/api/deploy/{site}", self._public)
        app.router.add_post("/api/zipdeploy", self._zipdeploy)
        app.router.add_post("/api/publish", self._onedeploy)
        app.router.add_get("/api/deployments", self._deployment_list)
        app.router.add_get("/api/deployments/{id}", self._deployment)
        app.router.add_get("/api/deployments/{id}/log", self._deployment_log)
        app.router.add_post("/api/command", self._command)
        app.router.add_routes(list(extra_routes))
        app.on_shutdown.append(self._drain)
        return app

    def control_routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/deploy/{site}", self._internal)]

    async def _public(self, request: web.Request) -> web.Response:
        name = request.match_info["site"]
        site = await self.authenticate(request, name)
        answer, _ = await self._deploy_request(request, site, via="web deploy")
        return web.json_response(answer.to_json())

    async def _internal(self, request: web.Request) -> web.StreamResponse:
        require_role(request, "management")
        name = request.match_info["site"]
        # Management decides who publishes to a suspended subscription's site (an admin restoring it).
        site = self._sites.site(name) or self._sites.suspended_site(name)
        if site is None:
            raise NotFound(f"site {name} is not served by this publisher")
        if NDJSON not in request.headers.get("Accept", ""):
            answer, _ = await self._deploy_request(request, site, via="management")
            return web.json_response(answer.to_json())
        return await self._internal_following(request, site)

    async def _internal_following(self, request: web.Request, site: SiteInfo) -> web.StreamResponse:
        """The deploy and then its build, as lines: ``{"source", "text"}`` as they come, then
        ``{"result": …}`` once the workers serve it, or ``{"error": …}``. A refusal before the commit
        (a bad zip, the quota) is answered as an error, as without lines."""
        out: web.StreamResponse | None = None

        async def started() -> web.StreamResponse:
            nonlocal out
            if out is None:
                out = web.StreamResponse(headers={"Content-Type": NDJSON, "Cache-Control": "no-store"})
                await out.prepare(request)
            return out

        async def emit(source: str, text: str) -> None:
            await (await started()).write(_ndjson({"source": source, "text": text}))

        try:
            answer, _ = await self._deploy_request(
                request, site, via="management", follow_build=True, emit=emit
            )
        except SitecloudError as err:
            if out is None:
                raise
            await out.write(_ndjson(err.to_json()))
        else:
            await (await started()).write(_ndjson({"result": answer.to_json()}))
        assert out is not None
        await out.write_eof()
        return out

    async def _zipdeploy(self, request: web.Request) -> web.Response:
        site = await self.authenticate(request, self._kudu_site(request))
        is_async = _switch(request, "isAsync", default=False)
        return await self._kudu_deploy(request, site, is_async=is_async, deployer="ZipDeploy")

    async def _onedeploy(self, request: web.Request) -> web.Response:
        """Kudu's OneDeploy, ``POST /api/publish?type=zip``, as ``az webapp deploy``, Publish-AzWebApp
        and the Azure SDKs call it: a zip replaces the site's whole content, as zip deploy does.
        ``restart`` and ``ignorestack`` change nothing here (a new version starts new app processes)."""
        site = await self.authenticate(request, self._kudu_site(request))
        kind = request.query.get("type", "zip").lower()
        if kind != "zip":
            raise InvalidInput(
                f"type={kind} is not deployed here: only type=zip (a zip of the whole site)",
                hint="zip the site's files and POST them to /api/publish?type=zip",
            )
        path = request.query.get("path", "").strip("/")
        if path not in ("", "site/wwwroot", "home/site/wwwroot"):
            raise InvalidInput(
                f"path={request.query['path']} is not deployed here: a zip is the site's whole content",
                hint="leave path out",
            )
        if not _switch(request, "clean", default=True):
            raise InvalidInput(
                "clean=false is not deployed here: a zip replaces the site's whole content",
                hint="leave clean out, or upload single files by FTP",
            )
        is_async = _switch(request, "async", default=False)
        return await self._kudu_deploy(request, site, is_async=is_async, deployer="OneDeploy")

    async def _kudu_deploy(
        self, request: web.Request, site: SiteInfo, *, is_async: bool, deployer: str
    ) -> web.Response:
        if not is_async:
            # As Kudu's: the answer comes once the deployment is done, the site built and served; a
            # failed build answers its failed record with an error status, so `curl --fail` sees it.
            with self._upload(request, site) as spool:
                size = await self._receive(request, spool, site)
                record = self.deployments.start(site.name, deployer=deployer, author=self._author(request))
                status = 200
                try:
                    await self.deploy_zip(
                        site,
                        spool,
                        record,
                        via=f"zip deploy from {request.remote}",
                        size=size,
                        follow_build=True,
                    )
                except (BuildFailed, NotServed) as err:
                    status = err.status
            return web.json_response(self._record_json(request, record), status=status)
        # Kudu's async deploy: take the whole body now, answer 202 and deploy in the background.
        upload = contextlib.ExitStack()  # closed by the task
        try:
            spool = upload.enter_context(self._upload(request, site))
            size = await self._receive(request, spool, site)
        except BaseException:
            upload.close()
            raise
        record = self.deployments.start(site.name, deployer=deployer, author=self._author(request))
        task = asyncio.create_task(self._deploy_later(site, upload, spool, size, record))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        url = self._status_url(request, record)
        return web.json_response(self._record_json(request, record), status=202, headers={"Location": url})

    async def _record(self, request: web.Request) -> Deployment:
        site = await self.authenticate(request, self._kudu_site(request))
        wanted = request.match_info["id"]
        record = self.deployments.get(site.name, wanted)
        if record is None:
            raise NotFound(
                f"no deployment {wanted!r} of site {site.name} on this publisher",
                hint="use the Location a deploy answered with, or 'latest'",
            )
        return record

    async def _deployment_list(self, request: web.Request) -> web.Response:
        site = await self.authenticate(request, self._kudu_site(request))
        records = self.deployments.of_site(site.name)
        return web.json_response([self._record_json(request, record) for record in records])

    async def _deployment(self, request: web.Request) -> web.Response:
        return web.json_response(self._record_json(request, await self._record(request)))

    async def _deployment_log(self, request: web.Request) -> web.Response:
        return web.json_response(self.deployments.log_of(await self._record(request)))

    async def _command(self, request: web.Request) -> web.Response:
        """Kudu's ``POST /api/command`` (``{"command": "...", "dir": "..."}`` with the publishing
        credentials): the command run once in the site's app sandbox on its first worker, as
        `sitecloud site run` does, answered as Kudu does (``Output``, ``Error``, ``ExitCode``). ``dir`` is
        Windows' ``site\\wwwroot``: commands run in the site's own folder, whatever it says."""
        site = await self.authenticate(request, self._kudu_site(request))
        try:
            raw = await request.json()
        except ValueError:
            raise InvalidInput('the body must be JSON: {"command": "..."}') from None
        if not isinstance(raw, dict):
            raise InvalidInput('the body must be a JSON object: {"command": "..."}')
        run = CommandRun.parse(
            {"command": raw.get("command"), "timeout": KUDU_COMMAND_SECONDS}, what="command"
        )
        if not site.workers:
            raise Unavailable(f"site {site.name} is on no server yet", hint="try again in a moment")
        timeout = aiohttp.ClientTimeout(total=KUDU_COMMAND_SECONDS + 30, sock_connect=5)
        try:
            answer = await self.builds.client.post_json(
                f"{site.workers[0]}/v1/sites/{site.name}/commands", run.to_json(), timeout=timeout
            )
        except Unavailable as err:
            if not isinstance(err.__cause__, aiohttp.ClientError | TimeoutError):
                raise  # the worker's own answer (a site with no app there, say): said as it is
            self._log.warning("%s", err)  # (its address and port are for the log, not the tenant)
            raise Unavailable(
                "the site's server cannot be reached now", hint="try again in a moment"
            ) from None
        result = CommandResult.parse(answer, what="the worker's answer")
        self._log.bind(site=site.name).info("command from %s: exit %s", request.remote, result.exit_code)
        # Kudu gives stderr apart; here both come as one stream, in the order they were written.
        return web.json_response(
            {
                "Output": result.output,
                "Error": "",
                "ExitCode": -1 if result.exit_code is None else result.exit_code,
            }
        )

    def _kudu_site(self, request: web.Request) -> str | None:
        """The site a Kudu-style request names: ``?site=``, a ``<site>.scm.`` host, or else none (the
        publishing user then names it, as on Azure)."""
        named = request.query.get("site")
        if named is not None:
            return named
        host = (request.host or "").split(":", 1)[0].lower()
        labels = host.split(".")
        if len(labels) > 2 and labels[1] == "scm":
            return labels[0]
        return None

    @staticmethod
    def _status_url(request: web.Request, record: Deployment, suffix: str = "") -> str:
        path = f"/api/deployments/{record.id}{suffix}"
        return str(request.url.with_path(path).with_query({"site": record.site}))

    def _record_json(self, request: web.Request, record: Deployment) -> dict[str, Any]:
        return record.to_json(self._status_url(request, record), self._status_url(request, record, "/log"))

    @staticmethod
    def _author(request: web.Request) -> str:
        return f"{request.remote or 'unknown'}"

    async def authenticate(self, request: web.Request, name: str | None) -> SiteInfo:
        """The site the request's basic auth may publish to; ``name`` None lets the user name it."""
        header = request.headers.get("Authorization")
        if not header:
            raise Unauthorized(
                "publishing needs HTTP basic auth", hint="use the site's publishing user and password"
            )
        try:
            auth = BasicAuth.decode(header)
        except ValueError:
            raise Unauthorized("the Authorization header is not valid HTTP basic auth") from None
        address = request.remote or ""
        shown = name or auth.login
        wait = self._throttle.retry_after(auth.login, address)
        if wait:
            self._log.bind(site=shown).warning(
                "web deploy: login throttled for user %r from %s (retry in %ss)", auth.login, address, wait
            )
            request[_RETRY_AFTER] = wait
            raise RateLimited(
                f"too many failed logins for {auth.login} from your address",
                hint=f"try again in {wait} seconds",
            )
        # A name is the address publishers know: after a slot swap, what answers it.
        site = self._sites.site_at(name) if name is not None else self._sites.site_of_user(auth.login)
        suspended = self._sites.suspended_site(name, auth.login) if site is None else None
        known = site or suspended
        # An unknown site and a wrong password get the same answer.
        ok = known is not None and await asyncio.to_thread(
            self._credentials.check, known, auth.login, auth.password
        )
        if known is None or not ok:
            self._throttle.failed(auth.login, address)
            self._log.bind(site=shown).warning("web deploy: login failed for user %r", auth.login)
            raise Unauthorized(f"wrong user or password for site {shown}")
        if suspended is not None:
            # Counted as a failed login, as on FTP: it publishes nothing.
            self._throttle.failed(auth.login, address)
            self._log.bind(site=suspended.name).warning(
                "web deploy: refused user %r: the site's subscription is suspended", auth.login
            )
            raise suspended_error(suspended.name)
        self._throttle.succeeded(auth.login, address)
        return known

    # --- the deploy itself

    async def _deploy_request(
        self,
        request: web.Request,
        site: SiteInfo,
        *,
        via: str,
        deployer: str = "WebDeploy",
        follow_build: bool = False,
        emit: Emit | None = None,
    ) -> tuple[DeployResult, Deployment]:
        with self._upload(request, site) as spool:
            size = await self._receive(request, spool, site)
            record = self.deployments.start(site.name, deployer=deployer, author=self._author(request))
            answer = await self.deploy_zip(
                site,
                spool,
                record,
                via=f"{via} from {request.remote}",
                size=size,
                follow_build=follow_build,
                emit=emit,
            )
        return answer, record

    async def _deploy_later(
        self,
        site: SiteInfo,
        upload: contextlib.ExitStack,
        spool: IO[bytes],
        size: int,
        record: Deployment,
    ) -> None:
        with upload:
            try:
                await self.deploy_zip(
                    site, spool, record, via="async zip deploy", size=size, follow_build=True
                )
            except SitecloudError:
                pass  # recorded on the deployment, which the client polls
            except Exception:
                self._log.bind(site=site.name).exception("async zip deploy failed")
                if not record.complete:
                    self.deployments.finish(record, version=None, message="internal error")

    async def _drain(self, _app: web.Application) -> None:
        if self._background:
            await asyncio.wait(self._background, timeout=30)
        await self.builds.close()

    async def deploy_zip(
        self,
        site: SiteInfo,
        spool: IO[bytes],
        record: Deployment,
        *,
        via: str,
        size: int,
        follow_build: bool = False,
        emit: Emit | None = None,
        source: CommitSource = "deploy",
    ) -> DeployResult:
        """Deploy the zip in ``spool`` as the whole site, recording the outcome on ``record``. With
        ``follow_build`` the record completes only once the site's workers serve the new version built,
        and its lines (the build's among them) go to the record and to ``emit`` as they come."""
        log = self._log.bind(site=site.name)
        started = time.monotonic()
        # Opened before the commit: a worker may start building before the commit's answer is back.
        follow = self.builds.open(site.name, site.workers) if follow_build else None

        async def tell(source: str, text: str) -> None:
            self.deployments.note(record, text)
            if emit is not None:
                await emit(source, text)

        try:
            async with self._slots.hold(site.owner):
                self.deployments.running(record)
                try:
                    answer, took = await asyncio.to_thread(self._apply, site, spool, source)
                except SitecloudError as err:
                    self.deploys_refused += 1
                    # A cause kept from the answer (where the fileserver was not reached) is logged.
                    log.warning("%s refused: %s%s", via, err, f" ({err.__cause__})" if err.__cause__ else "")
                    self.deployments.finish(record, version=None, message=str(err))
                    raise
                except BaseException:
                    self.deployments.finish(record, version=None, message="internal error")
                    raise
            self.deploys += 1
            log.info(
                "%s: %s bytes of zip deployed as version %s (%s files, %s bytes; uploaded in %.2f s, "
                "committed in %.2f s)",
                via,
                size,
                answer.version,
                answer.files,
                answer.total_bytes,
                *took,
            )
            message = f"version {answer.version}"
            outcome = BuildOutcome(True)
            app_failure: str | None = None
            # Kept and published to, but built and served by nothing until it is started.
            stopped = (
                f"site {site.name} is stopped: it builds and serves this version once it is started "
                f"(`sitecloud site start {site.name}` shows the build)"
            )
            notes = [n for n in (answer.message, stopped if site.state is SiteState.STOPPED else None) if n]
            if notes:
                message += f"; {'; '.join(notes)}"
                answer = answer.model_copy(update={"message": "; ".join(notes)})
            if follow is not None:
                try:
                    await tell(
                        "deploy",
                        f"deployed as version {answer.version}: {counted(answer.files, 'file')}, "
                        f"{counted(answer.total_bytes, 'byte')} in {time.monotonic() - started:.2f}s",
                    )
                    if answer.message:
                        await tell("deploy", answer.message)
                    outcome = await follow.until_served(
                        answer.version, tell, timeout=self._config.build_follow_seconds
                    )
                    failure = build_failure(outcome.failed) if outcome.failed else None
                    serving = outcome.done and not _not_served(site, outcome)
                    if failure is None and serving and site.state is not SiteState.STOPPED:
                        url = self._sites.site_url(site.address) or ""
                        host = urlsplit(url).hostname or site.address
                        failure = app_failure = await _app_failure(follow, answer.version, host, tell)
                    if failure is not None:
                        message = f"version {answer.version} is stored, but {failure}"
                        restored = await self._restore_before(site, answer.version, log)
                        if restored is not None:
                            # Said once true: the workers serve the version put back (until then
                            # they serve the failed one, whose app may be down).
                            await follow.until_served(restored, _unheard, timeout=RESTORE_WAIT_SECONDS)
                            back = (
                                f"the site is back at version {answer.version - 1}'s content (as version "
                                f"{restored}): it serves what it did before this deploy"
                            )
                            message += f"; {back}"
                            await tell("deploy", back)
                        # (The deployer is answered with it as an error: only the record's log.)
                        self.deployments.note(record, message)
                    elif _not_served(site, outcome):
                        message = f"version {answer.version} is stored, but no worker is running to serve it"
                        self.deployments.note(record, message)
                except (OSError, ConnectionError) as exc:
                    # The deployer went away (a git client that hung up): the outcome is on the record.
                    log.info("stopped following the build: %s", exc)
                if not outcome.done:
                    message += "; its build was still going on when the publisher stopped following it"
                    await tell(
                        "deploy", f"the build goes on; follow it with 'sitecloud site logs {site.name}'"
                    )
        finally:
            if follow is not None:
                await follow.close()
        unserved = _not_served(site, outcome)
        failed = bool(outcome.failed) or unserved or app_failure is not None
        self.deployments.finish(record, version=answer.version, message=message, failed=failed)
        if unserved:
            log.warning(
                "%s: version %s stored, but none of the site's workers serves it", via, answer.version
            )
            raise NotServed(message, hint=NOT_SERVED_HINT)
        if app_failure is not None:
            log.warning("%s: version %s stored, but its app does not start", via, answer.version)
            raise BuildFailed(message, hint=_APP_HINT.format(site=site.name))
        if failed:
            log.warning("%s: version %s stored, but its build failed", via, answer.version)
            raise BuildFailed(message, hint=_BUILD_HINT.format(site=site.name))
        return answer

    async def _restore_before(self, site: SiteInfo, version: int, log: ContextLogger) -> int | None:
        """After ``version``'s build failed: a new version with the content before it, so the site
        keeps serving what it did (as Kudu keeps the running app) and what git and the CLI report
        as failed is not what the site holds. Not when it was the site's first version, nor when
        something was published after it (that stays). The new version's number, or None."""
        if version <= 1:
            return None

        def roll_back() -> int:
            with FileserverClient(self._sites.fileserver, self._ssl) as client:
                return client.rollback(site, version - 1, if_newest=version).version

        try:
            return await asyncio.to_thread(roll_back)
        except SitecloudError as err:
            log.warning(
                "version %s's build failed, and version %s was not put back: %s", version, version - 1, err
            )
            return None

    @contextlib.contextmanager
    def _upload(self, request: web.Request, site: SiteInfo) -> Iterator[IO[bytes]]:
        """A file on disk for one zip of ``site``, counted against UPLOADS_PER_SITE until it closes;
        RateLimited (429, Retry-After) while the site has that many already."""
        held = self._uploads.get(site.name, 0)
        if held >= UPLOADS_PER_SITE:
            request[_RETRY_AFTER] = _UPLOAD_RETRY
            self._log.bind(site=site.name).warning(
                "web deploy from %s refused: %s uploads of the site are in progress", request.remote, held
            )
            raise RateLimited(
                f"site {site.name} has {held} zip deploys in progress on this publisher already",
                hint=f"try again when one is done (in {_UPLOAD_RETRY} seconds, say)",
            )
        self._uploads[site.name] = held + 1
        try:
            with tempfile.TemporaryFile(prefix="sitecloud-deploy-") as spool:
                yield spool
        finally:
            left = self._uploads.pop(site.name) - 1
            if left:
                self._uploads[site.name] = left

    async def _receive(self, request: web.Request, spool: IO[bytes], site: SiteInfo) -> int:
        limit = self._config.max_deploy_bytes
        if site.quota_bytes > 0:
            limit = min(limit, site.quota_bytes + ZIP_OVERHEAD)

        def too_big() -> QuotaExceeded:
            return QuotaExceeded(
                f"the zip is larger than the {limit} bytes this publisher accepts for site {site.name}",
                hint="deploy a smaller zip (its files within the site's quota), or upload the files over FTP",
            )

        if request.content_length is not None and request.content_length > limit:
            raise too_big()
        total = 0
        async for chunk in request.content.iter_chunked(_CHUNK):
            total += len(chunk)
            if total > limit:
                raise too_big()
            spool.write(chunk)
        spool.flush()
        spool.seek(0)
        return total

    def _apply(
        self, site: SiteInfo, spool: IO[bytes], source: CommitSource
    ) -> tuple[DeployResult, tuple[float, float]]:
        """Runs in a worker thread: check the zip, upload its files, commit them as the whole site;
        also returns how long the uploads and the commit took."""
        started = time.monotonic()
        with open_zip(spool) as zf:
            plan = check_zip(zf, max_total_bytes=site.quota_bytes)
            ops = [PathOp(op="mkdir", path=d) for d in plan.empty_dirs]
            # (path, sha256, mtime) of each file: a model per file would cost more than its upload.
            puts: list[tuple[str, str, float | None]] = []
            with (
                FileserverClient(self._sites.fileserver, self._ssl) as client,
                tempfile.TemporaryFile(prefix="sitecloud-member-") as member_file,
                # One batch is stored by the fileserver while the next is read from the zip.
                ThreadPoolExecutor(1, thread_name_prefix="deploy-send") as sender,
            ):
                batch: list[tuple[ZipMember, bytes]] = []
                batch_bytes = 0
                sending: Future[None] | None = None

                def upload(sent: list[tuple[ZipMember, bytes]]) -> None:
                    stored = client.upload_blobs(site, [data for _, data in sent])
                    for (member, _), blob in zip(sent, stored, strict=True):
                        puts.append((member.path, blob.sha256, member.mtime))

                def sent() -> None:
                    # The client's one connection is free again (and a refusal is raised here).
                    nonlocal sending
                    if sending is not None:
                        done, sending = sending, None
                        done.result()

                def send_batch() -> None:
                    nonlocal batch, batch_bytes, sending
                    if batch:
                        sent()
                        sending = sender.submit(upload, batch)
                        batch, batch_bytes = [], 0

                for member in plan.files:
                    if member.size <= _BATCH_FILE:
                        # Small files travel many to a request, straight from memory.
                        batch.append((member, read_member(zf, member)))
                        batch_bytes += member.size
                        if batch_bytes >= _BATCH_BYTES or len(batch) >= _BATCH_FILES:
                            send_batch()
                        continue
                    member_file.seek(0)
                    member_file.truncate()
                    copy_member(zf, member, member_file)
                    member_file.seek(0)
                    sent()
                    blob = client.upload_blob(site, member_file)
                    puts.append((member.path, blob.sha256, member.mtime))
                send_batch()
                sent()
                uploaded = time.monotonic()
                answer = client.commit_encoded(
                    site, encode_commit(puts, ops=ops, replace=True, source=source)
                )
        result = DeployResult(
            site=site.name,
            version=answer.version,
            files=len(plan.files),
            total_bytes=plan.total_bytes,
            message=one_folder_note([member.path for member in plan.files]),
        )
        return result, (uploaded - started, time.monotonic() - uploaded)


def one_folder_note(paths: list[str]) -> str | None:
    """What a deployer should know of a zip whose every file is under one folder (what zipping a
    folder in a file manager makes): the site's root then holds only that folder."""
    tops = {path.partition("/")[0] for path in paths}
    if len(tops) != 1 or not all("/" in path for path in paths):
        return None
    (top,) = tops
    return (
        f"every file of the zip is under one folder, {top}/, so the site's root holds only that folder "
        f"(its home page is /{top}/, if any): to publish what is in it, zip the folder's contents "
        f"(cd {top} && zip -r ../site.zip .)"
    )
