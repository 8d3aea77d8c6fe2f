"""Which PHP script answers a path, and the CGI variables it gets (RFC 3875, as php-cgi reads them)."""

from __future__ import annotations

import os

from roles.worker.apps._fastcgi import pair
from roles.worker.apps._head import is_platform_field

__all__ = ["fixed_params", "php_script", "request_pairs"]


def _inside(root: str, path: str) -> bool:
    return os.path.realpath(path).startswith(root + "/") and os.path.isfile(path)


def php_script(root: str, rel: str, front: str) -> tuple[str, str, str] | None:
    """(SCRIPT_FILENAME, SCRIPT_NAME, PATH_INFO) for ``rel``; the front controller takes the rest."""
    if rel.endswith(".php") and _inside(root, f"{root}/{rel}"):
        return f"{root}/{rel}", f"/{rel}", ""
    index = f"{rel}/index.php" if rel else "index.php"
    if _inside(root, f"{root}/{index}"):
        return f"{root}/{index}", f"/{index}", ""
    front = front.strip("/") or "index.php"
    if _inside(root, f"{root}/{front}"):
        return f"{root}/{front}", f"/{front}", f"/{rel}"
    return None


def fixed_params(root: str, settings: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """The CGI variables every request of a site gets (its app settings first: ours win over them).
    Sent before :func:`request_pairs`; php-cgi keeps the last of a name given twice."""
    params = dict(settings)
    params.update(
        {
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_SOFTWARE": "sitecloud",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "DOCUMENT_ROOT": root,
            # php-cgi refuses to run a script unless it believes a web server sent it (force_redirect).
            "REDIRECT_STATUS": "200",
        }
    )
    return params


def request_pairs(
    *,
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body_length: int,
    script: tuple[str, str, str],
) -> bytes:
    """The CGI variables of one request (after :func:`fixed_params`), encoded as FastCGI
    name-value pairs straight from the request's bytes. A header field given more than once is one
    variable, its values joined (RFC 3875 section 4.1.18; cookies with "; ", as RFC 6265 section
    5.4 sends them)."""
    filename, name, path_info = script
    _, _, query = target.partition(b"?")
    values: dict[bytes, bytes] = {}
    for key, value in headers:
        key = key.lower()
        old = values.get(key)
        if old is None:
            values[key] = value
        else:
            values[key] = old + (b"; " if key == b"cookie" else b", ") + value
    proto = values.get(b"x-forwarded-proto", b"http").strip().lower()
    host = values.get(b"x-forwarded-host") or values.get(b"host") or b"localhost"
    server_name, _, port = host.partition(b":")
    client = values.get(b"x-forwarded-for", b"127.0.0.1").rsplit(b",", 1)[-1].strip()
    has_length = body_length or method not in (b"GET", b"HEAD")
    out = [
        pair(b"SERVER_NAME", server_name),
        pair(b"SERVER_PORT", port or (b"443" if proto == b"https" else b"80")),
        pair(b"REQUEST_METHOD", method),
        pair(b"REQUEST_URI", target),
        pair(b"QUERY_STRING", query),
        pair(b"SCRIPT_FILENAME", filename.encode("latin-1", "replace")),
        pair(b"SCRIPT_NAME", name.encode("latin-1", "replace")),
        pair(b"PATH_INFO", path_info.encode("latin-1", "replace")),
        pair(b"REMOTE_ADDR", client),
        pair(b"CONTENT_LENGTH", b"%d" % body_length if has_length else b""),
        pair(b"CONTENT_TYPE", values.get(b"content-type", b"")),
    ]
    if proto == b"https":
        out.append(pair(b"HTTPS", b"on"))
    for key, value in values.items():
        if key in _NOT_HTTP or is_platform_field(key):
            continue
        out.append(pair(b"HTTP_" + key.upper().replace(b"-", b"_"), value))
    return b"".join(out)


# Header fields not passed as HTTP_* variables: the two CGI has variables of its own for, and
# "Proxy:", which would become HTTP_PROXY (httpoxy).
_NOT_HTTP = frozenset({b"content-type", b"content-length", b"proxy"})
