"""The management service: what admins and tenants may do, shared by the REST API and the portals.

DB work runs in a thread (sync SQLAlchemy sessions); after each committed change the controller is
nudged. Every method takes the calling :class:`Principal` and enforces its rights.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import threading
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp

from roles.management._accounts import Accounts
from roles.management._backup import BACKUP_FORMAT, dump_tables, restore_tables
from roles.management._content import site_zip
from roles.management._fabric import FabricService
from roles.management._logs import ended_by, stream_site_logs
from roles.management._metering import Metering
from roles.management._nudge import Nudger
from roles.management._paging import Page
from roles.management._publish_profile import publish_settings
from roles.management._publishing import PublishingEndpoints
from roles.management._ratelimit import TenantBuckets
from roles.management._site_backups import BackupFile, ScheduledBackups, human_every
from roles.management._store import Principal, Store, require_admin
from roles.management._usage import StorageReader
from roles.management._warm import warm_site
from roles.management.config import ManagementConfig
from shared.builds import NOT_SERVED_HINT, BuildFollow, BuildFollower, Emit, build_failure
from shared.contracts.answers import parse_answer
from shared.contracts.apps import AppDescription, CommandResult, CommandRun
from shared.contracts.content import (
    DeployResult,
    RollbackAnswer,
    RollbackRequest,
    SiteContentInfo,
    SiteVersions,
    VersionList,
)
from shared.contracts.snapshots import ManagementSnapshot
from shared.db import Database
from shared.errors import (
    BuildFailed,
    NotFound,
    NothingPublished,
    NotServed,
    NotSupported,
    SitecloudError,
    Unauthorized,
    Unavailable,
)
from shared.internal import InternalClient, unreached_reason
from shared.logs import ContextLogger, get_logger
from shared.states import SiteState

__all__ = ["ManagementService", "Principal"]

Json = dict[str, Any]
T = TypeVar("T")
# The whole list: what the portals show; the API passes the page it was asked for.
_ALL = Page()
_FILESERVER = "the fileserver"
_PUBLISHER = "the publisher"

# A web deploy may carry a large zip over a slow link; the publisher answers once it is committed.
_DEPLOY_TIMEOUT = 3600.0
# A started site's build is followed this long at most (as the publisher follows a deploy's).
_BUILD_WAIT = 660.0
# How long a start waits for its app's first answer once its version is served.
_APP_PROBE_SECONDS = 20.0
# `site show` asks each of the site's workers how its app is doing, this long at most.
_APP_STATE_WAIT = 3.0
# A command's answer may come this long after its own time limit (its sandbox made and torn down).
_COMMAND_SLACK = 30.0
# Why a tenant sees its app's state as unknown on a worker: the worker is down or out of reach, or
# it answered something else (not having the site yet, say).
_UNREACHED = "the server is unavailable"
_UNSAID = "its server could not say"
# What a change's answer says when the controller did not apply it in time.
_PENDING = (
    "not live yet: the change is stored, but the cloud's controller has not applied it; it takes "
    "effect as soon as the controller runs again"
)
# Pending custom hostnames are asked about in DNS this often (seconds), and at once when one is added.
_HOSTNAME_RECHECK = 60.0
_APP_FIELDS = (
    "runtime", "state", "memory_bytes", "memory_limit_bytes", "memory_kills", "pids_limit",
    "pids_limit_hits", "disk_used_bytes", "disk_limit_bytes", "disk_quota_hits", "disk_full",
    "cpu_seconds", "starts", "crashes", "last_crash", "earlier_crashes", "sandboxed",
    "build_error",
)  # fmt: skip


class ManagementService:
    def __init__(self, config: ManagementConfig, db: Database) -> None:
        self.config = config
        self._log = get_logger(config.role, host=config.host)
        lock = threading.Lock()
        self.fabric = FabricService(config, db)
        self._db = db
        self._store = Store(db, config, lock)
        self.metering = Metering(db, lock)
        self.accounts = Accounts(db, lock, domain=config.domain)
        self.api_limits = TenantBuckets(
            config.api_reads_per_second,
            config.api_read_burst,
            config.api_writes_per_second,
            config.api_write_burst,
        )
        self._client = InternalClient(config, timeout=10)
        self._deploy_client = InternalClient(config, timeout=_DEPLOY_TIMEOUT)
        self._logs_client = InternalClient(config, timeout=_DEPLOY_TIMEOUT)
        self._builds = BuildFollower(InternalClient(config, timeout=10), self._log)
        self._nudger = Nudger(self._client, config.controller_url, self._log)
        self._hostname_wake = asyncio.Event()
        self._hostname_stop = threading.Event()
        self._hostname_tasks: list[asyncio.Task[None]] = []
        self._storage = StorageReader(self._client, lambda: asyncio.to_thread(self._store.fileserver_urls))
        self._backups = ScheduledBackups(
            config.home / "backups",
            min_every=config.backup_min_every,
            schedule=lambda: asyncio.to_thread(self._store.backup_schedule),
            newest_version=self._newest_version,
            zip_of=self._zip_of,
            log=self._log,
        )
        self._backups_stop = asyncio.Event()
        self._follows_stop = asyncio.Event()

    async def apply_snapshot(self, snapshot: ManagementSnapshot) -> None:
        """Take the controller's word for where the publisher runs (it may have moved)."""
        publishing = PublishingEndpoints.from_snapshot(snapshot, self.config)
        if publishing != self._store.publishing:
            self._log.info(
                "publisher at %s (FTP %s:%s, web deploy %s)",
                publishing.control_url or "(none running)",
                publishing.ftp_host,
                publishing.ftp_port,
                publishing.deploy_url,
            )
        self._store.publishing = publishing

    async def start(self) -> None:
        self._nudger.start()
        self._hostname_tasks = [
            asyncio.create_task(self._check_pending_hostnames()),
            asyncio.create_task(self._tick_hostname_checks()),
            asyncio.create_task(self._backups.run(self._backups_stop)),
        ]

    def end_follows(self) -> None:
        """End every `site logs --follow` stream now: management is stopping."""
        self._follows_stop.set()

    async def close(self) -> None:
        self._hostname_stop.set()
        self._backups_stop.set()
        for task in self._hostname_tasks:
            task.cancel()
        await asyncio.gather(*self._hostname_tasks, return_exceptions=True)
        await self._nudger.stop()
        await self._client.close()
        await self._deploy_client.close()
        await self._logs_client.close()
        await self._builds.close()

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        result = await asyncio.to_thread(fn, *args)
        self._nudger.nudge()
        return result

    async def _write_live(self, fn: Callable[..., T], *args: Any) -> T:
        """A site change the owner acts on at once (log in by FTP, open the site): answer once it is
        live. When the controller does not apply it in time (it is down, say), the answer says
        (``pending``) that it is stored but takes effect only once the controller does."""
        result = await asyncio.to_thread(fn, *args)
        generation = await self._read(self._store.generation)
        applied = await self._nudger.settle(generation)
        if applied is False and isinstance(result, dict):
            self._log.warning("a change is stored, but the controller did not apply it in time")
            result["pending"] = _PENDING
        elif applied:
            # Said now: the roles' versions in the DB catch up only at the controller's next health check.
            await asyncio.to_thread(self._store.applied, generation)
            if isinstance(result, dict):
                result.pop("pending", None)
        return result

    # -- auth and accounts

    async def authenticate(self, authorization: str | None) -> Principal:
        """The principal for an ``Authorization: Bearer <token>`` header."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized(
                "an API token is required (Authorization: Bearer <token>)",
                hint="pass --token or set SITECLOUD_TOKEN",
            )
        return await self._read(self.accounts.authenticate, token.strip())

    async def sign_in(self, username: str, password: str, client: str) -> Principal:
        who = await self._read(self.accounts.sign_in, username, password, client)
        self._log.bind(tenant=who.tenant).info("user %s signed in", who.username)
        return who

    async def sign_up(self, body: Json) -> Json:
        user = await self._write(self.accounts.sign_up, body)
        self._log.bind(tenant=user["tenant"]).info("tenant signed up")
        return user

    async def create_session(self, who: Principal) -> tuple[str, str]:
        return await self._read(self.accounts.create_session, who)

    async def session(self, cookie: str) -> tuple[Principal, str] | None:
        return await self._read(self.accounts.session, cookie)

    async def end_session(self, cookie: str) -> None:
        await self._read(self.accounts.end_session, cookie)

    async def create_user(self, who: Principal, body: Json) -> Json:
        user = await self._read(self.accounts.create_user, who, body)
        self._log.info("user %s created (admin: %s)", user["username"], user["admin"])
        return user

    async def list_users(self, who: Principal, *, page: Page = _ALL, tenant: str | None = None) -> Json:
        return await asyncio.to_thread(lambda: self.accounts.list_users(who, page, tenant=tenant))

    async def create_token(self, who: Principal, body: Json) -> Json:
        return await self._read(self.accounts.create_token, who, body)

    async def issue_token(self, body: Json, client: str) -> Json:
        username, password, name = body.get("username"), body.get("password"), body.get("name", "cli")
        if not isinstance(username, str) or not isinstance(password, str) or not isinstance(name, str):
            raise Unauthorized("a user name and password are required")
        return await self._read(self.accounts.issue_token, username, password, name, client)

    async def list_tokens(self, who: Principal, *, page: Page = _ALL) -> Json:
        return await self._read(self.accounts.list_tokens, who, page)

    async def revoke_token(self, who: Principal, token_id: int) -> None:
        await self._read(self.accounts.revoke_token, who, token_id)

    async def issue_reset_link(self, who: Principal, username: str) -> Json:
        answer = await self._read(self.accounts.issue_reset, who, username)
        self._log.info("password reset link issued for user %s", username)
        return answer

    async def reset_username(self, token: str) -> str:
        return await self._read(self.accounts.reset_username, token)

    async def use_reset(self, token: str, password: str) -> str:
        username = await self._read(self.accounts.use_reset, token, password)
        self._log.info("user %s set a new password with a reset link", username)
        return username

    async def get_settings(self) -> Json:
        return await self._read(self.accounts.get_settings)

    async def update_settings(self, who: Principal, body: Json) -> Json:
        return await self._write(self.accounts.update_settings, who, body)

    # -- plans, tenants, subscriptions

    async def create_plan(self, who: Principal, body: Json) -> Json:
        result = await self._write(self._store.create_plan, who, body)
        self._log.info("plan %s created", result["name"])
        return result

    async def list_plans(self, who: Principal, *, page: Page = _ALL) -> Json:
        return await self._read(self._store.list_plans, who, page)

    async def show_plan(self, who: Principal, name: str) -> Json:
        return await self._read(self._store.show_plan, who, name)

    async def update_plan(self, who: Principal, name: str, body: Json) -> Json:
        result = await self._write(self._store.update_plan, who, name, body)
        self._log.info("plan %s updated", name)
        return result

    async def delete_plan(self, who: Principal, name: str) -> None:
        await self._write(self._store.delete_plan, who, name)
        self._log.info("plan %s deleted", name)

    async def create_tenant(self, who: Principal, body: Json) -> Json:
        result = await self._write(self._store.create_tenant, who, body)
        self._log.bind(tenant=result["name"]).info("tenant created")
        return result

    async def list_tenants(self, who: Principal, *, page: Page = _ALL) -> Json:
        return await self._read(self._store.list_tenants, who, page)

    async def show_tenant(self, who: Principal, name: str) -> Json:
        answer = await self._read(self._store.show_tenant, who, name)
        await self._with_storage(answer["subscriptions"])
        return answer

    async def delete_tenant(self, who: Principal, name: str) -> None:
        await self._write(self._store.delete_tenant, who, name)
        await self._sweep_backups()
        self._log.bind(tenant=name).info("tenant deleted, with its subscriptions, sites and users")

    async def _with_storage(self, subs: list[Json]) -> list[Json]:
        sizes = await self._storage.sizes([name for sub in subs for name in sub["site_names"]])
        for sub in subs:
            known = [sizes.get(name) for name in sub["site_names"]]
            if all(size is not None for size in known):
                sub["usage"]["storage_bytes"] = sum(size or 0 for size in known)
        return subs

    async def create_subscription(self, who: Principal, body: Json) -> Json:
        result = await self._write(self._store.create_subscription, who, body)
        self._log.bind(tenant=result["tenant"]).info(
            "subscription %s to plan %s", result["id"], result["plan"]
        )
        result["usage"]["storage_bytes"] = 0
        return result

    async def list_subscriptions(
        self,
        who: Principal,
        *,
        page: Page = _ALL,
        tenant: str | None = None,
        plan: str | None = None,
        state: str | None = None,
    ) -> Json:
        answer = await asyncio.to_thread(
            lambda: self._store.list_subscriptions(who, page, tenant=tenant, plan=plan, state=state)
        )
        await self._with_storage(answer["subscriptions"])
        return answer

    async def show_subscription(self, who: Principal, sub_id: int) -> Json:
        answer = await self._read(self._store.show_subscription, who, sub_id)
        return (await self._with_storage([answer]))[0]

    async def suspend_subscription(self, who: Principal, sub_id: int) -> Json:
        # Answered once the publishers refuse its sites' users.
        result = await self._write_live(self._store.set_subscription_state, who, sub_id, "suspended")
        self._log.bind(tenant=result["tenant"]).info("subscription %s suspended", sub_id)
        # Its content is kept: answered with its size, as `subscription show` is.
        return (await self._with_storage([result]))[0]

    async def resume_subscription(self, who: Principal, sub_id: int) -> Json:
        result = await self._write_live(self._store.set_subscription_state, who, sub_id, "active")
        self._log.bind(tenant=result["tenant"]).info("subscription %s resumed", sub_id)
        return (await self._with_storage([result]))[0]

    async def change_plan(self, who: Principal, sub_id: int, plan: str) -> Json:
        # Its content against the new plan's storage, as the fileserver has it now (not as cached
        # for the usage pages: an upload a moment ago counts).
        current = await self._read(self._store.show_subscription, who, sub_id)
        for name in current["site_names"]:
            self._storage.forget(name)
        (current,) = await self._with_storage([current])
        stored = current["usage"]["storage_bytes"]
        result = await self._write_live(self._store.change_plan, who, sub_id, plan, stored)
        self._log.bind(tenant=result["tenant"]).info(
            "subscription %s moved from plan %s to %s", sub_id, current["plan"], result["plan"]
        )
        return (await self._with_storage([result]))[0]

    async def delete_subscription(self, who: Principal, sub_id: int) -> None:
        await self._write(self._store.delete_subscription, who, sub_id)
        await self._sweep_backups()
        self._log.info("subscription %s deleted", sub_id)

    # -- sites

    async def create_site(self, who: Principal, body: Json) -> Json:
        result = await self._write_live(self._store.create_site, who, body)
        self._log.bind(tenant=result["tenant"], site=result["name"]).info("site created")
        if "pending" in result:
            result["pending"] = (
                f"not live yet: site {result['name']} is created, but the cloud's controller has not "
                "applied it; it goes live, and takes publishing, as soon as the controller runs again"
            )
        return result

    async def list_sites(
        self,
        who: Principal,
        *,
        page: Page = _ALL,
        tenant: str | None = None,
        subscription: int | None = None,
        state: str | None = None,
    ) -> Json:
        return await asyncio.to_thread(
            lambda: self._store.list_sites(who, page, tenant=tenant, subscription=subscription, state=state)
        )

    async def show_site(self, who: Principal, name: str) -> Json:
        site = await self._read(self._store.show_site, who, name)
        workers = await self._read(self._store.site_worker_urls, who, name)
        # A stopped or suspended site runs no app anywhere, nor one the controller has not placed yet:
        # there is nothing to ask about.
        running = site["state"] == SiteState.RUNNING and "pending" not in site
        site["apps"] = await self._app_states(name, workers, detail=who.is_admin) if running else []
        site["quota"] = await self._read(self.metering.site_quota, who, name)
        return site

    # -- usage and quotas

    async def site_usage(self, who: Principal, name: str, start: dt.date, end: dt.date) -> Json:
        await self._read(self._store.check_site, who, name)
        if start <= self.metering.today() <= end:
            await self._note_storage([name])
        return await self._read(self.metering.site_usage, who, name, start, end)

    async def usage_export(self, who: Principal, start: dt.date, end: dt.date) -> Json:
        export = await self._read(self.metering.export, who, start, end)
        if start <= self.metering.today() <= end:
            sites = [s["name"] for s in (await self._read(self._store.list_sites, who))["sites"]]
            await self._note_storage(sites)
            export = await self._read(self.metering.export, who, start, end)
        return export

    async def _note_storage(self, sites: list[str]) -> None:
        """Today's storage of these sites, as the file server says now (best effort)."""
        await self._read(self.metering.record_storage, await self._storage.sizes(sites))

    async def lift_quota(self, who: Principal, name: str) -> Json:
        result = await self._write_live(self.metering.lift_quota, who, name)
        self._log.bind(site=name).info("quota stop lifted for today by an admin")
        return result

    async def _app_states(self, name: str, workers: list[tuple[str, str]], *, detail: bool) -> list[Json]:
        """How the site's app is doing on each of its workers: state and the limits it ran into. A
        worker that does not answer in time is listed as unknown, never holding up the answer. The
        worker's host and why it did not say only with ``detail`` (an admin's view), and even then
        not the client library's error, which names private addresses and control ports; the
        management log has that."""

        async def one(host: str, url: str) -> Json:
            where = {"worker": host} if detail else {}
            try:
                answer = await asyncio.wait_for(
                    self._client.get_json(f"{url}/v1/sites/{name}/app"), _APP_STATE_WAIT
                )
                state = AppDescription.parse(answer, what="unexpected answer").to_json()
            except (SitecloudError, OSError, TimeoutError) as exc:
                self._log.bind(site=name).warning(
                    "app state on worker %s unknown: %s", host, str(exc) or type(exc).__name__
                )
                return {**where, "state": "unknown", "reason": _unknown_app_state(exc, detail=detail)}
            return {**where, **{k: state[k] for k in _APP_FIELDS if k in state}}

        return list(await asyncio.gather(*(one(host, url) for host, url in workers)))

    async def check_site(self, who: Principal, name: str) -> None:
        """Raise unless ``who`` may see the site ``name`` (no such site, or not theirs)."""
        await self._read(self._store.check_site, who, name)

    async def site_storage(self, who: Principal, name: str) -> int | None:
        await self._read(self._store.check_site, who, name)
        return (await self._storage.sizes([name]))[name]

    async def delete_site(self, who: Principal, name: str) -> None:
        await self._write(self._store.delete_site, who, name)
        await self._sweep_backups()
        self._log.bind(tenant=who.tenant, site=name).info("site deleted")

    async def start_site(self, who: Principal, name: str) -> Json:
        result = await self._write_live(self._store.set_site_state, who, name, "running")
        self._log.bind(tenant=result["tenant"], site=name).info("site started")
        return result

    @contextlib.asynccontextmanager
    async def _started_followed(self, who: Principal, name: str) -> AsyncIterator[tuple[Json, BuildFollow]]:
        """:meth:`start_site`, with the site's workers followed from before the start: the build
        begins as soon as the site reaches them."""
        workers = await self._read(self._store.site_worker_urls, who, name)
        follow = self._builds.open(name, [url for _, url in workers])
        try:
            result = await self.start_site(who, name)
            placed = await self._read(self._store.site_worker_urls, who, name)
            if placed != workers:
                await follow.close()
                follow = self._builds.open(name, [url for _, url in placed])
            yield result, follow
        finally:
            await follow.close()

    async def start_site_following(self, who: Principal, name: str) -> AsyncIterator[bytes]:
        """:meth:`start_site`, then the build of the site's newest version until its workers serve it,
        as lines (``{"source", "text"}`` as they come, then ``{"result": …}`` or ``{"error": …}``): a
        version published while the site was stopped is built only now, and its owner is looking
        here, not at the deploy. A refusal (no such site, a suspended subscription) comes before
        the first line."""
        async with self._started_followed(who, name) as (result, follow):

            async def built(emit: Emit) -> Json:
                return (await self._until_built(name, result, follow, emit))[0]

            async for line in _as_lines(built, self._log):
                yield line

    async def start_site_built(self, who: Principal, name: str, *, wait: float) -> tuple[Json, bool]:
        """:meth:`start_site_following` without the lines (the portal's start): the started site, and
        whether its build is over (not when ``wait`` seconds passed first, or it cannot be followed);
        a failed build, or no worker to serve it, is raised."""
        async with self._started_followed(who, name) as (result, follow):
            return await self._until_built(name, result, follow, _unheard, wait=wait)

    async def _until_built(
        self, name: str, started: Json, follow: BuildFollow, emit: Emit, *, wait: float = _BUILD_WAIT
    ) -> tuple[Json, bool]:
        """``started`` once the site's workers serve its newest version built, and whether they do
        (not when the wait ran out first, or the build cannot be followed); a failed build, or no
        worker to serve it, is raised."""
        if started.get("pending"):
            return started, True  # the workers have not been told: nothing builds yet
        try:
            version = await self._newest_version(name)
        except SitecloudError as exc:
            self._log.bind(site=name).warning("cannot tell whether started site %s builds: %s", name, exc)
            await emit("start", "its build cannot be followed: the content store does not answer now")
            return started, False
        if version is None:
            return started, True  # nothing published yet: nothing to build
        outcome = await follow.until_served(version, emit, timeout=wait)
        if outcome.failed:
            raise BuildFailed(
                f"site {name} is started, but version {version} does not run: {build_failure(outcome.failed)}",
                hint=f"fix what the build says and deploy again (`sitecloud site logs {name}` shows the whole "
                f"build), or put an earlier version back with `sitecloud site rollback {name}`",
            )
        if outcome.unserved:
            raise NotServed(
                f"site {name} is started, but no worker is running to serve it", hint=NOT_SERVED_HINT
            )
        if not outcome.done:
            await emit("start", f"its build goes on; follow it with `sitecloud site logs {name}`")
            return started, False
        # As a deploy does: an app that exits before its first answer is not called started well.
        host = urlsplit(str(started.get("url", ""))).hostname or name
        probe = await follow.probe(version, host=host, timeout=_APP_PROBE_SECONDS, emit=emit)
        if probe is not None and probe.outcome == "crashed":
            raise BuildFailed(
                f"site {name} is started, but its app does not start: {probe.detail}",
                hint=f"fix the app and deploy again (`sitecloud site logs {name}` shows its output), or put "
                f"an earlier version back with `sitecloud site rollback {name}`",
            )
        if probe is not None and probe.outcome == "answered":
            await emit("start", f"its app answered GET / with {probe.status}")
        return started, True

    async def stop_site(self, who: Principal, name: str) -> Json:
        result = await self._write_live(self._store.set_site_state, who, name, "stopped")
        self._log.bind(tenant=result["tenant"], site=name).info("site stopped")
        return result

    async def restart_site(self, who: Principal, name: str) -> Json:
        result = await self._write_live(self._store.restart_site, who, name)
        self._log.bind(tenant=result["tenant"], site=name).info("site's app restarted")
        return result

    async def run_command(self, who: Principal, name: str, command: str, timeout: float) -> Json:
        """A command run once in the site's app sandbox on one of its workers (the first: the same
        one each time while the site stays there, so what one command writes the next one finds)."""
        site = await self._read(self._store.show_site, who, name)
        if site["state"] != SiteState.RUNNING:
            raise NotSupported(
                f"site {name!r} is {site['state']}: commands run in its app's sandbox while it runs",
                hint=f"start it first: sitecloud site start {name}",
            )
        workers = await self._read(self._store.site_worker_urls, who, name)
        if not workers:
            raise Unavailable(f"site {name!r} is on no server yet", hint="try again in a moment")
        _, url = workers[0]
        run = CommandRun.parse({"command": command, "timeout": float(timeout)}, what="command")
        with _reaching("the site's server", self._log):
            answer = await self._client.post_json(
                f"{url}/v1/sites/{name}/commands",
                run.to_json(),
                timeout=aiohttp.ClientTimeout(total=timeout + _COMMAND_SLACK, sock_connect=5),
            )
        result = CommandResult.parse(answer, what="the worker's answer")
        self._log.bind(tenant=site["tenant"], site=name).info(
            "command run by %s: exit %s, %.1f s",
            who.username or who.tenant or "an admin",
            result.exit_code,
            result.seconds,
        )
        return result.to_json()

    async def scale_site(self, who: Principal, name: str, instances: Any) -> Json:
        result = await self._write_live(self._store.scale_site, who, name, instances)
        self._log.bind(tenant=result["tenant"], site=name).info("site scaled to %s instance(s)", instances)
        return result

    async def reset_publishing_password(self, who: Principal, name: str) -> Json:
        result = await self._write_live(self._store.reset_publishing_password, who, name)
        self._log.bind(tenant=result["tenant"], site=name).info("publishing password reset")
        return result

    async def publish_profile(self, who: Principal, name: str) -> bytes:
        """The ``.PublishSettings`` file. Only password hashes are stored, so making one sets a new
        publishing password: the old one (and any earlier profile) stops working."""
        site = await self.reset_publishing_password(who, name)
        return publish_settings(
            site=site["name"],
            site_url=site["url"],
            deploy_url=self._store.publishing.deploy_url,
            ftp_host=site["ftp"]["host"],
            ftp_port=site["ftp"]["port"],
            user=site["ftp"]["user"],
            password=site["ftp"]["password"],
        )

    # -- deployment slots

    async def create_slot(self, who: Principal, name: str, slot: Any) -> Json:
        result = await self._write_live(self._store.create_slot, who, name, slot)
        self._log.bind(tenant=result["tenant"], site=name).info("slot %s created", result["slot"])
        return result

    async def list_slots(self, who: Principal, name: str, page: Page = _ALL) -> Json:
        return await self._read(self._store.list_slots, who, name, page)

    async def delete_slot(self, who: Principal, name: str, slot: Any) -> None:
        await self._write(self._store.delete_slot, who, name, slot)
        self._log.bind(tenant=who.tenant, site=name).info("slot %s deleted", slot)

    async def swap_slot(self, who: Principal, name: str, slot: Any, warm_timeout: float) -> Json:
        """Swap a slot with production: the slot's site gets production's sticky settings, is warmed
        through every front end, and only then one generation flips both addresses on every front end
        (the workers of both sites keep serving throughout, so no visitor's request fails)."""
        await self._refuse_an_empty_slot(who, name, slot)
        plan = await self._read(self._store.prepare_swap, who, name, slot)
        await self._nudger.settle(await self._read(self._store.generation), timeout=warm_timeout)
        answering = (await self._read(self._store.list_slots, who, name))["slots"]
        host = next(s["site"] for s in answering if s["slot"] == plan.slot)
        try:
            await warm_site(
                await self._read(self._store.frontend_addresses),
                f"{host}.{self.config.domain}",
                self.config.ca_file,
                timeout=warm_timeout,
            )
        except SitecloudError:
            await self._write(self._store.abort_swap, plan)
            raise
        result = await self._write_live(self._store.commit_swap, plan)
        self._log.bind(tenant=who.tenant, site=name).info(
            "slot %s swapped: production is served by %s", plan.slot, result["production_served_by"]
        )
        return result

    async def _refuse_an_empty_slot(self, who: Principal, name: str, slot: Any) -> None:
        """A slot whose site has nothing published answers its address with the platform's 200
        placeholder, which warms it: swapped, production would serve that page."""
        slots = (await self._read(self._store.list_slots, who, name))["slots"]
        entry = next((s for s in slots if s["slot"] == slot and s["slot"] != "production"), None)
        if entry is None:
            return  # prepare_swap says what is wrong with it
        site = entry["served_by"]
        base = await self._fileserver()
        try:
            with _reaching(_FILESERVER, self._log):
                raw = await self._client.get_json(f"{base}/v1/sites/{site}")
            version = parse_answer(SiteContentInfo, raw, peer=_FILESERVER).version
        except NotFound:
            version = 0  # a slot the fileserver has not been told of yet holds nothing
        if version == 0:
            raise NothingPublished(
                f"slot {slot} of {name} ({site}) has nothing published",
                hint=f"publish to {site} (with its own FTP or deploy credentials), then swap",
            )

    async def set_sticky(self, who: Principal, name: str, keys: Any) -> Json:
        return await self._write(self._store.set_sticky, who, name, keys)

    async def get_app_settings(self, who: Principal, name: str) -> Json:
        return await self._read(self._store.get_settings, who, name)

    async def update_app_settings(self, who: Principal, name: str, changes: Json) -> Json:
        result = await self._write_live(self._store.update_settings, who, name, changes)
        self._log.bind(tenant=who.tenant, site=name).info(
            "app settings changed: %s", ", ".join(sorted(changes))
        )
        return result

    async def list_hostnames(
        self, who: Principal, name: str, *, page: Page = _ALL, state: str | None = None
    ) -> Json:
        return await asyncio.to_thread(lambda: self._store.list_hostnames(who, name, page, state=state))

    async def add_hostname(self, who: Principal, name: str, body: Json) -> Json:
        result = await self._write_live(self._store.add_hostname, who, name, body)
        self._log.bind(tenant=who.tenant, site=name).info(
            "custom hostname %s added (%s)", result["hostname"], result["state"]
        )
        # Its DNS record may be there already: check it now rather than at the next round.
        self._hostname_wake.set()
        return result

    async def delete_hostname(self, who: Principal, name: str, hostname: str) -> None:
        await self._write_live(self._store.delete_hostname, who, name, hostname)
        self._log.bind(tenant=who.tenant, site=name).info("custom hostname %s removed", hostname)

    async def verify_hostname(self, who: Principal, name: str, hostname: str) -> Json:
        result = await self._write_live(self._store.verify_hostname, who, name, hostname)
        self._log.bind(tenant=who.tenant, site=name).info(
            "custom hostname %s checked: %s", result["hostname"], result["state"]
        )
        return result

    async def renew_hostname(self, who: Principal, name: str, hostname: str) -> Json:
        result = await asyncio.to_thread(self._store.renew_hostname, who, name, hostname)
        self._nudger.nudge()  # wakes the controller's certificate loop
        self._log.bind(tenant=who.tenant, site=name).info("certificate of %s: renewal asked for", hostname)
        return result

    async def _check_pending_hostnames(self) -> None:
        """Re-check pending claims now and then, so a name goes live soon after its DNS record appears.

        Management does it, not the controller: it owns the claims, the verification ids and the DNS
        settings, and the tenant's own `verify` runs the same code.
        """
        while True:
            await self._hostname_wake.wait()
            self._hostname_wake.clear()
            try:
                due = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=_HOSTNAME_RECHECK - 1)
                verified = await self._read(self._store.check_pending_hostnames, due, self._hostname_stop)
                for host in verified:
                    self._log.info("custom hostname %s verified by DNS", host)
                if verified:
                    self._nudger.nudge()
            except Exception:
                self._log.exception("checking pending custom hostnames failed")

    async def _tick_hostname_checks(self) -> None:
        while True:
            await asyncio.sleep(_HOSTNAME_RECHECK)
            self._hostname_wake.set()

    async def hostname_availability(self, who: Principal, hostname: str) -> Json:
        return await self._read(self._store.hostname_availability, who, hostname)

    async def site_logs(self, who: Principal, name: str, *, follow: bool, lines: int) -> AsyncIterator[bytes]:
        """The site's log lines from its workers; with ``follow``, new ones as they come."""
        workers = await self._read(self._store.site_worker_urls, who, name)
        stream = stream_site_logs(
            self._logs_client, name, workers, follow=follow, lines=lines, by_host=who.is_admin
        )
        async for line in ended_by(stream, self._follows_stop) if follow else stream:
            yield line

    async def _fileserver(self) -> str:
        urls = await asyncio.to_thread(self._store.fileserver_urls)
        if not urls:
            raise Unavailable("site content is not available: no fileserver is registered")
        return urls[0]

    async def site_versions(self, who: Principal, name: str) -> Json:
        """The site's kept content versions, oldest first: number, time, source, files and bytes."""
        await self._read(self._store.check_site, who, name)
        base = await self._fileserver()
        with _reaching(_FILESERVER, self._log):
            answer = parse_answer(
                VersionList, await self._client.get_json(f"{base}/v1/sites/{name}/versions"), peer=_FILESERVER
            )
        return {"site": name, **answer.to_json()}

    async def site_zip(self, who: Principal, name: str, version: int | None) -> AsyncIterator[bytes]:
        """A version of the site (the newest when ``version`` is None) as a zip, streamed from the
        fileserver; no such version raises before the first chunk."""
        await self._read(self._store.check_site, who, name)
        base = await self._fileserver()
        with _reaching(_FILESERVER, self._log):
            async for chunk in site_zip(self._logs_client, base, name, version):
                yield chunk

    async def _newest_version(self, name: str) -> int | None:
        base = await self._fileserver()
        with _reaching(_FILESERVER, self._log):
            answer = parse_answer(
                VersionList, await self._client.get_json(f"{base}/v1/sites/{name}/versions"), peer=_FILESERVER
            )
        return max((v.version for v in answer.versions), default=None)

    async def _zip_of(self, name: str, version: int) -> AsyncIterator[bytes]:
        base = await self._fileserver()
        async for chunk in site_zip(self._logs_client, base, name, version):
            yield chunk

    async def _sweep_backups(self) -> None:
        """A deleted site's scheduled backups go at once (a new site of its name is someone else's)."""
        _, existing = await asyncio.to_thread(self._store.backup_schedule)
        await asyncio.to_thread(self._backups.sweep, existing)

    async def site_backups(self, who: Principal, name: str) -> Json:
        """The site's scheduled backups, oldest first, and its plan's schedule."""
        plan = await self._read(self._store.site_plan, who, name)
        backups = await asyncio.to_thread(self._backups.of_site, name)
        every = int(plan["backup_every_seconds"])
        return {
            "site": name,
            "every_seconds": every,
            "every": human_every(every),
            "keep": plan["backup_keep"],
            "backups": [b.to_json() for b in backups],
        }

    async def site_backup(self, who: Principal, name: str, backup: str) -> BackupFile:
        """One scheduled backup of the site, to be sent as a file."""
        await self._read(self._store.check_site, who, name)
        return await asyncio.to_thread(self._backups.find, name, backup)

    async def restore_site_backup(self, who: Principal, name: str, backup: str) -> Json:
        """Put a scheduled backup's content back as the site's newest version (a web deploy of it)."""
        found = await self.site_backup(who, name, backup)
        f = await asyncio.to_thread(found.path.open, "rb")

        async def chunks() -> AsyncIterator[bytes]:
            while chunk := await asyncio.to_thread(f.read, 256 * 1024):
                yield chunk

        try:
            answer = await self.deploy(who, name, chunks())
        finally:
            f.close()
        self._log.bind(tenant=who.tenant, site=name).info(
            "scheduled backup %s restored as version %s", backup, answer.get("version")
        )
        return {**answer, "restored": backup}

    async def rollback_site(self, who: Principal, name: str, version: int | None) -> Json:
        """Make an earlier version the site's content again, as a new version (every worker flips to it);
        ``version`` None: the one before the newest."""
        await self._read(self._store.check_publishable, who, name)
        base = await self._fileserver()
        wanted = RollbackRequest(version=version).to_json()
        with _reaching(_FILESERVER, self._log):
            answer = parse_answer(
                RollbackAnswer,
                await self._client.request_json("POST", f"{base}/v1/sites/{name}/rollback", json=wanted),
                peer=_FILESERVER,
            )
        self._storage.forget(name)
        self._log.bind(tenant=who.tenant, site=name).info(
            "rolled back to version %s as version %s", answer.rolled_back_to, answer.version
        )
        return {"site": name, **answer.to_json()}

    async def backup(self, who: Principal) -> Json:
        """The runtime DB's tenant data (see :mod:`roles.management._backup`), and the content version
        of each of its sites as the fileserver had it just after: a backup downloads those versions."""
        require_admin(who)
        dump = await asyncio.to_thread(dump_tables, self._db)
        names = [row["name"] for row in dump["tables"]["sites"]]
        versions: dict[str, int] = {}
        if names:
            base = await self._fileserver()
            answer = parse_answer(
                SiteVersions, await self._client.get_json(f"{base}/v1/versions"), peer=_FILESERVER
            )
            versions = {n: answer.sites.get(n, 0) for n in names}
        self._log.info("backup of %s sites taken", len(names))
        return {**dump, "site_versions": versions}

    async def restore(
        self, who: Principal, revision: str, tables: dict[str, list[Json]], force: bool
    ) -> Json:
        """Put a backup's tenant data into this cloud (refused unless it is empty, or ``force``); answers
        once the roles run the restored sites, so their content can be deployed at once."""
        require_admin(who)
        counts = await asyncio.to_thread(restore_tables, self._db, revision, tables, force=force)
        # Bounded by the internal client's own timeout; the CLI retries a deploy the roles do not know yet.
        await self._nudger.settle(await self._read(self._store.generation), timeout=8.0)
        self._log.info("restored a backup: %s", ", ".join(f"{n} {t}" for t, n in counts.items()))
        return {"format": BACKUP_FORMAT, "restored": counts}

    async def _deploy_url(self, who: Principal, name: str) -> str:
        await self._read(self._store.check_publishable, who, name)
        publisher = self._store.publishing.control_url
        if not publisher:
            raise Unavailable(
                "web deploy is not available: no publisher is running",
                hint="see `sitecloud role list`; start one with `sitecloud role start publisher HOST`",
            )
        return f"{publisher.rstrip('/')}/v1/deploy/{name}"

    async def deploy_following(
        self, who: Principal, name: str, body: AsyncIterable[bytes]
    ) -> AsyncIterator[bytes]:
        """:meth:`deploy`, and then the build until the site's workers serve it, as the publisher's
        lines (``{"source", "text"}``, then ``{"result": …}`` or ``{"error": …}``) as they come."""
        url = await self._deploy_url(who, name)
        with _reaching(_PUBLISHER, self._log), _unknown_to_the_publisher(name):
            async for line in self._deploy_client.lines(
                "POST",
                url,
                quiet_for=_DEPLOY_TIMEOUT,
                data=body,
                headers={"Content-Type": "application/zip", "Accept": "application/x-ndjson"},
            ):
                if line.startswith(b'{"result"'):
                    self._storage.forget(name)
                    self._log.bind(site=name).info(
                        "deployed and built: %s", line.decode(errors="replace").strip()
                    )
                yield line

    async def deploy(self, who: Principal, name: str, body: AsyncIterable[bytes]) -> Json:
        """Stream a zip to the publisher, which replaces the site's content with it in one version."""
        url = await self._deploy_url(who, name)
        with _reaching(_PUBLISHER, self._log), _unknown_to_the_publisher(name):
            answer = parse_answer(
                DeployResult,
                await self._deploy_client.request_json(
                    "POST", url, data=body, headers={"Content-Type": "application/zip"}
                ),
                peer=_PUBLISHER,
            )
        self._storage.forget(name)
        self._log.bind(site=name).info("deployed version %s", answer.version)
        return answer.to_json()

    # -- roles


def _unknown_app_state(exc: BaseException, *, detail: bool) -> str:
    """Why a worker did not say how a site's app is doing: for a tenant, only whether its server is
    there; for an admin, what to look at (never the client's error text: addresses and ports)."""
    said = isinstance(exc, SitecloudError) and not isinstance(exc, Unavailable)
    if not detail:
        return _UNSAID if said else _UNREACHED
    if said:
        assert isinstance(exc, SitecloudError)
        return f"the worker answered: {exc.message}"
    return f"the worker cannot be reached ({unreached_reason(exc)}): see `sitecloud role list`"


async def _unheard(source: str, text: str) -> None:
    """Where a build's lines go when nobody reads them as they come (the site's log has them)."""


async def _as_lines(run: Callable[[Emit], Awaitable[Json]], log: ContextLogger) -> AsyncIterator[bytes]:
    """NDJSON lines of ``run``: each line it emits as it comes, then ``{"result": …}`` with what it
    returns, or ``{"error": …}`` with what it raised."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    def put(line: Json) -> None:
        queue.put_nowait(json.dumps(line).encode() + b"\n")

    async def emit(source: str, text: str) -> None:
        put({"source": source, "text": text})

    async def work() -> None:
        try:
            put({"result": await run(emit)})
        except SitecloudError as err:
            put(err.to_json())
        except Exception:
            log.exception("a streamed request failed")
            put(SitecloudError("internal error; the request was not completed").to_json())
        finally:
            queue.put_nowait(None)

    task = asyncio.create_task(work())
    try:
        while (line := await queue.get()) is not None:
            yield line
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.contextmanager
def _reaching(role: str, log: ContextLogger) -> Iterator[None]:
    """A call to ``role`` that does not reach it says so, and why in a few words: the client's error
    names the role's private address and control port, no tenant's business (the log keeps it). What
    the role itself answered goes on as it is."""
    try:
        yield
    except Unavailable as err:
        if not isinstance(err.__cause__, aiohttp.ClientError | TimeoutError):
            raise
        log.warning("%s", err)
        raise Unavailable(
            f"{role} is unavailable now ({unreached_reason(err)})",
            hint="try again in a moment; if it lasts, an admin can see why with `sitecloud role list`",
        ) from None


@contextlib.contextmanager
def _unknown_to_the_publisher(name: str) -> Iterator[None]:
    """The site exists (management checked), so a publisher that does not know it has not been told
    yet: the controller has not pushed it (it is not running, or a moment behind). That is worth a
    retry, not a "no such site"."""
    try:
        yield
    except NotFound as err:
        if "is not served by this publisher" not in err.message:
            raise
        raise Unavailable(
            f"the publisher does not know site {name} yet: its configuration has not reached it",
            hint="try again in a moment; if it lasts, check that the controller (`sitecloud up`) runs",
        ) from None
