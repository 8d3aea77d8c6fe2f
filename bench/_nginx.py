"""The anchor: nginx as a TLS proxy in front of nginx serving static files, one worker process each."""

from __future__ import annotations

import getpass
import shutil
import subprocess
import time
from pathlib import Path

from shared.net import free_port

__all__ = ["NginxPair", "nginx_available"]

_PROXY = """
user {user};
worker_processes {workers};
pid {dir}/proxy.pid;
error_log {dir}/proxy-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    upstream static {{ server 127.0.0.1:{static_port}; keepalive 128; }}
    upstream static_tls {{ server 127.0.0.1:{static_tls_port}; keepalive 128; }}
    # The same proxy with the hop to the static server in mutual TLS, as sitecloud's hop always is.
    server {{
        listen 127.0.0.1:{https_mtls_port} ssl reuseport;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_session_cache shared:SSL:10m;
        location / {{
            proxy_pass https://static_tls;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_ssl_certificate {hop_cert};
            proxy_ssl_certificate_key {hop_key};
            proxy_ssl_trusted_certificate {ca};
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_session_reuse on;
        }}
    }}
    server {{
        listen 127.0.0.1:{http_port} reuseport;
        listen 127.0.0.1:{https_port} ssl reuseport;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_session_cache shared:SSL:10m;
        location / {{
            proxy_pass http://static;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"""

_STATIC = """
user {user};
worker_processes {workers};
pid {dir}/static.pid;
error_log {dir}/static-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    include /etc/nginx/mime.types;
    sendfile on;
    server {{
        listen 127.0.0.1:{static_port} reuseport;
        root {root};
        index index.html;
    }}
    server {{
        listen 127.0.0.1:{static_tls_port} ssl reuseport;
        ssl_certificate {hop_cert};
        ssl_certificate_key {hop_key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        root {root};
        index index.html;
    }}
}}
"""


def nginx_available() -> bool:
    return shutil.which("nginx") is not None


class NginxPair:
    """``hop`` is (cert, key, CA) for the mutual-TLS variant of the proxy → static hop."""

    def __init__(
        self,
        workdir: Path,
        root: Path,
        cert: Path,
        key: Path,
        hop: tuple[Path, Path, Path],
        *,
        workers: int = 1,
    ) -> None:
        self.dir = workdir
        self.root = root
        self.cert, self.key = cert, key
        self.hop = hop
        self.workers = workers
        self.http_port, self.https_port, self.static_port = free_port(), free_port(), free_port()
        self.https_mtls_port, self.static_tls_port = free_port(), free_port()

    def _conf(self, template: str, name: str) -> Path:
        path = self.dir / f"{name}.conf"
        path.write_text(
            template.format(
                dir=self.dir,
                workers=self.workers,
                static_port=self.static_port,
                http_port=self.http_port,
                https_port=self.https_port,
                cert=self.cert,
                key=self.key,
                https_mtls_port=self.https_mtls_port,
                static_tls_port=self.static_tls_port,
                hop_cert=self.hop[0],
                hop_key=self.hop[1],
                ca=self.hop[2],
                root=self.root,
                user=getpass.getuser(),
            )
        )
        return path

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for name, template in (("static", _STATIC), ("proxy", _PROXY)):
            conf = self._conf(template, name)
            subprocess.run(
                ["nginx", "-c", str(conf), "-p", str(self.dir), "-e", str(self.dir / f"{name}-error.log")],
                check=True,
            )
        time.sleep(0.3)

    def stop(self) -> None:
        for name in ("proxy", "static"):
            conf = self.dir / f"{name}.conf"
            subprocess.run(
                ["nginx", "-c", str(conf), "-p", str(self.dir), "-s", "stop"],
                check=False,
                capture_output=True,
            )
