"""Which sites are dynamic, and their app processes: woken on demand, stopped when idle, restarted.

An idle dynamic site costs one small :class:`AppSite` and no process. The first request starts the
process (concurrent first requests share that start); the sweep stops it after its idle timeout,
enforces the memory limit where no cgroup does, and counts CPU seconds. A crash is restarted by the
next request after a back-off; a new content version or new settings retire the running process
gracefully (requests under way finish on it, new ones go to a new one).

As root every app runs in a sandbox of its own (``_sandbox.py``): namespaces, the site's uid, its
cgroup, and a disk quota for what it writes (``_volume.py``). A memory kill, a process-limit hit and
a full disk each get one line in the site's log and a count in :meth:`AppManager.describe`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import hashlib
import os
import shlex
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from roles.worker._appserver.sitecloud_appserver import MEMORY_EXIT
from roles.worker._cache import SiteVersion, version_line, version_tag
from roles.worker.apps._cgroup import AppGroup, CgroupTree
from roles.worker.apps._files import WritableFiles, mount_files, unmount_files
from roles.worker.apps._instance import AppInstance, Captured
from roles.worker.apps._isolation import (
    Identities,
    SiteIdentity,
    harden_home,
    protect_site_dir,
    reap_orphans,
)
from roles.worker.apps._launch import (
    LaunchPlan,
    SiteDirs,
    appserver_for_apps,
    compile_appserver,
    pick_python,
    plan_launch,
)
from roles.worker.apps._netns import NetnsDialer
from roles.worker.apps._npm import (
    build_command,
    install_node_packages,
    link_node_modules,
    node_packages_dir,
)
from roles.worker.apps._packages import install_requirements, packages_dir, prune_packages
from roles.worker.apps._pts import mount_pts, pty_pool, ptys_per_app, sweep_pts, unmount_pts
from roles.worker.apps._sandbox import EGRESS_MODES, Sandbox, SandboxMounts
from roles.worker.apps._sitelog import SiteLog
from roles.worker.apps._spec import (
    SIZES,
    AppSpec,
    Runtime,
    app_spec,
    collectstatic_command,
    detect_runtime,
    node_entry,
    procfile_command,
    procfile_web,
    unserved_static_note,
)
from roles.worker.apps._tenancy import (
    Slot,
    StartBudget,
    fair_share,
    owner_of,
    pick_victims,
    retry_seconds,
)
from roles.worker.apps._volume import BlankImages, HomeVolume, unmount_lazily, unmount_stale
from roles.worker.config import WorkerConfig
from shared.backoff import Backoff
from shared.contracts.apps import COMMAND_OUTPUT_MAX, AppDescription, AppProbe, AppState, CommandResult
from shared.contracts.health import WorkerFigures
from shared.contracts.snapshots import WorkerSite, WorkerSnapshot
from shared.errors import (
    BuildFailed,
    InUse,
    InvalidInput,
    NotFound,
    NotSupported,
    SitecloudError,
    Unavailable,
)
from shared.logs import ContextLogger, get_logger
from shared.words import counted

__all__ = ["AppManager", "AppSite", "run_dir_for"]

Lookup = Callable[[str], tuple[bool, SiteVersion | None]]
SWEEP_INTERVAL = 0.25
# Starts of one wake-up when the content keeps changing under it; the last one serves what it got.
_START_ROUNDS = 3
# A static site's last log lines that its log as an app starts with (what `site logs` shows by default).
_CARRIED_LINES = 100
# Waits before an app that failed to start or crashed is started again.
_RETRY = Backoff(first=0.25, cap=30.0)
# An app up this long that answers has recovered: its earlier exits no longer delay its restarts.
_STEADY_SECONDS = 5.0
# An app's line this recent at its exit is taken as why it exited (site show's "last:").
_LAST_WORDS = 5.0
_BUILD_FAILED = "the site's build failed: its app does not start until a version of it builds"
_REBUILD = "the deploy's answer and `sitecloud site logs` say why; fix it and deploy again"
# Where a sandboxed ``command`` app listens: its network namespace is its own, any port will do.
SANDBOX_PORT = 8000
_NO_SPEC = AppSpec()
# Runtimes whose dependencies the worker installs (requirements.txt, package.json).
_PACKAGED: tuple[Runtime, ...] = ("python", "node", "command")
# Runtimes that listen on $PORT themselves (in a sandbox, in its own network namespace).
_PORT_RUNTIMES: tuple[Runtime, ...] = ("command", "node")
# A start runs with at least a whole core for this long (its interpreter, imports and first answer:
# at a small worker's half core, Node took 139 ms to its first answer instead of 80), at most once per
# site in _BOOST_EVERY, so an app that exits after every request gains no lasting CPU by it.
_BOOST_S = 1.0
_BOOST_EVERY = 60.0
# A site whose starts are refused for its subscription's share says so in its log this often at most.
_REFUSED_LOG_EVERY = 10.0


class AppSite:
    """One dynamic site: what runs (runtime, entry, version) and how its process is doing."""

    __slots__ = (
        "always_on",
        "boosted_at",
        "build_error",
        "content_id",
        "cpu_total",
        "crashes",
        "crashes_before",
        "disk_full",
        "disk_hits",
        "entry",
        "failures",
        "generation",
        "identity",
        "instance",
        "last_crash",
        "last_used",
        "log",
        "memory_kills",
        "memory_mb_seconds",
        "name",
        "owner",
        "packages_task",
        "pids_hits",
        "refused_at",
        "retry_at",
        "root",
        "runtime",
        "spec",
        "starting",
        "starts",
        "told_node_modules",
        "version",
        "volume",
        "web",
    )  # fmt: skip

    def __init__(self, name: str, content_id: str) -> None:
        self.name = name
        # Whose share of the worker's app slots and starts it counts against (see _tenancy.py).
        self.owner = owner_of(name, 0)
        # When a start of it was last refused for its subscription's share (its log says so once
        # a while, not at every visit).
        self.refused_at = -_REFUSED_LOG_EVERY
        # The site incarnation's content id (never the Unix uid its app runs as: see identity).
        self.content_id = content_id
        self.spec = _NO_SPEC
        self.runtime: Runtime = "static"
        self.entry = ""
        self.root = ""
        # The folder of the version that visitors see as "/" ("" for its root: see web_root).
        self.web = ""
        self.version = 0
        self.always_on = False
        self.generation: tuple[Any, ...] = ()
        self.instance: AppInstance | None = None
        self.starting: asyncio.Task[AppInstance] | None = None
        self.packages_task: asyncio.Task[Path | None] | None = None
        # Why this version's requirements.txt or package.json could not be installed (its app then
        # does not start): None while it builds, once it is built, or when it has nothing to build.
        self.build_error: str | None = None
        # The version whose own node_modules/ the site's log has told of (see _own_node_modules).
        self.told_node_modules = 0
        self.identity: SiteIdentity | None = None
        # Where the site's quota volume mounts here (the app's writes are in its ``files/``, see
        # _written.py): "" when this worker has none, None until the site's identity is known.
        self.volume: str | None = None
        self.log: SiteLog | None = None
        self.failures = 0
        self.retry_at = 0.0
        self.last_used = 0.0
        self.cpu_total = 0.0
        # Memory held times time, summed at each sweep (metering: MB-seconds since the worker started).
        self.memory_mb_seconds = 0.0
        self.starts = 0
        self.boosted_at = -_BOOST_EVERY
        self.crashes = 0  # every crash since this worker started (a counter: the metric sums it)
        # Of those, the crashes of the versions and settings it ran before the ones it runs now.
        self.crashes_before = 0
        # How the last crash went: the exit, and the app's last line before it (site show says it).
        self.last_crash: str | None = None
        # Limits hit: memory kills, process-limit hits, times its disk quota filled up (and now).
        self.memory_kills = 0
        self.pids_hits = 0
        self.disk_hits = 0
        self.disk_full = False


class AppManager:
    def __init__(self, config: WorkerConfig, lookup: Lookup, root: Path) -> None:
        if config.size not in SIZES:
            raise InvalidInput(f"worker size must be one of {', '.join(SIZES)}, not {config.size!r}")
        if config.app_egress not in EGRESS_MODES:
            raise InvalidInput(
                f"app_egress must be one of {', '.join(EGRESS_MODES)}, not {config.app_egress!r}"
            )
        self._config = config
        self._lookup = lookup
        self._log = get_logger("worker", host=config.host)
        # Told how long each cold start took, from the request that woke the app to its first answer
        # ready (installs included): the worker's metrics keep the histogram.
        self.observe_cold_start: Callable[[float], None] = lambda seconds: None
        size = SIZES[config.size]
        self.default_limits = size.limits
        self.max_active = config.max_active_apps or size.max_active_apps
        self._budget = StartBudget(config.subscription_app_starts, config.subscription_app_start_window)
        self._isolate = os.geteuid() == 0
        self._identities = Identities(config.state_dir / "app-ids.json", isolate=self._isolate)
        # The apps root: content (sites/), app homes and temp dirs (apps/); see roles/worker/_layout.py.
        self._root = root
        self._apps_dir = root / "apps"
        # Launchers every app's PATH has (``python``): see _make_tools.
        self._tools = self._apps_dir / "bin"
        self._run_dir = run_dir_for(root)
        self._python = pick_python(config.app_python, isolate=self._isolate)
        self._appserver = ""
        self._cgroup: CgroupTree | None = None
        self._sandbox: Sandbox | None = None
        # Makes the sockets that reach sandboxed apps' ports (made with the sandbox).
        self._dialer: NetnsDialer | None = None
        # Disk quota volumes by site number, and which running instance holds which.
        self._volumes: dict[int, HomeVolume] = {}
        self._blanks = BlankImages(self._apps_dir / "blank")
        self._held: dict[AppInstance, HomeVolume] = {}
        self._files: dict[AppInstance, WritableFiles] = {}
        self._pts: dict[AppInstance, str] = {}
        self._pts_off = ""  # why this worker's apps get bwrap's own, uncapped devpts
        # Each instance's share of the host's pseudo-terminals, so the worker's apps never hold all.
        self.ptys_per_app = ptys_per_app(pty_pool(), self.max_active)
        self._pts_swept = False
        self._files_off = ""  # why apps' folders stay read-only on this worker ("": they need not)
        self._quota = False
        # Held sites (name → incarnation's content id) and the app settings of those that have any.
        self._content_ids: dict[str, str] = {}
        self._specs: dict[str, AppSpec] = {}
        # Held sites' owners: their subscription, or the site itself when the snapshot does not say.
        self._owners: dict[str, str] = {}
        # Sites found static, with the version that was looked at (no second look until it changes).
        self._static: dict[str, int] = {}
        # Static sites' log streams (access lines), by site.
        self._static_logs: dict[str, SiteLog] = {}
        self._sites: dict[str, AppSite] = {}
        # requirements.txt installs in progress, by package directory.
        self._building: dict[Path, asyncio.Task[Path | None]] = {}
        # Sites with a command of their owner's running (one at a time each).
        self._commands: set[str] = set()
        self._active: dict[AppInstance, AppSite] = {}
        self._sweeper: asyncio.Task[None] | None = None
        # Content ids whose app homes stay (None: the controller does not say; nothing is removed).
        self._live_homes: set[str] | None = None
        self._home_removal: asyncio.TimerHandle | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._sockets = 0
        self._stopping = False
        self._last_sweep = 0.0

    # -- what the data server asks (cheap: one dict lookup for a static site)

    @property
    def active(self) -> bool:
        """Whether any held site is dynamic (the data server keeps all request headers only then)."""
        return bool(self._sites)

    def dynamic(self, site: str) -> AppSite | None:
        return self._sites.get(site)

    def sites(self) -> dict[str, AppSite]:
        """The dynamic sites held now (for the worker's serving processes)."""
        return dict(self._sites)

    @property
    def log(self) -> ContextLogger:
        return self._log

    @property
    def run_dir(self) -> Path:
        return self._run_dir

    # -- the pushed snapshot

    def apply(self, snapshot: WorkerSnapshot, failed: Mapping[str, str] | None = None) -> None:
        """Take the snapshot's sites but ``failed`` ones (found unusable, with why): their apps stop."""
        failed = failed or {}
        self._content_ids = {
            name: entry.content_id
            for name, entry in snapshot.sites.items()
            if isinstance(entry, WorkerSite) and name not in failed
        }
        self._specs = {
            name: spec
            for name, entry in snapshot.sites.items()
            if isinstance(entry, WorkerSite) and (spec := app_spec(entry, self.default_limits)) is not None
        }
        self._owners = {
            name: owner_of(name, entry.subscription)
            for name, entry in snapshot.sites.items()
            if isinstance(entry, WorkerSite)
        }
        for name in list(self._sites):
            if name in failed:
                self._site_log(self._sites[name]).write("worker", f"stopped: {failed[name]}")
                self._drop(name, "its settings cannot be used")
            elif name not in self._content_ids:
                self._drop(name, "the site left this worker")
        for name in self._static.keys() - self._content_ids.keys():
            del self._static[name]
        for name in self._static_logs.keys() - self._content_ids.keys():
            self._static_logs.pop(name).close()
        for name in self._content_ids:
            self.refresh(name)
        held, unreadable = snapshot.content_ids()
        if snapshot.kept is not None and not unreadable:
            self._live_homes = {*held.values(), *snapshot.kept}
            if self._home_removal is None and not self._stopping:
                self._home_removal = asyncio.get_running_loop().call_later(
                    self._config.app_home_removal_delay, lambda: self._spawn(self._remove_gone_homes())
                )

    async def _remove_gone_homes(self) -> None:
        """Remove the app homes (its files, quota volume, packages and logs) of site incarnations
        that are gone from this worker: deleted, or moved to another one. A stopped site's stays."""
        self._home_removal = None
        live = self._live_homes
        if live is None or self._stopping:
            return
        owners = await asyncio.to_thread(self._identities.owners)
        in_use = {a.identity.number for a in self._sites.values() if a.identity is not None}
        in_use |= {inst.identity.number for inst in self._active}
        entries = await asyncio.to_thread(lambda: list(self._apps_dir.iterdir()))
        for entry in entries:
            number = int(entry.name) if entry.name.isdigit() else 0
            owner = owners.get(number)
            if owner is None or owner in live or number in in_use:
                continue
            volume = self._volumes.pop(number, None)
            try:
                if volume is not None:
                    await volume.close()
                elif await asyncio.to_thread(os.path.ismount, entry / "volume"):
                    await unmount_lazily(entry / "volume")
                await asyncio.to_thread(shutil.rmtree, entry)
            except OSError as exc:
                self._log.warning("could not remove the app home %s of a site gone from here: %s", entry, exc)
                continue
            self._log.info("removed the app home %s of site %s, gone from this worker", entry.name, owner)

    def refresh(self, name: str) -> None:
        """Look at a site again: after a snapshot, or when its content flipped to another version."""
        content_id = self._content_ids.get(name)
        held, version = self._lookup(name)
        if content_id is None or not held or version is None:
            self._drop(name, "nothing to serve")
            return
        spec = self._specs.get(name, _NO_SPEC)
        if spec.runtime is None and self._static.get(name) == version.number:
            self._drop(name, "static")
            return
        runtime, entry = detect_runtime(version.root)
        if spec.runtime is not None and spec.runtime != runtime:
            runtime, entry = spec.runtime, _default_entry(spec.runtime, version.root)
        entry = spec.entry or entry
        if runtime == "static":
            if self._isolate and self._static.get(name) != version.number:
                # Static content is public, but not to other sites' processes by path.
                protect_site_dir(self._root / "sites" / name, None, None)
            self._static[name] = version.number
            self._drop(name, "static")
            return
        self._static.pop(name, None)
        app = self._sites.get(name)
        if app is None or app.content_id != content_id:
            if app is not None:
                self._drop(name, "another incarnation of the site")
            app = self._sites[name] = AppSite(name, content_id)
        app.owner = self._owners.get(name, app.owner)
        # The root too: a version built again with all its files (out of packs) keeps its number.
        generation = (runtime, entry, spec.env, spec.limits, version.number, version.root, spec.restarts)
        if app.generation == generation:
            app.spec, app.always_on = spec, spec.always_on
            return
        restart = bool(app.generation) and app.instance is not None
        asked = bool(app.generation) and app.generation[:-1] == generation[:-1]
        app.spec, app.runtime, app.entry, app.always_on = spec, runtime, entry, spec.always_on
        app.root, app.version, app.generation = version.root, version.number, generation
        app.web = version.web
        app.failures, app.retry_at = 0, 0.0
        app.build_error = None
        # What crashed ran other content or settings: history now, not this app's state.
        app.crashes_before, app.last_crash = app.crashes, None
        if app.identity is not None:
            self._protect(app)
        if runtime in _PACKAGED:
            self._start_packages(app)
        if restart:
            why = "its owner asked" if asked else f"version {version.number} or new settings"
            self._site_log(app).write("worker", f"restarting: {why}")
            if asked:
                self._retire(app)  # a restart is asked to be rid of the running process at once
            else:
                self._replace(app)

    # -- lifecycle

    async def start(self) -> None:
        self._cgroup = CgroupTree.detect(self._log)
        self._apps_dir.mkdir(exist_ok=True)
        if self._isolate:
            harden_home(self._config.home, self._root)
            # Apps a worker that died hard left behind: this worker starts its sites afresh.
            reaped = await asyncio.to_thread(reap_orphans, self._apps_dir)
            if reaped:
                self._log.warning("stopped %s app process(es) left running by an earlier worker", reaped)
        else:
            self._log.info("apps run as the worker's own user: start the worker as root to isolate sites")
        self._appserver = appserver_for_apps(self._root, isolate=self._isolate)
        await asyncio.to_thread(_make_tools, self._tools, self._python)
        self._spawn(compile_appserver(self._python, self._appserver))
        if self._isolate:
            self._sandbox = Sandbox.detect(
                self._log,
                python=self._python,
                appserver=self._appserver,
                egress=self._config.app_egress,
                enabled=self._config.app_sandbox,
                state_dir=self._config.state_dir,
            )
            if self._sandbox is not None:
                self._dialer = NetnsDialer()
            self._quota = self._sandbox is not None and HomeVolume.available()
            if self._sandbox is not None and not self._quota:
                self._log.warning("app disk quota: no mkfs.ext4/mount here (e2fsprogs); homes are unlimited")
            if self._quota:
                # New sites of the usual size find a volume made ahead.
                self._blanks.fill(self._config.app_disk_mb or self.default_limits.disk_mb)
                try:
                    stale = await unmount_stale(self._apps_dir)
                except (SitecloudError, OSError) as exc:
                    self._log.warning("app disk quota: could not unmount volumes left mounted: %s", exc)
                else:
                    if stale:
                        self._log.warning(
                            "unmounted %s app volume(s) left mounted by an earlier worker", stale
                        )
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        self._stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._home_removal is not None:
            self._home_removal.cancel()
        for task in list(self._background):
            task.cancel()
        for app in self._sites.values():
            if app.starting is not None:
                app.starting.cancel()
        instances = list(self._active)
        for inst in instances:
            inst.terminate("worker stopping")
        if instances:
            await asyncio.wait([asyncio.ensure_future(i.wait_closed()) for i in instances], timeout=7)
        await asyncio.gather(
            *[t for t in (self._sweeper, *self._background) if t is not None], return_exceptions=True
        )
        await self._blanks.close()
        if self._dialer is not None:
            self._dialer.close()
            self._dialer = None
        # Releases under way were cancelled with the background tasks: unmount what is left.
        for volume in self._volumes.values():
            try:
                await volume.close()
            except SitecloudError as exc:
                self._log.warning("app disk quota: %s", exc.message)
        for app in self._sites.values():
            if app.log is not None:
                app.log.close()
        # Static sites' logs too: a follow of one would otherwise hold the control port's drain.
        for log in self._static_logs.values():
            log.close()
        with contextlib.suppress(OSError):
            self._run_dir.rmdir()  # empty once every app has gone

    # -- the request path

    async def acquire(self, app: AppSite, *, wait: float | None = None, charge: bool = True) -> AppInstance:
        """The site's running process, woken if need be, within ``wait`` (the start bound by default;
        else Unavailable: the start goes on for the next request). A start from idle is ``charge``d
        to the site's subscription: past its share, Unavailable with a Retry-After (see _admit)."""
        inst = app.instance
        if inst is not None and inst.alive:
            return inst
        if app.starting is None:
            now = time.monotonic()
            if app.retry_at > now and app.build_error is not None:
                raise Unavailable(_BUILD_FAILED, hint=_REBUILD)
            if app.retry_at > now:
                raise Unavailable(
                    f"the site's app stopped unexpectedly; it starts again in {app.retry_at - now:.0f} s",
                    hint="its log says why (sitecloud site logs)",
                )
            if charge:
                self._admit(app, now)
            app.starting = asyncio.get_running_loop().create_task(self._start(app))
            app.starting.add_done_callback(lambda task: self._start_done(app, task))
        try:
            bound = self._config.app_start_timeout if wait is None else wait
            return await asyncio.wait_for(asyncio.shield(app.starting), bound)
        except TimeoutError:
            raise Unavailable("the site's app did not start in time", hint="its log says why") from None

    async def probe(self, name: str, version: int, host: str, timeout: float) -> AppProbe:
        """Start the site's app as a first visitor would and ask it for ``/`` once: whether what was
        published runs at all. Straight to its socket, past the request path: one exchange, not a visit."""
        app = self._sites.get(name)
        if app is None or app.version != version or app.runtime == "php":
            # php-cgi starts whatever the scripts hold: their errors are per request.
            return AppProbe(site=name, outcome="none", detail=self._static_build_note(name, app))
        try:
            # The version's own process, not the one answering until it is up (see _replace); the
            # deploy that asks waits for what runs before the start too (a build, a release).
            why = Unavailable(f"version {version} did not start", hint="its log says why")
            if app.starting is not None:
                try:
                    await asyncio.wait_for(asyncio.shield(app.starting), self.start_bound)
                except TimeoutError:
                    raise Unavailable(
                        "the site's app did not start in time", hint="its log says why"
                    ) from None
                except Unavailable as exc:
                    why = exc
            # A deploy's own check is not a visit: it never waits for the subscription's budget.
            inst = await self.acquire(app, wait=self.start_bound, charge=False)
            if inst.version != version:
                raise why  # (the version before answers on)
        except Unavailable as exc:
            return AppProbe(site=name, outcome="crashed", detail=(app.last_crash or str(exc))[:2000])
        self.begin(app, inst)
        answered = False
        try:
            ask = asyncio.ensure_future(_ask_root(inst, host))
            deadline = time.monotonic() + timeout
            while not ask.done() and inst.alive and time.monotonic() < deadline:
                await asyncio.wait((ask,), timeout=0.05)
            if ask.done() and ask.exception() is None:
                answered = True
                return AppProbe(site=name, outcome="answered", status=ask.result())
            ask.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, ValueError, ConnectionError):
                await ask
            for _ in range(40):  # its exit is seen (and its reason kept) a moment after the socket's end
                if not inst.alive and app.instance is not inst:
                    break
                await asyncio.sleep(0.05)
            if not inst.alive:
                return AppProbe(site=name, outcome="crashed", detail=(app.last_crash or "it exited")[:2000])
            said = self._site_log(app).last_app_line
            return AppProbe(
                site=name,
                outcome="slow",
                detail=f"no answer to GET / within {timeout:g} s"
                + (f"; its last output: {said}"[:1500] if said else ""),
            )
        finally:
            self.end(app, inst, answered=answered)

    def _static_build_note(self, name: str, app: AppSite | None) -> str:
        """What a deployer of a static site with a ``build`` script (a Vite or React app published as
        its sources) should know: nothing builds it here, so its sources are what visitors get."""
        if app is not None:
            return ""
        held, version = self._lookup(name)
        if not held or version is None:
            return ""
        python = _python_without_entry(version.root)
        if python is not None:
            return (
                "this site is served as the static files it has: it has a requirements.txt but no "
                "app.py, wsgi.py, asgi.py, main.py or manage.py at its top for the platform to run; "
                f"name its app with `sitecloud site set {name} runtime=python entry={python}`"
            )
        if build_command(version.root) is None:
            return ""
        return (
            "this site is served as the static files it has: its package.json has a build script, "
            "which runs here only for a Node app (one with a start script or a server.js); build it "
            "and publish what the build makes (npm run build, then `sitecloud deploy "
            f"{name} dist/`), or add a start script that serves it"
        )

    @property
    def start_bound(self) -> float:
        """The longest a start may take with its build and release commands before the app's own."""
        return self._config.app_start_timeout + 2 * self._config.app_release_timeout

    def running(self, app: AppSite) -> AppInstance | None:
        inst = app.instance
        return inst if inst is not None and inst.alive else None

    def begin(self, app: AppSite, inst: AppInstance) -> None:
        inst.inflight += 1
        app.last_used = time.monotonic()

    def end(self, app: AppSite, inst: AppInstance, *, answered: bool) -> None:
        inst.inflight -= 1
        app.last_used = time.monotonic()
        if answered:
            inst.served = True
            if time.monotonic() - inst.started >= _STEADY_SECONDS:
                # An app that exits after each answer is not well: each visit would cost the worker a
                # new sandbox, so its exits count on until it has stayed up a while.
                app.failures = 0
        if inst.retiring and inst.inflight <= 0:
            inst.terminate("retired")

    def site_log(self, app: AppSite) -> SiteLog:
        return self._site_log(app)

    # -- figures and control

    def figures(self) -> WorkerFigures:
        cpu = {name: round(s, 3) for name, app in self._sites.items() if (s := self.cpu_seconds(app)) > 0}
        return WorkerFigures(
            apps_dynamic=len(self._sites),
            apps_active=sum(1 for i in self._active if not i.retiring),
            apps_max_active=self.max_active,
            app_limits="cgroup" if self._cgroup is not None else "rlimit",
            app_sandbox="bwrap" if self._sandbox is not None else "off",
            app_egress="slirp4netns" if self._sandbox is not None and self._sandbox.slirp4netns else "off",
            app_cpu_seconds=cpu,
            apps_dir=str(self._root),
        )

    def isolation_gaps(self) -> list[str]:
        """What of the tenant wall this worker runs without although it could have it (it isolates
        sites, as root): the worker says Degraded with these until they are fixed. A sandbox the admin
        turned off (``app_sandbox: false``) is a choice, not a gap. Not root, it has no wall at all:
        it says so too, since a cloud that runs tenants' apps that way must not look like one that
        isolates them."""
        if not self._isolate:
            return [
                "apps run as this worker's own user, not isolated from each other or from the worker "
                "(run the worker as root for each app's sandbox, uid, cgroup and disk quota)"
            ]
        gaps = []
        if self._sandbox is None and self._config.app_sandbox:
            gaps.append("apps run without a sandbox (install bubblewrap and util-linux on this host)")
        if self._cgroup is None:
            gaps.append(
                "no cgroup holds apps' memory, CPU and processes (enable the memory, cpu and pids controllers)"
            )
        if self._sandbox is not None and not self._quota:
            gaps.append("apps' homes have no disk quota (install e2fsprogs; loop devices needed)")
        if self._sandbox is not None and self._pts_off:
            gaps.append(
                f"apps' pseudo-terminals are not capped (mounting a devpts instance failed: {self._pts_off})"
            )
        if self._sandbox is not None and self._config.app_egress != "off" and not self._sandbox.slirp4netns:
            gaps.append(
                "apps have no outbound network (install slirp4netns and nftables, or set app_egress: off)"
            )
        return gaps

    def metered(self) -> dict[str, tuple[float, float]]:
        """Per site: (CPU seconds, memory MB-seconds) its app used since this worker started."""
        return {
            name: (self.cpu_seconds(app), app.memory_mb_seconds)
            for name, app in self._sites.items()
            if app.cpu_total or app.memory_mb_seconds or app.instance is not None
        }

    def cpu_seconds(self, app: AppSite) -> float:
        running = sum(i.cpu_seconds for i, a in self._active.items() if a is app)
        return app.cpu_total + running

    def describe(self, name: str) -> AppDescription:
        if name not in self._content_ids:
            raise NotFound(f"site {name!r} is not on this worker")
        app = self._sites.get(name)
        if app is None:
            return AppDescription(
                site=name,
                runtime="static",
                version=self._static.get(name),
                state="static",
                building=False,
                cpu_seconds=0.0,
            )
        inst = app.instance
        state: AppState = (
            "running" if inst is not None and inst.alive else "starting" if app.starting else "idle"
        )
        if state == "idle" and app.retry_at > time.monotonic():
            state = "crashed"
        volume = self._volumes.get(app.identity.number) if app.identity is not None else None
        used, _ = volume.usage() if volume is not None else (0, 0)
        size = volume.size() if volume is not None else 0
        return AppDescription(
            site=name,
            runtime=app.runtime,
            entry=app.entry,
            version=app.version,
            state=state,
            # Installing its requirements.txt or package.json for this version.
            building=app.packages_task is not None and not app.packages_task.done(),
            build_error=app.build_error,
            pid=inst.pid if inst is not None and inst.alive else None,
            memory_bytes=inst.rss if inst is not None else 0,
            cpu_seconds=round(self.cpu_seconds(app), 3),
            starts=app.starts,
            crashes=app.crashes - app.crashes_before,
            earlier_crashes=app.crashes_before,
            last_crash=app.last_crash,
            always_on=app.always_on,
            sandboxed=self._sandbox is not None,
            memory_limit_bytes=app.spec.limits.memory_mb * 1024 * 1024,
            memory_kills=app.memory_kills,
            pids_limit=app.spec.limits.nproc,
            pids_limit_hits=app.pids_hits,
            disk_used_bytes=used,
            # The cap in force while mounted (a raised one applies from the next start from idle).
            disk_limit_bytes=(size or self._disk_mb(app) * 1024 * 1024) if volume is not None else None,
            disk_quota_hits=app.disk_hits,
            disk_full=app.disk_full,
        )

    def log_for(self, name: str) -> SiteLog:
        log = self.access_log(name)
        if log is None:
            raise NotFound(f"site {name!r} is not on this worker")
        return log

    def access_log(self, name: str) -> SiteLog | None:
        """The site's log stream: its app's log, or for a static site one of the worker's own."""
        app = self._sites.get(name)
        if app is not None:
            return self._site_log(app)
        content_id = self._content_ids.get(name)
        if content_id is None:
            return None
        log = self._static_logs.get(name)
        if log is None or log.path.name != f"{content_id}.log":
            folder = self._config.state_dir / "site-logs"
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            log = self._static_logs[name] = SiteLog(folder / f"{content_id}.log", self._config.app_log_bytes)
        return log

    # -- inside

    def _site_log(self, app: AppSite) -> SiteLog:
        if app.log is None:
            dirs = self._dirs(app)
            app.log = SiteLog(dirs.log / "app.log", self._config.app_log_bytes)
            static = self._static_logs.get(app.name)
            if static is not None:
                # A follower of the site's log sees its build and app too, and `site logs` the
                # visits from before it was an app.
                static.hand_over(app.log, lines=_CARRIED_LINES)
        return app.log

    def _dirs(self, app: AppSite) -> SiteDirs:
        if app.identity is None:
            app.identity = self._identities.get(app.content_id)
            dirs = SiteDirs.under(self._apps_dir, app.identity.number)
            _prepare_dirs(dirs, app.identity)
            self._protect(app)
            app.volume = str(dirs.base / "volume") if self._quota else ""
        return SiteDirs.under(self._apps_dir, app.identity.number)

    def _protect(self, app: AppSite) -> None:
        gid = app.identity.gid if app.identity is not None else None
        protect_site_dir(self._root / "sites" / app.name, app.root or None, gid)

    def _packages_dir(self, app: AppSite) -> Path | None:
        base = self._dirs(app).base
        return node_packages_dir(base, app.root) if _node_packages(app) else packages_dir(base, app.root)

    def _start_packages(self, app: AppSite) -> None:
        target = self._packages_dir(app)
        if target is None or (target / ".complete").exists():
            app.packages_task = None
            return
        running = app.packages_task
        if running is not None and not running.done() and self._building.get(target) is running:
            return  # the same requirements are being installed (an FTP upload flips many versions)
        root, log, node = app.root, self._site_log(app), _node_packages(app)

        async def build() -> Path | None:
            error: str | None = None
            try:
                if node:
                    ok = await install_node_packages(
                        root=root, target=target, registry=self._config.npm_registry, log=log
                    )
                else:
                    ok = await install_requirements(
                        root=root,
                        target=target,
                        index_url=self._config.package_index_url,
                        python=self._python,
                        log=log,
                    )
            except BuildFailed as exc:
                error, ok = str(exc), False  # with its hint: what the owner reads of it
            except OSError as exc:
                error = f"installing {'package.json' if node else 'requirements.txt'} failed: {exc}"
                log.write("worker", error)
                ok = False
            finally:
                self._building.pop(target, None)
            # Only the build of what the site holds now says how its version went.
            if app.packages_task is asyncio.current_task():
                app.build_error = error
            return target if ok else None

        app.packages_task = self._building[target] = self._spawn(build())

    async def _prune_packages(self, app: AppSite, base: Path, in_use: Path) -> None:
        removed = await asyncio.to_thread(prune_packages, base, in_use, building=set(self._building))
        if removed:
            self._site_log(app).write("worker", f"removed the packages of earlier versions ({len(removed)})")

    def _tell_own_node_modules(self, app: AppSite, packages: Path | None, log: SiteLog) -> None:
        """Say once per version that its own node_modules/ is not what the app uses (or, without a
        sandbox to hide it, that it is)."""
        if app.told_node_modules == app.version or not _own_node_modules(app, packages):
            return
        app.told_node_modules = app.version
        if self._sandbox is not None:
            log.write(
                "worker",
                f"version {app.version} has a node_modules/ folder of its own: the app uses the packages "
                "installed from its package.json instead (leave node_modules/ out of what you publish)",
            )
        else:
            log.write(
                "worker",
                f"version {app.version} has a node_modules/ folder of its own, which Node uses before the "
                "packages installed from its package.json: leave node_modules/ out of what you publish",
            )

    async def _packages(self, app: AppSite) -> Path | None:
        target = self._packages_dir(app)
        if target is None:
            return None
        task = app.packages_task
        if task is not None and task.done() and not task.cancelled() and task.result() is None:
            # The last install failed (a registry that did not answer, say): a new start tries again.
            self._start_packages(app)
        if app.packages_task is not None:
            return await asyncio.shield(app.packages_task)
        return target if (target / ".complete").exists() else None

    async def _start(self, app: AppSite, *, replacing: bool = False) -> AppInstance:
        """Start the site's app; if a new version or new settings arrive while it starts (an FTP
        upload goes on file by file), the process made for the old ones goes and a new one starts.
        ``replacing`` a running process, a Python app must also have loaded its module first."""
        started = time.monotonic()
        for round_ in range(_START_ROUNDS):
            inst = await self._start_once(app)
            if replacing and app.runtime == "python":
                await self._loaded(app, inst)
            if inst.generation == app.generation or round_ == _START_ROUNDS - 1:
                # (One still behind is replaced once this start ends: see _start_done.)
                app.instance = inst
                self.observe_cold_start(time.monotonic() - started)
                return inst
            inst.retiring = True
            inst.terminate("retired")
        raise AssertionError("unreachable")

    async def _loaded(self, app: AppSite, inst: AppInstance) -> None:
        """The new process of a running Python app has imported the site's module: one that fails
        to (a syntax error, a missing package, a server started at import) never takes over."""
        timeout = self._config.app_start_timeout
        if await inst.wait_loaded(timeout):
            return
        if inst.alive:
            inst.kill("start")
            why = f"did not finish loading its module within {timeout:g} s"
        else:
            why = "exited as it loaded its module"
        app.failures += 1
        app.retry_at = time.monotonic() + _RETRY.delay(app.failures)
        self._site_log(app).write("worker", f"could not start the app: it {why}")
        raise Unavailable(f"the site's app {why}", hint="its log says why")

    def _start_done(self, app: AppSite, task: asyncio.Task[AppInstance]) -> None:
        _started(app, task)
        if task.cancelled() or task.exception() is not None or self._stopping:
            return
        inst = task.result()
        self._trim(app)
        if app.instance is inst and inst.alive and inst.generation != app.generation:
            self._site_log(app).write("worker", "restarting: a newer version came while it started")
            self._replace(app)

    async def _start_once(self, app: AppSite) -> AppInstance:
        log = self._site_log(app)
        try:
            self._make_room(app)
            dirs = self._dirs(app)
            assert app.identity is not None
            packages = await self._packages(app) if app.runtime in _PACKAGED else None
            if packages is not None:
                self._spawn(self._prune_packages(app, dirs.base, packages))
            if app.build_error is not None:
                # Started without what it needs, it would fail in ways that hide why. The why itself
                # (pip's lines: index hosts, the tenant's file) is for the owner, not every visitor.
                raise Unavailable(_BUILD_FAILED, hint=_REBUILD)
            if _node_packages(app):
                link_node_modules(self._root / "sites" / app.name, packages)
                self._tell_own_node_modules(app, packages, log)
            sandbox = self._sandbox
            port = 0
            if app.runtime in _PORT_RUNTIMES:
                port = SANDBOX_PORT if sandbox is not None else _free_port()
            if app.runtime == "command" and not app.entry:
                raise InvalidInput(
                    "the site's Procfile has no web: command", hint="add a line like web: ./serve"
                )
            if app.runtime == "node" and not app.entry:
                raise InvalidInput(
                    "the site's package.json names nothing to run",
                    hint='add "scripts": {"start": "node server.js"} or a server.js',
                )
            started_version = app.version  # (the code the plan points at: app.root is that version's)
            generation = app.generation  # what this start runs, whatever comes while it does
            plan = self._plan(
                app,
                dirs,
                packages,
                runtime=app.runtime,
                entry=app.entry,
                port=port,
                sandboxed=sandbox is not None,
            )
            await self._release(app, dirs, packages)
            inst = await self._spawn_instance(app, dirs, plan, packages, on_exit=self._exited)
            inst.version, inst.generation = started_version, generation
            if app.runtime != "php":
                inst.version_line = version_line(version_tag(app.content_id, started_version))
            self._active[inst] = app
            app.starts += 1
            app.last_used = time.monotonic()
            where = f"sandbox pid {inst.init_pid}" if inst.init_pid is not None else f"pid {inst.pid}"
            log.write("worker", f"started the {app.runtime} app ({where}) for version {started_version}")
            if plan.listen in ("tcp", "netns") and not await inst.wait_listening(
                self._config.app_start_timeout
            ):
                if not inst.alive:
                    # (Its exit is logged already, with its last words.)
                    raise Unavailable(f"the site's command exited before it listened on $PORT ({port})")
                inst.kill("start")
                raise Unavailable(f"the site's command did not listen on $PORT ({port})")
            return inst
        except (SitecloudError, OSError) as exc:
            app.failures += 1
            app.retry_at = time.monotonic() + _RETRY.delay(app.failures)
            log.write("worker", f"could not start the app: {exc}")
            if isinstance(exc, Unavailable):
                raise
            raise Unavailable(f"the site's app could not start: {exc}", hint="its log says why") from exc

    def _plan(
        self,
        app: AppSite,
        dirs: SiteDirs,
        packages: Path | None,
        *,
        runtime: Runtime,
        entry: str,
        port: int = 0,
        sandboxed: bool = False,
    ) -> LaunchPlan:
        return plan_launch(
            site=app.name,
            runtime=runtime,
            entry=entry,
            root=app.root,
            dirs=dirs,
            settings=app.spec.env,
            limits=app.spec.limits,
            python=self._python,
            packages=packages,
            node_packages=_node_packages(app),
            tools=str(self._tools),
            max_body=self._config.app_max_body,
            appserver=self._appserver,
            port=port,
            sandboxed=sandboxed,
        )

    async def _spawn_instance(
        self,
        app: AppSite,
        dirs: SiteDirs,
        plan: LaunchPlan,
        packages: Path | None,
        *,
        on_exit: Callable[[AppInstance, int], None],
        source: str = "app",
        capture: Captured | None = None,
    ) -> AppInstance:
        """One process of the site, started in its cgroup, sandbox, volume and writable folder."""
        assert app.identity is not None
        sandbox = self._sandbox
        self.ensure_run_dir()
        self._sockets += 1
        # A cgroup per instance, not per site: a retiring instance that exits removes (and one
        # killed at the end of its grace kills) its own group, never the one a newer instance of
        # the same site is starting in.
        serial = f"{app.identity.number}.{self._sockets}"
        boost = source == "app" and time.monotonic() - app.boosted_at >= _BOOST_EVERY
        group = self._cgroup.create(serial, app.spec.limits, boost=boost) if self._cgroup else None
        if self._cgroup is not None:
            # Beside the mounts below, so the attach after them is quick; after the group's mkdir,
            # which would wait on this loop for the cgroup lock the thread holds meanwhile.
            self._spawn(asyncio.to_thread(self._cgroup.ready_attach))
        if group is not None and boost:
            app.boosted_at = time.monotonic()
            asyncio.get_running_loop().call_later(_BOOST_S, CgroupTree.settle, group, app.spec.limits)
        volume: HomeVolume | None = None
        files: WritableFiles | None = None
        mounts: SandboxMounts | None = None
        pts = ""
        try:
            if sandbox is not None:
                volume = await self._acquire_volume(app, dirs)
                if volume is not None:
                    files = await self._writable_files(app, volume, serial)
                pts = self._capped_pts(serial)
                mounts = SandboxMounts(
                    site_dir=str(self._root / "sites" / app.name),
                    cwd=app.root,
                    files=files.merged if files is not None else "",
                    home=(str(volume.home if volume else dirs.home), str(dirs.home)),
                    tmp=(str(volume.tmp if volume else dirs.tmp), str(dirs.tmp)),
                    read_only=(str(self._tools), *((str(packages),) if packages is not None else ())),
                    masks=_own_node_modules(app, packages),
                    tmpfs_bytes=app.spec.limits.memory_mb * 1024 * 1024,
                    pts=pts,
                )
            inst = AppInstance(
                plan=plan,
                identity=app.identity,
                limits=app.spec.limits,
                log=self._site_log(app),
                socket_path=self._run_dir / f"{serial}.sock",
                serial=serial,
                cgroup=group,
                on_exit=on_exit,
                sandbox=sandbox,
                mounts=mounts,
                source=source,
                capture=capture,
                dialer=self._dialer,
            )
            await inst.start()
        except BaseException:
            if pts:
                unmount_pts(pts)
            if files is not None:
                unmount_files(files)
            if volume is not None:
                self._spawn(volume.release())
            if group is not None:
                CgroupTree.kill(group)
                CgroupTree.remove(group)
            raise
        if volume is not None:
            self._held[inst] = volume
        if files is not None:
            self._files[inst] = files
        if pts:
            self._pts[inst] = pts
        return inst

    def _capped_pts(self, serial: str) -> str:
        """The instance's own devpts with its cap; "" (bwrap's own) where this worker cannot mount
        one: a line in the worker's log once, and the worker says Degraded (isolation_gaps) for as
        long as it runs, since its apps can then hold the host's whole pool between them. Apps still
        start: a devpts cap is not worth every site of the worker."""
        if self._pts_off:
            return ""
        if not self._pts_swept:
            sweep_pts(self._run_dir)
            self._pts_swept = True
        try:
            return mount_pts(self._run_dir, serial, self.ptys_per_app)
        except OSError as exc:
            self._pts_off = str(exc)
            self._log.warning("apps' pseudo-terminals are not capped on this worker: %s", exc)
            return ""

    def _let_go(self, inst: AppInstance) -> None:
        """What an instance held besides its cgroup: its pseudo-terminals, writable folder and volume."""
        pts = self._pts.pop(inst, None)
        if pts is not None:
            unmount_pts(pts)
        files = self._files.pop(inst, None)
        if files is not None:
            unmount_files(files)
        volume = self._held.pop(inst, None)
        if volume is not None:
            self._spawn(volume.release())

    async def _release(self, app: AppSite, dirs: SiteDirs, packages: Path | None) -> None:
        """What runs once per version and settings on this worker before the app starts, in the
        app's sandbox with its packages and writable folder: a Node app's ``build`` script (as
        Heroku and App Service run it; what it writes, ``dist/`` say, lands in the app's folder),
        then the Procfile's ``release:`` command (``python manage.py migrate``). Their output goes to
        the site log as ``build`` and ``release`` lines; a failure keeps the app from starting (the
        deploy that asked then fails with it, as a failed install does)."""
        # A few small reads from the page cache: less than a thread hop, on every cold start.
        release = procfile_command(app.root, "release")
        django = app.runtime in ("python", "command") and packages is not None
        steps = [
            (source, command)
            for source, command in (
                ("build", build_command(app.root) if _node_packages(app) else None),
                (
                    "collectstatic",
                    collectstatic_command(app.root, dict(app.spec.env), release) if django else None,
                ),
                ("release", release),
            )
            if command is not None
        ]
        marker = dirs.base / "released"
        # As on Heroku, new settings are a new release too (a DJANGO_ADMIN_USER the command reads).
        settings = hashlib.sha256(repr(app.spec.env).encode()).hexdigest()[:16]
        done_for = f"{app.content_id} {app.version} {settings}\n"
        if not steps or _read_or_empty(marker) == done_for:
            return
        log = self._site_log(app)
        for source, command in steps:
            log.write("worker", f"running the {source} command of version {app.version}: {command}")
            started = time.monotonic()
            code, why = await self._run_once(
                app, dirs, packages, command, source=source, timeout=self._config.app_release_timeout
            )
            if code == 0:
                took = time.monotonic() - started
                log.write("worker", f"the {source} command ended well in {took:.1f} s")
                if source == "collectstatic":
                    note = unserved_static_note(app.root, _step_lines(log.tail(200), source))
                    if note is not None:
                        log.write("worker", note)
                continue
            said = " / ".join(_step_lines(log.tail(200), source)[-3:])
            if source == "collectstatic":
                # The platform's own step, not the owner's: a project without STATIC_ROOT (as
                # startproject makes it) still starts, with a line that says what to do.
                log.write(
                    "worker",
                    f"collectstatic {why}"
                    + (f" ({said})" if said else "")
                    + ": the app starts without its static files collected; set STATIC_ROOT in the "
                    "settings, or DISABLE_COLLECTSTATIC=1 to skip this step",
                )
                continue
            app.last_crash = f"its {source} command {why}" + (f"; its last output: {said}" if said else "")
            log.write(
                "worker",
                f"the {source} command {why}: the app does not start until a version's {source} succeeds",
            )
            raise Unavailable(
                f"the site's {source} command {why}", hint="its log says why; fix it and deploy again"
            )
        await asyncio.to_thread(marker.write_text, done_for)

    async def _run_once(
        self,
        app: AppSite,
        dirs: SiteDirs,
        packages: Path | None,
        command: str,
        *,
        source: str,
        timeout: float,
        capture: Captured | None = None,
    ) -> tuple[int | None, str]:
        """``command`` run once with ``/bin/sh -c`` in the app's sandbox, as its app runs but without
        a port: (its exit status, None when it was stopped at a limit; how it ended, "" for well)."""
        plan = self._plan(app, dirs, packages, runtime="command", entry=command)
        env = {k: v for k, v in plan.env.items() if k != "PORT"}
        plan = LaunchPlan(plan.argv, env, plan.cwd, "none")
        exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_exit(inst: AppInstance, code: int) -> None:
            self._let_go(inst)
            oom = inst.cgroup is not None and CgroupTree.oom_kills(inst.cgroup) > 0
            if inst.cgroup is not None:
                self._remove_group(inst.cgroup)
            if not exited.done():
                exited.set_result(MEMORY_EXIT if oom else code)

        inst = await self._spawn_instance(
            app, dirs, plan, packages, on_exit=on_exit, source=source, capture=capture
        )
        try:
            code = await asyncio.wait_for(asyncio.shield(exited), timeout)
        except TimeoutError:
            inst.kill(source)
            await exited
            await inst.wait_closed()
            return None, f"took longer than {timeout:g} s"
        await inst.wait_closed()  # its last output read
        if code == MEMORY_EXIT:
            return None, f"stopped: exceeded its {app.spec.limits.memory_mb} MB memory limit"
        return code, "" if code == 0 else f"exited with {_status(code)}"

    async def run_command(self, name: str, command: str, timeout: float) -> CommandResult:
        """A command its owner sends (``sitecloud site run``), run once in the site's app sandbox;
        its output comes back (the site log says that it ran and how it ended). One at a time per
        site."""
        app = self._sites.get(name)
        if app is None:
            raise NotSupported(
                f"site {name!r} runs no app here: commands run in a dynamic site's sandbox",
                hint="publish an app (app.py, index.php, a Procfile or a package.json) first",
            )
        if self._sandbox is None:
            raise Unavailable(
                "this worker runs apps without the sandbox, so it runs no commands",
                hint="an admin can start the worker as root with bubblewrap installed",
            )
        if name in self._commands:
            raise InUse(f"a command is already running for site {name!r}", hint="wait for it to end")
        self._commands.add(name)
        try:
            dirs = self._dirs(app)
            packages = await self._packages(app) if app.runtime in _PACKAGED else None
            if app.build_error is not None:
                raise Unavailable(_BUILD_FAILED, hint=_REBUILD)
            log = self._site_log(app)
            log.write("worker", f"running a command its owner sent: {command[:300]}")
            capture = Captured(COMMAND_OUTPUT_MAX)
            started = time.monotonic()
            code, why = await self._run_once(
                app, dirs, packages, command, source="run", timeout=timeout, capture=capture
            )
            seconds = time.monotonic() - started
            log.write("worker", f"the command {why or 'exited with status 0'} after {seconds:.1f} s")
        finally:
            self._commands.discard(name)
        return CommandResult(
            site=name,
            exit_code=code,
            output=capture.data.decode("utf-8", "replace"),
            truncated=capture.truncated,
            timed_out=why.startswith("took longer"),
            seconds=round(seconds, 3),
        )

    def _disk_mb(self, app: AppSite) -> int:
        return self._config.app_disk_mb or app.spec.limits.disk_mb

    async def _acquire_volume(self, app: AppSite, dirs: SiteDirs) -> HomeVolume | None:
        """The site's disk quota volume, mounted (Unavailable when it cannot be); None where this
        worker has no quota volumes (logged once at start)."""
        ident = app.identity
        if not self._quota or ident is None or ident.unix_uid is None or ident.gid is None:
            return None
        volume = self._volumes.get(ident.number)
        if volume is None:
            volume = HomeVolume(
                dirs.base,
                uid=ident.unix_uid,
                gid=ident.gid,
                grace=self._config.app_volume_grace,
                blanks=self._blanks,
            )
            self._volumes[ident.number] = volume
        try:
            await volume.acquire(self._disk_mb(app), dirs.home, dirs.tmp)
        except OSError as exc:
            # Closed, not open: without its volume the app would write without a limit.
            raise Unavailable(f"its disk quota volume could not be mounted ({exc})") from exc
        return volume

    async def _writable_files(self, app: AppSite, volume: HomeVolume, serial: str) -> WritableFiles | None:
        """The version the app runs, writable through an overlay on its volume; None (the folder
        stays read-only, as the site log says) where this worker cannot make one."""
        ident = app.identity
        if self._files_off or ident is None or ident.unix_uid is None or ident.gid is None:
            return None
        try:
            files, taken_back = await asyncio.to_thread(
                mount_files, volume.mountpoint, app.root, serial, ident.unix_uid, ident.gid
            )
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
                # The kernel or the content's filesystem has no idmapped mounts or overlays.
                self._files_off = str(exc)
                self._log.warning("apps' folders stay read-only on this worker: %s", exc)
            self._site_log(app).write("worker", f"the app's folder is read-only for this start: {exc}")
            return None
        if taken_back:
            # Named: "1 file" does not tell an owner that the live database was replaced.
            names = ", ".join(taken_back[:5]) + (
                f" and {len(taken_back) - 5} more" if len(taken_back) > 5 else ""
            )
            self._site_log(app).write(
                "worker",
                f"version {app.version} replaced {counted(len(taken_back), 'file')} the app had changed"
                f" with the published one: {names}",
            )
        return files

    def ensure_run_dir(self) -> None:
        """Made on the first start (a worker without apps leaves no trace in /tmp)."""
        self._run_dir.mkdir(mode=0o700, exist_ok=True)
        if self._run_dir.is_symlink() or self._run_dir.lstat().st_uid != os.geteuid():
            raise Unavailable(f"{self._run_dir} belongs to someone else; app sockets cannot go there")
        os.chmod(self._run_dir, 0o700)

    def _admit(self, app: AppSite, now: float) -> None:
        """Whether the site's subscription may start one more app now (Unavailable if not): at the
        cap, only into a slot of its own or of a subscription holding more, or over the cap while it
        holds less than a fair share; and within its budget of starts. The other tenants' starts and
        warm apps are thus never the price of one tenant's churn."""
        holding = self._holding(starting=True)
        if sum(holding.values()) >= self.max_active:
            room = pick_victims(self._idle_slots(app), holding, 1, for_owner=app.owner)
            if not room and holding[app.owner] >= fair_share(holding, app.owner, self.max_active):
                self._refused(app, now, f"its subscription's {holding[app.owner]} apps here are all busy")
                raise Unavailable(
                    "this worker runs as many of the subscription's apps as it gives one subscription, "
                    "all of them busy",
                    hint="try again in a moment",
                    retry_after=1,
                )
        wait = self._budget.take(app.owner, now)
        if wait > 0:
            window = self._config.subscription_app_start_window
            self._refused(
                app,
                now,
                f"its subscription used up this worker's {self._config.subscription_app_starts} "
                f"app starts per {window:g} s",
            )
            raise Unavailable(
                "the site's subscription starts too many apps on this worker",
                hint=f"try again in {retry_seconds(wait)} s",
                retry_after=retry_seconds(wait),
            )

    def _refused(self, app: AppSite, now: float, why: str) -> None:
        if now - app.refused_at >= _REFUSED_LOG_EVERY:
            app.refused_at = now
            self._site_log(app).write("worker", f"not started: {why} (visitors get 503 until then)")

    def _running(self, app: AppSite | None = None) -> list[tuple[AppSite, AppInstance]]:
        """The live processes that count against the cap (``app``'s own left out)."""
        return [(a, i) for i, a in self._active.items() if not i.retiring and i.alive and a is not app]

    def _holding(self, *, starting: bool = False) -> collections.Counter[str]:
        """Slots per owner: running processes, and with ``starting`` the starts from idle under way."""
        held = collections.Counter(a.owner for a, _ in self._running())
        if starting:
            held.update(
                a.owner for a in self._sites.values() if a.starting is not None and a.instance is None
            )
        return held

    def _idle_slots(self, app: AppSite | None, *, settled: float | None = None) -> list[Slot[AppInstance]]:
        """The running processes (but ``app``'s) with no request in flight, and with ``settled`` none
        used since then."""
        return [
            Slot(i, a.owner, a.last_used, a.always_on)
            for a, i in self._running(app)
            if i.inflight == 0 and (settled is None or (a.last_used < settled and a.instance is i))
        ]

    def _make_room(self, app: AppSite) -> None:
        """At the cap, an idle process goes: of the subscription that holds the most, its least
        recently used (an always-on one only if it must). None fits: this start was admitted as one
        within its subscription's fair share (see _admit), and runs over the cap."""
        running = self._running(app)
        if len(running) < self.max_active:
            return
        holding = collections.Counter(a.owner for a, _ in running)
        victims = pick_victims(self._idle_slots(app), holding, 1, for_owner=app.owner)
        if not victims:
            self._log.warning(
                "all %s app processes of this worker's fair shares are busy; starting %s over the cap",
                len(running),
                app.name,
            )
            return
        self._evict(victims[0])

    def _evict(self, victim: AppInstance) -> None:
        owner = self._active[victim]
        owner.instance = None if owner.instance is victim else owner.instance
        self._site_log(owner).write("worker", "stopping: the worker needed room for another app")
        victim.terminate("evicted")

    def _trim(self, app: AppSite | None) -> None:
        """After a start, back down to the cap: starts that ran at once each found room in
        :meth:`_make_room` before any of them was counted (a burst of cold starts over many sites
        left the worker over its cap for good), so idle processes go now, from the subscriptions that
        hold the most. One used in the last second is kept: it may be a start of the same burst whose
        first request has not reached it yet (the sweep trims again later)."""
        running = self._running(app)
        excess = len(running) + (app is not None) - self.max_active
        if excess <= 0:
            return
        holding = collections.Counter(a.owner for a, _ in running)
        if app is not None:
            holding[app.owner] += 1
        idle = self._idle_slots(app, settled=time.monotonic() - 1.0)
        for victim in pick_victims(idle, holding, excess):
            self._evict(victim)

    def _replace(self, app: AppSite) -> None:
        """New code or settings for a running app: its process answers on until the new one is up
        (packages installed, build and release run, listening), then retires, so a deploy that
        installs for a minute costs its visitors nothing. As on Heroku, a version whose release or
        build fails never takes over: the running process answers on (the deploy that asked fails
        and puts the version before back; an FTP upload that fixes it starts it again), and the
        site log and `site show` say why."""
        old = app.instance
        if old is None or not old.alive:
            self._retire(app)
            return
        if app.starting is not None:
            return  # the start under way takes the newest version and settings (see _start)
        task = asyncio.get_running_loop().create_task(self._start(app, replacing=True))
        app.starting = task
        task.add_done_callback(lambda done: self._start_done(app, done))
        task.add_done_callback(lambda done: self._replaced(app, old, done))

    def _replaced(self, app: AppSite, old: AppInstance, start: asyncio.Task[AppInstance]) -> None:
        if app.instance is old:
            if old.alive and not start.cancelled() and start.exception() is not None:
                self._site_log(app).write(
                    "worker", f"version {app.version} did not start: version {old.version} answers on"
                )
                return
            app.instance = None
        old.retiring = True
        if old.inflight <= 0:
            old.terminate("retired")

    def versions_running(self, name: str) -> set[int]:
        """The content versions the site's live processes were started on: on disk while they run."""
        app = self._sites.get(name)
        return {i.version for i, a in self._active.items() if a is app and i.alive} if app else set()

    def _retire(self, app: AppSite) -> None:
        inst, app.instance = app.instance, None
        if inst is not None:
            inst.retiring = True
            if inst.inflight <= 0:
                inst.terminate("retired")

    def _drop(self, name: str, why: str) -> None:
        app = self._sites.pop(name, None)
        if app is None:
            return
        if app.starting is not None:
            app.starting.cancel()
        for inst, owner in list(self._active.items()):
            if owner is app:
                inst.terminate(why)
        if app.log is not None:
            static = self.access_log(name) if why == "static" else None
            if static is not None:
                app.log.hand_over(static)  # the same site, served as static files now
            else:
                app.log.close()

    def _exited(self, inst: AppInstance, code: int) -> None:
        app = self._active.pop(inst, None)
        if app is None:
            return
        app.cpu_total += inst.cpu_seconds
        if app.instance is inst:
            app.instance = None
        self._let_go(inst)
        log = self._site_log(app)
        oom = inst.cgroup is not None and CgroupTree.oom_kills(inst.cgroup) > 0
        if inst.cgroup is not None:
            self._note_pids_hits(app, inst)
            self._remove_group(inst.cgroup)
        # A line just before the exit most often says why (a traceback's last); an older one is only
        # the app at work.
        said = log.last_app_line if time.monotonic() - log.last_app_at < _LAST_WORDS else ""
        log.last_app_line = ""
        if inst.stopping == "memory" or code == MEMORY_EXIT or oom:
            app.memory_kills += 1
            how = f"stopped: exceeded its {inst.limits.memory_mb} MB memory limit"
        elif inst.stopping is not None:
            log.write("worker", f"stopped ({inst.stopping})")
            return
        else:
            how = f"exited with {_status(code)}"
        log.write("worker", how)
        app.last_crash = f"{how}; its last output: {said}" if said else how
        app.crashes += 1
        app.failures += 1
        wait = _RETRY.delay(app.failures) if not inst.served or app.failures > 1 else 0.0
        app.retry_at = time.monotonic() + wait
        log.write("worker", f"it starts again on the next request{f' after {wait:.1f} s' if wait else ''}")

    def _remove_group(self, group: AppGroup, tries: int = 20) -> None:
        """An instance's group goes with it; what it left running in there (a child that outlived
        it) is killed first, and the removal tried again shortly while the kernel lets them go."""
        if CgroupTree.remove(group):
            return
        CgroupTree.kill(group)
        if not CgroupTree.remove(group) and tries > 0:
            asyncio.get_running_loop().call_later(0.25, self._remove_group, group, tries - 1)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                self._sweep_once(time.monotonic())
            except Exception:
                self._log.exception("app sweep failed")

    def _sweep_once(self, now: float) -> None:
        # What each sample stands for: the time since the last sweep (a late sweep counts longer).
        held_for = min(now - self._last_sweep, 10 * SWEEP_INTERVAL) if self._last_sweep else SWEEP_INTERVAL
        self._last_sweep = now
        for inst, app in list(self._active.items()):
            try:
                self._note_pids_hits(app, inst)
                self._note_disk(app, inst)
            except OSError as exc:  # one app's vanished cgroup or volume never skips the others' rounds
                self._log.warning("app %s: could not read its limits (%s)", app.name, exc)
            rss, _ = inst.sample()
            app.memory_mb_seconds += rss / 2**20 * held_for
            if inst.cgroup is None and rss > inst.limits.memory_mb * 1024 * 1024 and inst.stopping is None:
                inst.kill("memory")
                continue
            if inst.retiring:
                if inst.inflight <= 0:
                    inst.terminate("retired")
                continue
            idle_for = app.spec.idle_timeout or self._config.app_idle_timeout
            if not app.always_on and inst.inflight <= 0 and now - app.last_used > idle_for:
                app.instance = None if app.instance is inst else app.instance
                inst.terminate("idle")
        if self._stopping:
            return
        self._trim(None)
        self._budget.forget(now)
        for app in self._sites.values():
            if app.always_on and app.instance is None and app.starting is None and app.retry_at <= now:
                self._spawn(self._keep_on(app))

    def _note_pids_hits(self, app: AppSite, inst: AppInstance) -> None:
        """One log line each time the app reaches its process limit (a fork or thread failed)."""
        limit = inst.limits.nproc
        if inst.cgroup is not None:
            hits = CgroupTree.pids_max_hits(inst.cgroup)
            reached = hits > inst.pids_hits_seen
            inst.pids_hits_seen = max(inst.pids_hits_seen, hits)
        elif inst.stopping is None:
            # RLIMIT_NPROC holds the line (pids.max too, where there is one); the watch sees the
            # app's tasks at it.
            tasks = inst.count_processes()
            reached = tasks >= limit and not inst.at_pids_limit
            inst.at_pids_limit = tasks >= limit or (inst.at_pids_limit and tasks > limit // 2)
        else:
            return
        if reached:
            app.pids_hits += 1
            self._site_log(app).write(
                "worker", f"reached its limit of {limit} processes: new ones are refused"
            )

    def _note_disk(self, app: AppSite, inst: AppInstance) -> None:
        volume = self._held.get(inst)
        if volume is None:
            return
        full = volume.full()
        if full and not app.disk_full:
            app.disk_hits += 1
            self._site_log(app).write(
                "worker",
                f"its disk is full: the {volume.size() // 2**20} MB quota of HOME and TMPDIR is used up",
            )
        app.disk_full = full

    async def _keep_on(self, app: AppSite) -> None:
        with contextlib.suppress(SitecloudError):
            await self.acquire(app)


def _started(app: AppSite, task: asyncio.Task[AppInstance]) -> None:
    app.starting = None
    if not task.cancelled():
        task.exception()  # retrieved: the waiters saw it


def _step_lines(lines: list[str], source: str) -> list[str]:
    """A build or release command's own output among a site log's lines."""
    mark = f" [{source}] "
    return [line.split(mark, 1)[1].strip() for line in lines if mark in line]


def _python_without_entry(root: str) -> str | None:
    """For a static version with a ``requirements.txt`` (a Flask app made as Flask's tutorial makes
    it: a package with ``create_app()``, run with ``flask --app flaskr run``): the entry to set, a
    package's factory where one is found, else a placeholder; None for anything else."""
    top = Path(root)
    if not (top / "requirements.txt").is_file():
        return None
    for init in sorted(top.glob("*/__init__.py")):
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = init.read_text()[:200_000]
            for factory in ("create_app", "make_app"):
                if f"def {factory}(" in text:
                    return f"{init.parent.name}:{factory}()"
    return "MODULE:app"


def _read_or_empty(path: Path) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def _own_node_modules(app: AppSite, packages: Path | None) -> tuple[tuple[str, str], ...]:
    """A version published with a node_modules/ of its own (the developer's, maybe built for another
    system) beside the package.json the worker installed: Node looks in the app's folder first, so
    that folder would shadow the installed packages. Hidden under them in the sandbox."""
    if packages is None or not _node_packages(app):
        return ()
    own, installed = os.path.join(app.root, "node_modules"), packages / "node_modules"
    if os.path.islink(own) or not os.path.isdir(own) or not installed.is_dir():
        return ()
    return ((str(installed), own),)


def _node_packages(app: AppSite) -> bool:
    """Whether the site's packages are Node's (package.json) rather than Python's (requirements.txt):
    a Node app's, and a Procfile app's that has a package.json but no requirements.txt."""
    if app.runtime == "node":
        return True
    return (
        app.runtime == "command"
        and not os.path.exists(os.path.join(app.root, "requirements.txt"))
        and os.path.exists(os.path.join(app.root, "package.json"))
    )


def _make_tools(directory: Path, python: str) -> None:
    """``python`` and ``python3`` for apps' commands: Debian has no ``python``, while a Procfile's
    ``web: python app.py`` expects one, as on Heroku; both run the apps' Python."""
    directory.mkdir(mode=0o755, exist_ok=True)
    os.chmod(directory, 0o755)  # noqa: S103 - two launchers, the same for every site
    script = f'#!/bin/sh\nexec {shlex.quote(python)} "$@"\n'
    for name in ("python", "python3"):
        path = directory / name
        try:
            if path.read_text() == script:
                continue
        except OSError:
            pass
        temp = directory / f".{name}.new"
        temp.write_text(script)
        os.chmod(temp, 0o755)  # noqa: S103
        os.replace(temp, path)


def _default_entry(runtime: Runtime, root: str) -> str:
    if runtime == "python":
        for module in ("app", "wsgi", "asgi"):
            if os.path.exists(os.path.join(root, f"{module}.py")):
                return module
        return "app"
    if runtime == "php":
        return "index.php"
    if runtime == "command":
        return procfile_web(root) or ""
    if runtime == "node":
        return node_entry(root) or ""
    return ""


def _prepare_dirs(dirs: SiteDirs, identity: SiteIdentity) -> None:
    dirs.base.mkdir(exist_ok=True)
    for d in (dirs.home, dirs.tmp, dirs.log):
        d.mkdir(mode=0o700, exist_ok=True)
    if identity.unix_uid is not None and identity.gid is not None:
        os.chown(dirs.base, 0, identity.gid)
        os.chmod(dirs.base, 0o750)  # noqa: S103 - the site's own group only
        for d in (dirs.home, dirs.tmp):
            os.chown(d, identity.unix_uid, identity.gid)


def run_dir_for(root: Path) -> Path:
    """Where app sockets are bound (0700: apps get theirs as fd 0, never by path): under the apps
    root unless that path is too long for a unix socket."""
    run = root / "run"
    if len(str(run)) <= 80:
        return run
    return (
        Path(tempfile.gettempdir()) / f"sitecloud-run-{hashlib.sha256(str(root).encode()).hexdigest()[:12]}"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"status {code}"


async def _ask_root(inst: AppInstance, host: str) -> int:
    """The status of ``GET /`` asked of an app instance."""
    kind, where = inst.address
    if inst.netns is not None:
        reader, writer = await asyncio.open_connection(sock=await inst.netns.connected())
    elif kind == "unix":
        reader, writer = await asyncio.open_unix_connection(where)
    else:
        ip, _, port = where.rpartition(":")
        reader, writer = await asyncio.open_connection(ip, int(port))
    try:
        writer.write(
            f"GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: sitecloud-deploy-check\r\nConnection: close\r\n\r\n".encode()
        )
        line = await reader.readline()
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit() or not parts[0].startswith(b"HTTP/"):
            raise ConnectionError(f"not an HTTP answer: {line[:60]!r}")
        return int(parts[1])
    finally:
        writer.close()
