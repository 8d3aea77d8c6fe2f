"""Web deploy: a zip replaces a site's whole content in one fileserver version.

Two doors lead to the same code: ``POST /api/deploy/{site}`` on the public HTTPS port with the site's
publishing credentials (HTTP basic auth), and ``POST /v1/deploy/{site}`` on the control port for the
management role (mTLS). The body is spooled to a temporary file, checked by
:func:`roles.publisher.zipsafe.check_zip`, each file uploaded as a blob, and one ``replace`` commit flips
the site; any error before that commit leaves the site as it was.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Awaitable, Callable
from typing import IO, Any

from aiohttp import BasicAuth, web

from roles.publisher._fileserver import FileserverClient
from roles.publisher._sites import Credentials, SiteInfo, SiteTable
from roles.publisher._throttle import LoginThrottle
from roles.publisher.config import PublisherConfig
from roles.publisher.zipsafe import check_zip, copy_member, open_zip
from shared.errors import NotFound, QuotaExceeded, RateLimited, SitecloudError, Unauthorized
from shared.internal import error_middleware, require_role
from shared.logs import get_logger

__all__ = ["Deployer"]

_CHUNK = 256 * 1024
_REALM = 'Basic realm="sitecloud web deploy", charset="UTF-8"'
# Deploys unpack and upload whole sites; a few at a time keep disk and fileserver load bounded.
_CONCURRENT_DEPLOYS = 4

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


_RETRY_AFTER = web.RequestKey("retry_after", int)


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
        self._slots = asyncio.Semaphore(_CONCURRENT_DEPLOYS)
        # Running totals for metrics.
        self.deploys = 0
        self.deploys_refused = 0

    # --- the two doors

    def public_app(self) -> web.Application:
        app = web.Application(middlewares=[_challenge, error_middleware])
        app.router.add_post("/api/deploy/{site}", self._public)
        return app

    def control_routes(self) -> list[web.RouteDef]:
        return [web.post("/v1/deploy/{site}", self._internal)]

    async def _public(self, request: web.Request) -> web.Response:
        name = request.match_info["site"]
        site = await self._authenticate(request, name)
        return await self._deploy(request, site, via=f"web deploy from {request.remote}")

    async def _internal(self, request: web.Request) -> web.Response:
        require_role(request, "management")
        name = request.match_info["site"]
        site = self._sites.site(name)
        if site is None:
            raise NotFound(f"site {name} is not served by this publisher")
        return await self._deploy(request, site, via="management")

    async def _authenticate(self, request: web.Request, name: str) -> SiteInfo:
        header = request.headers.get("Authorization")
        if not header:
            raise Unauthorized(
                "web deploy needs HTTP basic auth", hint="use the site's publishing user and password"
            )
        try:
            auth = BasicAuth.decode(header)
        except ValueError:
            raise Unauthorized("the Authorization header is not valid HTTP basic auth") from None
        address = request.remote or ""
        wait = self._throttle.retry_after(auth.login, address)
        if wait:
            self._log.bind(site=name).warning(
                "web deploy: login throttled for user %r from %s (retry in %ss)", auth.login, address, wait
            )
            request[_RETRY_AFTER] = wait
            raise RateLimited(
                f"too many failed logins for {auth.login} from your address",
                hint=f"try again in {wait} seconds",
            )
        site = self._sites.site(name)
        # An unknown site and a wrong password get the same answer.
        ok = site is not None and await asyncio.to_thread(
            self._credentials.check, site, auth.login, auth.password
        )
        if site is None or not ok:
            self._throttle.failed(auth.login, address)
            self._log.bind(site=name).warning("web deploy: login failed for user %r", auth.login)
            raise Unauthorized(f"wrong user or password for site {name}")
        self._throttle.succeeded(auth.login, address)
        return site

    # --- the deploy itself

    async def _deploy(self, request: web.Request, site: SiteInfo, *, via: str) -> web.Response:
        log = self._log.bind(site=site.name)
        async with self._slots:
            with tempfile.TemporaryFile(prefix="sitecloud-deploy-") as spool:
                size = await self._receive(request, spool)
                try:
                    answer = await asyncio.to_thread(self._apply, site, spool)
                except SitecloudError as err:
                    self.deploys_refused += 1
                    log.warning("%s refused: %s", via, err)
                    raise
        self.deploys += 1
        log.info(
            "%s: %s bytes of zip deployed as version %s (%s files, %s bytes)",
            via,
            size,
            answer["version"],
            answer["files"],
            answer["bytes"],
        )
        return web.json_response(answer)

    async def _receive(self, request: web.Request, spool: IO[bytes]) -> int:
        limit = self._config.max_deploy_bytes

        def too_big() -> QuotaExceeded:
            return QuotaExceeded(
                f"the zip is larger than the {limit} bytes this publisher accepts",
                hint="deploy a smaller zip, or upload the files over FTP",
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

    def _apply(self, site: SiteInfo, spool: IO[bytes]) -> dict[str, Any]:
        """Runs in a worker thread: check the zip, upload its files, commit them as the whole site."""
        with open_zip(spool) as zf:
            plan = check_zip(zf, max_total_bytes=site.quota_bytes)
            ops: list[dict[str, Any]] = [{"op": "mkdir", "path": d} for d in plan.empty_dirs]
            with (
                FileserverClient(self._sites.fileserver, self._ssl) as client,
                tempfile.TemporaryFile(prefix="sitecloud-member-") as member_file,
            ):
                for member in plan.files:
                    member_file.seek(0)
                    member_file.truncate()
                    copy_member(zf, member, member_file)
                    member_file.seek(0)
                    blob = client.upload_blob(site.name, member_file)
                    ops.append(
                        {"op": "put", "path": member.path, "sha256": blob["sha256"], "mtime": member.mtime}
                    )
                answer = client.commit(site.name, ops, replace=True)
        return {
            "site": site.name,
            "version": answer["version"],
            "files": len(plan.files),
            "bytes": plan.total_bytes,
        }
