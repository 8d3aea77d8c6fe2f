"""The PHP anchor: nginx (one worker process) → php-fpm (a static pool of N children) over FastCGI on
a unix socket, configured as the Debian packages' examples and most PHP hosts run them."""

from __future__ import annotations

import getpass
import glob
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

from bench.harness.processes import wait_until
from shared.net import free_port

__all__ = ["NginxFpm", "php_fpm_binary"]

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
    server {{
        listen 127.0.0.1:{port};
        root {docroot};
        index index.php;
        location / {{ try_files $uri /index.php$is_args$args; }}
        location ~ \\.php$ {{
            include /etc/nginx/fastcgi_params;
            fastcgi_param SCRIPT_FILENAME $document_root$fastcgi_script_name;
            fastcgi_pass unix:{dir}/fpm.sock;
        }}
    }}
}}
"""


def php_fpm_binary() -> str | None:
    """Debian installs it versioned (``/usr/sbin/php-fpm8.2``); the package ``php-fpm`` pulls it in."""
    found = shutil.which("php-fpm")
    if found:
        return found
    versioned = sorted(glob.glob("/usr/sbin/php-fpm[0-9]*"))
    return versioned[-1] if versioned else None


class NginxFpm:
    def __init__(self, workdir: Path, docroot: Path, children: int) -> None:
        self.dir = workdir
        self.docroot = docroot
        self.children = children
        self.port = free_port()
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> NginxFpm:
        fpm = php_fpm_binary()
        assert fpm is not None, "php-fpm is not installed (apt-get install php-fpm)"
        self.dir.mkdir(parents=True, exist_ok=True)
        user = getpass.getuser()
        fields = {"dir": self.dir, "user": user, "children": self.children}
        (self.dir / "fpm.conf").write_text(_FPM.format(**fields))
        (self.dir / "nginx.conf").write_text(_NGINX.format(**fields, port=self.port, docroot=self.docroot))
        # -R: php-fpm refuses to run its pool as root without it (a bench, not a host).
        fpm_cmd = [fpm, "-F", "-y", str(self.dir / "fpm.conf")] + (["-R"] if user == "root" else [])
        nginx_cmd = ["nginx", "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir), "-e", str(self.dir / "nginx-error.log")]  # fmt: skip
        for cmd in (fpm_cmd, nginx_cmd):
            self._procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

        def answers() -> bool:
            with urllib.request.urlopen(self.url, timeout=2) as resp:
                return bool(resp.read() == b"hello")

        wait_until(answers, timeout=20, what="nginx → php-fpm")
        return self

    def stop(self) -> None:
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGQUIT if proc is self._procs[-1] else signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
