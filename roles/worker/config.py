from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.config import ServingConfig

__all__ = ["WorkerConfig"]


@dataclass(frozen=True, kw_only=True)
class WorkerConfig(ServingConfig):
    role: str = "worker"
    # Where front ends connect (mTLS, frontend certificates only).
    data_port: int = 0
    # An idle keep-alive connection is closed after this many seconds.
    keepalive_timeout: float = 30.0
    # A request (head and body) must arrive within this many seconds of its first byte (slowloris).
    request_timeout: float = 15.0
    # A peer that reads nothing of a response for this long is dropped.
    send_timeout: float = 60.0
    # The version a site just left stays on disk this long, for requests still reading it.
    version_grace: float = 15.0
    # In-memory cache of small hot files (per process), dropped per site on a version flip.
    hot_cache_bytes: int = 32 * 1024 * 1024
    # processes (from ServingConfig): above 1 the main process keeps the control plane and the content
    # sync, and hands versions over to the serving processes.
    # Seconds between usage reports (apps' CPU and memory-seconds per site) to the controller.
    usage_interval: float = 30.0
    # Opt-in, for measuring and for a front end on the same machine only: also answer plain HTTP on
    # this loopback "<ip>:<port>" (no TLS, no peer check). Off (empty) by default: the data port is
    # mutual TLS, as every internal call. A non-loopback address is refused.
    loopback_plain_listen: str = ""
    # -- dynamic sites (roles/worker/apps): per-site app processes started on demand.
    # small | medium | large: default per-site limits and how many app processes run at once.
    size: str = "small"
    # Cap on running app processes (least recently used goes first); 0: the size's default. At the
    # cap a start takes the slot of the subscription that holds the most, so one tenant's churn of
    # many sites stops its own apps, not another tenant's.
    max_active_apps: int = 0
    # App starts from idle one subscription may make per window (a token bucket that holds this
    # many and refills over the window); past it its cold visits get 503 with a Retry-After. Each
    # start costs about 0.1 s of the host's CPU outside any app's cgroup. 0: no limit.
    subscription_app_starts: int = 60
    subscription_app_start_window: float = 60.0
    # An app with no request for this long is stopped (a site's idle_timeout overrides it).
    app_idle_timeout: float = 1200.0
    # A woken app must answer its first request within this; otherwise 503 with the platform's page.
    app_start_timeout: float = 10.0
    # How long a Procfile's release command (a migration) may run before the start gives up on it.
    app_release_timeout: float = 300.0
    # Later requests wait this long for an app's answer before a 504.
    app_response_timeout: float = 120.0
    # The longest request body an app gets; a longer one gets 413. One longer than 1 MiB streams to
    # the app as it arrives (with a Content-Length) or waits in a file in the home (chunked).
    app_max_body: int = 32 * 1024 * 1024
    # All chunked request bodies waiting in files in the home at once, every site's: past it, a body
    # that would add to them gets 503, so visitors cannot fill the disk that holds the content. Shared
    # out per subscription: one over its share gives way to another's (apps/_tenancy.py).
    app_spool_total: int = 512 * 1024 * 1024
    # Per-site app log (stdout/stderr, access lines) before it rotates once.
    app_log_bytes: int = 1024 * 1024
    # Index for requirements.txt installs (e.g. https://pypi.org/simple); empty: the host's pip
    # configuration (/etc/pip.conf, PIP_* in the worker's environment), as `pip install` there would;
    # "none": installs are skipped.
    package_index_url: str = ""
    # Registry for package.json installs (e.g. https://registry.npmjs.org/); empty: the host's npm
    # configuration (its npmrc files, npm_config_* in the worker's environment); "none": skipped.
    npm_registry: str = ""
    # Python that runs apps; empty: the worker's own if other uids can run it, else python3.
    app_python: str = ""
    # Where everything a site's app must reach lives (content cache, app homes and temp directories,
    # sockets). None: the home when other uids can pass through every directory above it, else (as
    # root) /var/lib/sitecloud/apps-<hash of the home>, root-owned and search-only. See _layout.py.
    apps_dir: Path | None = None
    # -- the app sandbox (roles/worker/apps/_sandbox.py), as root with bubblewrap and setpriv.
    # Off: apps run with their own uid and rlimits only (as an unprivileged worker always does).
    app_sandbox: bool = True
    # Outbound internet for sandboxed apps: "slirp4netns" (the default; public addresses only, where
    # slirp4netns and nftables are installed) or "off". The host's loopback, role ports, private
    # ranges and other sites stay out of reach either way.
    app_egress: str = "slirp4netns"
    # Disk quota (MB) of a sandboxed app's HOME and TMPDIR; 0: the site's limits.disk_mb, which
    # defaults by worker size.
    app_disk_mb: int = 0
    # A site's quota volume stays mounted this long after its app stops (a quick wake pays no mount).
    app_volume_grace: float = 300.0
    # How long after a snapshot the app homes of sites no longer here are removed: their processes
    # have had their stop grace by then.
    app_home_removal_delay: float = 15.0

    def __post_init__(self) -> None:
        delay = self.app_home_removal_delay
        if not isinstance(delay, int | float) or isinstance(delay, bool) or delay < 0:
            raise ValueError(f"app_home_removal_delay must be a number of seconds >= 0, not {delay!r}")
        starts = self.subscription_app_starts
        if not isinstance(starts, int) or isinstance(starts, bool) or starts < 0:
            raise ValueError(f"subscription_app_starts must be a whole number >= 0, not {starts!r}")
        window = self.subscription_app_start_window
        if not isinstance(window, int | float) or isinstance(window, bool) or window <= 0:
            raise ValueError(f"subscription_app_start_window must be a number of seconds > 0, not {window!r}")
