"""What a request looks like to an app: the WSGI environ (PEP 3333) and the ASGI scope (ASGI 3.0)."""

from __future__ import annotations

import io
import sys

from ._http import HttpRequest

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__all__ = ["asgi_scope", "wsgi_environ"]


def _origin(req: HttpRequest) -> tuple[str, str, int, str]:
    """(scheme, host, port, client address) as the front end saw them (it alone can reach us)."""
    proto = (req.header(b"x-forwarded-proto") or b"http").decode("latin-1").strip().lower()
    scheme = "https" if proto == "https" else "http"
    host = (req.header(b"x-forwarded-host") or req.header(b"host") or b"localhost").decode("latin-1")
    name, _, port_s = host.strip().rpartition(":") if host.count(":") == 1 else (host, "", "")
    port = int(port_s) if port_s.isdigit() else (443 if scheme == "https" else 80)
    forwarded = (req.header(b"x-forwarded-for") or b"").decode("latin-1")
    client = forwarded.rsplit(",", 1)[-1].strip() or "127.0.0.1"
    return scheme, name or host, port, client


def wsgi_environ(req: HttpRequest) -> dict[str, Any]:
    scheme, host, port, client = _origin(req)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": req.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": req.path,
        "QUERY_STRING": req.query.decode("latin-1"),
        "RAW_URI": (req.raw_path + (b"?" + req.query if req.query else b"")).decode("latin-1"),
        "SERVER_NAME": host,
        "SERVER_PORT": str(port),
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": client,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": scheme,
        "wsgi.input": io.BytesIO(req.body),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in req.headers:
        key = name.decode("latin-1").upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            environ[key] = value.decode("latin-1")
            continue
        key = "HTTP_" + key
        text = value.decode("latin-1")
        environ[key] = f"{environ[key]},{text}" if key in environ else text
    return environ


def asgi_scope(req: HttpRequest) -> dict[str, Any]:
    scheme, host, port, client = _origin(req)
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": req.method,
        "scheme": scheme,
        "path": req.path.encode("latin-1").decode("utf-8", "replace"),
        "raw_path": req.raw_path,
        "query_string": req.query,
        "root_path": "",
        "headers": req.headers,
        "client": (client, 0),
        "server": (host, port),
        "state": {},
    }
