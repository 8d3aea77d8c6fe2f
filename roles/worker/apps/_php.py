"""Which PHP script answers a path, and the CGI variables it gets (RFC 3875, as php-cgi reads them)."""

from __future__ import annotations

import os

__all__ = ["cgi_params", "fixed_params", "php_script"]


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
    Sent before :func:`cgi_params`; php-cgi keeps the last of a name given twice."""
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


def cgi_params(
    *,
    method: str,
    target: str,
    headers: list[tuple[bytes, bytes]],
    body_length: int,
    script: tuple[str, str, str],
) -> dict[str, str]:
    """The CGI variables of one request (after :func:`fixed_params`)."""
    filename, name, path_info = script
    _, _, query = target.partition("?")
    values = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers}
    proto = values.get("x-forwarded-proto", "http").strip().lower()
    host = values.get("x-forwarded-host") or values.get("host") or "localhost"
    server_name, _, port = host.partition(":")
    client = values.get("x-forwarded-for", "127.0.0.1").rsplit(",", 1)[-1].strip()
    params = {
        "SERVER_NAME": server_name,
        "SERVER_PORT": port or ("443" if proto == "https" else "80"),
        "REQUEST_METHOD": method,
        "REQUEST_URI": target,
        "QUERY_STRING": query,
        "SCRIPT_FILENAME": filename,
        "SCRIPT_NAME": name,
        "PATH_INFO": path_info,
        "REMOTE_ADDR": client,
        "CONTENT_LENGTH": str(body_length) if body_length or method not in ("GET", "HEAD") else "",
        "CONTENT_TYPE": values.get("content-type", ""),
    }
    if proto == "https":
        params["HTTPS"] = "on"
    for key, value in values.items():
        if key in ("content-type", "content-length", "proxy"):
            continue  # "Proxy:" would become HTTP_PROXY (httpoxy)
        params["HTTP_" + key.upper().replace("-", "_")] = value
    return params
