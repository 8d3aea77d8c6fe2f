"""The warm-app anchors: nginx (one worker process) in front of php-fpm or gunicorn, configured as the
Debian packages' examples and most hosts run them, with the app's processes in a cgroup of the same CPU
share as the sitecloud site they are measured against (nginx, like our front end and worker, is not
limited)."""

from __future__ import annotations

import getpass
import glob
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from bench._cpu import family
from bench.harness.processes import wait_until
from roles.worker.apps._cgroup import AppGroup, CgroupTree
from roles.worker.apps._spec import AppLimits
from shared.logs import get_logger
from shared.net import free_port

__all__ = ["GUNICORN", "AppAnchor", "NginxFpm", "NginxGunicorn", "php_fpm_binary"]

GUNICORN = Path(sys.executable).with_name("gunicorn")

_FPM = """
[global]
pid = {dir}/fpm.pid
error_log = {dir}/fpm-error.log
daemonize = no

[bench]
user = {user}
listen = {dir}/fpm.sock
pm = static
pm.max_children = {children}
pm.max_requests = 1000
"""

_NGINX = """
user {user};
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    upstream app {{ server unix:{dir}/app.sock; keepalive 32; }}
    server {{
        listen 127.0.0.1:{port};
        root {docroot};
        {locations}
    }}
}}
"""

_PHP_LOCATIONS = """index index.php;
        location / {{ try_files $uri /index.php$is_args$args; }}
        location ~ \\.php$ {{
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
            fastcgi_pass unix:{dir}/fpm.sock;
        }}"""

_PROXY_LOCATIONS = """location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}"""


def php_fpm_binary() -> str | None:
    """Debian installs it versioned (``/usr/sbin/php-fpm8.2``); the package ``php-fpm`` pulls it in."""
    found = shutil.which("php-fpm")
    if found:
        return found
    versioned = sorted(glob.glob("/usr/sbin/php-fpm[0-9]*"))
    return versioned[-1] if versioned else None


class AppAnchor:
    """nginx → an app server started by :meth:`_app_command`; ``limits``: the app's cgroup (its CPU
    share above all), where this host has cgroups."""

    def __init__(self, workdir: Path, docroot: Path, limits: AppLimits | None = None) -> None:
        self.dir = workdir
        self.docroot = docroot
        self.limits = limits
        self.port = free_port()
        self.app: subprocess.Popen[bytes] | None = None
        self.nginx: subprocess.Popen[bytes] | None = None
        self._tree: CgroupTree | None = None
        self._group: AppGroup | None = None
        self.limited = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def _app_command(self, user: str) -> list[str]:
        raise NotImplementedError

    def _locations(self) -> str:
        return _PROXY_LOCATIONS.format(dir=self.dir)

    def start(self) -> AppAnchor:
        self.dir.mkdir(parents=True, exist_ok=True)
        user = getpass.getuser()
        conf = _NGINX.format(
            dir=self.dir, user=user, port=self.port, docroot=self.docroot, locations=self._locations()
        )
        (self.dir / "nginx.conf").write_text(conf)
        self.app = subprocess.Popen(
            self._app_command(user), cwd=self.docroot, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        nginx = ["nginx", "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir), "-e", str(self.dir / "nginx-error.log")]  # fmt: skip
        self.nginx = subprocess.Popen(nginx, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = self.url

        def answers() -> bool:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return bool(resp.read() == b"hello")

        wait_until(answers, timeout=20, what=type(self).__name__)
        self._limit()
        return self

    def _limit(self) -> None:
        """The app's processes (all forked by now: static pools) into a cgroup of the site's share."""
        if self.limits is None or self.app is None:
            return
        self._tree = CgroupTree.detect(get_logger("bench"))
        if self._tree is None:
            return
        self._group = self._tree.create(f"anchor-{self.port}", self.limits)
        for pid in family(self.app.pid):
            self._tree.attach(self._group, pid)
        self.limited = True

    def pids(self) -> dict[str, list[int]]:
        """Root pids of the anchor's process groups, for a CPU meter."""
        assert self.app is not None and self.nginx is not None
        return {"app": [self.app.pid], "nginx": [self.nginx.pid]}

    def stop(self) -> None:
        for proc, sig in ((self.nginx, signal.SIGQUIT), (self.app, signal.SIGTERM)):
            if proc is not None and proc.poll() is None:
                proc.send_signal(sig)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self._tree is not None and self._group is not None:
            self._tree.kill(self._group)
            self._tree.remove(self._group)
            self._tree.close()


class NginxFpm(AppAnchor):
    """nginx → php-fpm, a static pool of ``children`` on a unix socket."""

    def __init__(self, workdir: Path, docroot: Path, children: int, limits: AppLimits | None = None) -> None:
        super().__init__(workdir, docroot, limits)
        self.children = children

    def _locations(self) -> str:
        return _PHP_LOCATIONS.format(dir=self.dir)

    def _app_command(self, user: str) -> list[str]:
        fpm = php_fpm_binary()
        assert fpm is not None, "php-fpm is not installed (apt-get install php-fpm)"
        (self.dir / "fpm.conf").write_text(_FPM.format(dir=self.dir, user=user, children=self.children))
        # -R: php-fpm refuses to run its pool as root without it (a bench, not a host).
        return [fpm, "-F", "-y", str(self.dir / "fpm.conf")] + (["-R"] if user == "root" else [])


class NginxGunicorn(AppAnchor):
    """nginx → gunicorn (``args``: its workers and threads) on a unix socket, ``app:app`` in the docroot."""

    def __init__(
        self, workdir: Path, docroot: Path, args: list[str], limits: AppLimits | None = None
    ) -> None:
        super().__init__(workdir, docroot, limits)
        self.args = args

    def _app_command(self, user: str) -> list[str]:
        bind = f"unix:{self.dir / 'app.sock'}"
        return [str(GUNICORN), "--bind", bind, "--log-level", "warning", *self.args, "app:app"]
