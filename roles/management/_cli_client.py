"""The CLI's side of the REST API: where the cloud is (``endpoints.json``), HTTPS calls and uploads.

Stdlib only (http.client + ssl) so that ``sitecloud`` starts fast.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlsplit

from shared.errors import InvalidInput, NotFound, SitecloudError, Unauthorized, Unavailable, error_from_json
from shared.home_lock import home_holder

__all__ = ["NDJSON", "ApiClient", "Endpoints", "clean_token", "read_result_lines", "zipped"]

_CHUNK = 256 * 1024
NDJSON = "application/x-ndjson"
# Uploads smaller than this finish too fast for a progress display to help.
_PROGRESS_MIN = 1024 * 1024


def clean_token(raw: str, where: str) -> str:
    """The token to send, from ``raw`` as given by ``where`` (``--token``, ``SITECLOUD_TOKEN``, a file).

    Tokens pasted from files and CI secrets often end in a line break: surrounding whitespace goes.
    Whitespace or control characters left inside cannot be a token, and would not fit in the
    Authorization header (RFC 9110 section 5.5), so they are refused here with a message saying so.
    """
    token = raw.strip()
    if not token:
        raise Unauthorized(f"the API token given by {where} is empty", hint="give the whole token")
    bad = next((c for c in token if c.isspace() or not c.isprintable() or not c.isascii()), None)
    if bad is not None:
        raise Unauthorized(
            f"the API token given by {where} contains {_describe(bad)}",
            hint="copy the token again: it is one word of letters, digits, '-' and '_'",
        )
    return token


def _describe(char: str) -> str:
    if char in "\r\n":
        return "a line break"
    if char.isspace():
        return "a space" if char == " " else f"whitespace ({char!a})"
    if not char.isascii() and char.isprintable():
        return f"a character that is not ASCII ({char!r})"
    return f"a control character ({char!a})"


@dataclass(frozen=True)
class Endpoints:
    """``HOME/endpoints.json``, written by ``sitecloud up``."""

    api: str
    ca_cert: Path
    admin_token_file: Path | None
    # The home it was read from; None when made by hand.
    home: Path | None = None

    @classmethod
    def load(cls, home: Path) -> Endpoints:
        path = home / "endpoints.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise Unavailable(
                f"no cloud at {home}", hint="run `sitecloud up` first, or pass --home"
            ) from None
        except (OSError, ValueError) as exc:
            raise InvalidInput(
                f"cannot read {path}: {exc}", hint="run `sitecloud up` to rewrite it"
            ) from None
        if not isinstance(raw, dict) or not raw.get("api") or not raw.get("ca_cert"):
            raise InvalidInput(f"{path} lacks 'api' or 'ca_cert'", hint="run `sitecloud up` to rewrite it")
        token_file = raw.get("admin_token_file")
        return cls(
            api=str(raw["api"]).rstrip("/"),
            ca_cert=Path(raw["ca_cert"]),
            admin_token_file=Path(token_file) if token_file else None,
            home=home,
        )

    def admin_token(self) -> str:
        if self.admin_token_file is None:
            raise Unauthorized("no API token", hint="pass --token or set SITECLOUD_TOKEN")
        try:
            raw = self.admin_token_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "it is not text"
            raise Unauthorized(
                f"cannot read the admin token at {self.admin_token_file}: {why}",
                hint="pass --token or set SITECLOUD_TOKEN",
            ) from None
        return clean_token(raw, str(self.admin_token_file))


class _Progress:
    """Upload progress on stderr: a live line on a terminal, a line per quarter otherwise."""

    def __init__(self, total: int, stream: IO[str]) -> None:
        self._total = total
        self._stream = stream
        self._shown = total >= _PROGRESS_MIN
        self._tty = stream.isatty()
        self._quarter = 0

    def update(self, done: int) -> None:
        if not self._shown:
            return
        pct = done * 100 // max(self._total, 1)
        line = f"uploading {done / 1e6:.1f} / {self._total / 1e6:.1f} MB ({pct}%)"
        if self._tty:
            self._stream.write(f"\r{line}")
            self._stream.flush()
        elif pct // 25 > self._quarter:
            self._quarter = pct // 25
            self._stream.write(line + "\n")

    def finish(self) -> None:
        if self._shown and self._tty:
            self._stream.write("\n")
            self._stream.flush()


# Items asked for per page when the CLI lists everything (the API's most).
_PAGE = 1000


# The longest a CLI call waits in all for a tenant's API rate to allow it again.
_RATE_WAIT_MOST = 60.0


def _retry_after(resp: http.client.HTTPResponse) -> float | None:
    """For a 429 with a Retry-After in seconds, those seconds; else None."""
    if resp.status != 429:
        return None
    value = (resp.getheader("Retry-After") or "").strip()
    return float(value) if value.isdigit() else None


class ApiClient:
    def __init__(self, endpoints: Endpoints, token: str | None, *, timeout: float = 30.0) -> None:
        self.base = endpoints.api
        parts = urlsplit(self.base)
        try:
            port = parts.port
        except ValueError:
            port = -1
        # The host goes into the Host header and the path into the request line: neither may hold
        # whitespace or control characters.
        if (
            parts.scheme != "https"
            or not parts.hostname
            or port == -1
            or any(c.isspace() or not c.isprintable() for c in self.base)
        ):
            raise InvalidInput(
                f"the API address {self.base!r} is not an https:// URL",
                hint="run `sitecloud up` to rewrite endpoints.json",
            )
        self._host, self._port, self._prefix = parts.hostname, port or 443, parts.path.rstrip("/")
        self._ca = endpoints.ca_cert
        self._home = endpoints.home
        self._token = token
        self._timeout = timeout

    def _connection(self, timeout: float) -> http.client.HTTPSConnection:
        try:
            ctx = ssl.create_default_context(cafile=str(self._ca))
        except (OSError, ssl.SSLError) as exc:
            raise InvalidInput(f"cannot load the cloud CA certificate {self._ca}: {exc}") from None
        return http.client.HTTPSConnection(self._host, self._port, context=ctx, timeout=timeout)

    def _headers(self, extra: dict[str, str]) -> dict[str, str]:
        headers = {"Accept": "application/json", **extra}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        return headers

    def _unreachable(self, exc: OSError) -> SitecloudError:
        if isinstance(exc, ssl.SSLCertVerificationError):
            return Unavailable(
                f"the management API at {self.base} did not show a certificate from the cloud CA "
                f"({exc.verify_message})",
                hint=f"check 'ca_cert' in endpoints.json ({self._ca})",
            )
        return Unavailable(f"cannot reach the management API at {self.base}", hint=self._unreachable_hint())

    def _unreachable_hint(self) -> str:
        """What to do when management does not answer: it depends on whether `sitecloud up` runs."""
        home = self._home
        pid = home_holder(home) if home is not None else None
        if home is None or pid is None:
            where = f" --home {home}" if home is not None else ""
            return (
                f"is `sitecloud up` running? Start it with `sitecloud up{where}`; if it runs, its "
                "management role is down: restarting `sitecloud up` starts it again"
            )
        log = home / "logs" / "management.log"
        return (
            f"`sitecloud up` runs (pid {pid}) but its management role does not answer: it may be "
            f"starting or restarting (try again in a moment), or down (see {log}); "
            "restarting `sitecloud up` starts it again"
        )

    @staticmethod
    def _answer(resp: http.client.HTTPResponse) -> Any:
        raw = resp.read()
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        if resp.status >= 400:
            raise error_from_json(resp.status, body)
        if raw and body is None:
            raise Unavailable(f"the management API answered something that is not JSON (HTTP {resp.status})")
        return body

    def path(self, *segments: str) -> str:
        return self._prefix + "/api/v1/" + "/".join(quote(s, safe="") for s in segments)

    @contextmanager
    def _exchange(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None = None,
        timeout: float | None = None,
    ) -> Iterator[tuple[http.client.HTTPSConnection, http.client.HTTPResponse]]:
        """One request; network failures become clear errors, and the connection is always closed."""
        with self._connected(timeout or self._timeout) as conn:
            conn.request(method, path, body=body, headers=self._headers(headers))
            yield conn, conn.getresponse()

    @contextmanager
    def _connected(self, timeout: float) -> Iterator[http.client.HTTPSConnection]:
        """A connection whose network failures become clear errors; always closed."""
        conn = self._connection(timeout)
        try:
            yield conn
        except OSError as exc:
            raise self._unreachable(exc) from None
        except http.client.HTTPException as exc:
            raise Unavailable(f"the management API at {self.base} broke off the answer: {exc!r}") from None
        finally:
            conn.close()

    def request(self, method: str, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        waited = 0.0
        while True:
            with self._exchange(method, path, headers, data, timeout) as (_, resp):
                # Past the tenant's API rate (429): nothing was done, so the call goes again once
                # the answer's Retry-After has passed, as a script would want, within a bound.
                wait = _retry_after(resp)
                if wait is None or waited + wait > _RATE_WAIT_MOST:
                    return self._answer(resp)
                resp.read()
            time.sleep(wait)
            waited += wait

    def request_lines(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        on_line: Callable[[dict[str, Any]], None],
        timeout: float,
        what: str,
        hint: str | None = None,
    ) -> Any:
        """A call whose answer comes as lines (NDJSON): each passed to ``on_line`` as it comes, and the
        last one's result returned (or its error raised); ``timeout``: seconds without a line."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": NDJSON, **({"Content-Type": "application/json"} if data is not None else {})}
        with self._connected(timeout) as conn:
            conn.request(method, path, body=data, headers=self._headers(headers))
            resp = conn.getresponse()
            if resp.status >= 400:
                return self._answer(resp)
            return read_result_lines(resp, on_line, what=what, hint=hint)

    def list_all(self, path: str, key: str, *, page_size: int = _PAGE) -> Any:
        """Every item of a list answer, following its pages (``next_cursor``) to the end."""
        items: list[Any] = []
        cursor: str | None = None
        while True:
            query = f"?limit={page_size}" + (f"&cursor={quote(cursor, safe='')}" if cursor else "")
            answer = self.request("GET", path + query)
            items += answer[key]
            cursor = answer.pop("next_cursor", None)
            if not cursor:
                return {**answer, key: items}

    def request_raw(self, method: str, path: str) -> bytes:
        """A call whose answer is not JSON (a publish profile); errors still come back as JSON."""
        with self._exchange(method, path, {"Accept": "*/*"}) as (_, resp):
            if resp.status >= 400:
                self._answer(resp)
            return resp.read()

    def download(self, path: str, target: IO[bytes]) -> int:
        """GET a binary answer (a zip) into ``target`` as it arrives; returns its size."""
        done = 0
        with self._connected(max(self._timeout, 600.0)) as conn:
            conn.request("GET", path, headers=self._headers({"Accept": "*/*"}))
            resp = conn.getresponse()
            if resp.status >= 400:
                self._answer(resp)
            while chunk := resp.read(_CHUNK):
                target.write(chunk)
                done += len(chunk)
        return done

    def lines(
        self, path: str, *, timeout: float | None, on_open: Callable[[], None] | None = None
    ) -> Iterator[str]:
        """GET a text answer and yield its lines as they arrive (``timeout`` None: wait for ever);
        ``on_open`` is called once the server has answered 200."""
        with self._exchange("GET", path, {"Accept": "text/plain"}) as (conn, resp):
            if resp.status >= 400:
                self._answer(resp)
            if on_open is not None:
                on_open()
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            while line := resp.readline():
                yield line.decode(errors="replace").rstrip("\n")

    def upload(
        self,
        path: str,
        file: Path,
        *,
        progress: IO[str] | None = None,
        on_line: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any:
        """POST a file as the body, streamed from disk. With ``on_line`` the answer is asked for as
        lines (NDJSON), each passed to it as it comes, and the last one's result returned."""
        total = file.stat().st_size
        meter = _Progress(total, progress or sys.stderr)
        headers = {"Content-Type": "application/zip", "Content-Length": str(total)}
        if on_line is not None:
            headers["Accept"] = NDJSON
        # The server answers once the publisher has committed the deploy (or built it, with lines):
        # allow for a big one.
        with self._connected(max(self._timeout, 600.0 if on_line is None else 3600.0)) as conn:
            try:
                conn.putrequest("POST", path)
                for key, value in self._headers(headers).items():
                    conn.putheader(key, value)
                conn.endheaders()
                done = 0
                with file.open("rb") as f:
                    while chunk := f.read(_CHUNK):
                        conn.send(chunk)
                        done += len(chunk)
                        meter.update(done)
            except (BrokenPipeError, ConnectionResetError):
                # The server may refuse early (bad token, unknown site): its answer says why.
                pass
            finally:
                meter.finish()
            resp = conn.getresponse()
            if on_line is None or resp.status >= 400:
                return self._answer(resp)
            return read_result_lines(
                resp, on_line, what="the deploy", hint="see `sitecloud site versions` and `site logs`"
            )


def read_result_lines(
    resp: http.client.HTTPResponse,
    on_line: Callable[[dict[str, Any]], None],
    *,
    what: str,
    hint: str | None = None,
) -> Any:
    """An NDJSON answer: each line to ``on_line`` until ``{"result": …}`` (returned) or ``{"error": …}``
    (raised)."""
    while line := resp.readline():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            raise Unavailable(f"{what}'s answer has a line that is not JSON: {line[:200]!r}") from None
        if "result" in event:
            return event["result"]
        if "error" in event:
            raise error_from_json(500, event)
        on_line(event)
    raise Unavailable(f"{what}'s answer ended without a result", hint=hint)


_VCS_DIRS = frozenset({".git", ".hg", ".svn"})


def _left_out(parent: str, name: str) -> bool:
    """A folder of a project that is not the site: a checkout's history (never served, and it would
    count against the quota and sit in every version's zip), Python's bytecode caches, and a virtual
    environment (Flask's tutorial makes .venv/ in the project: tens of MB, built for this machine; the
    worker installs requirements.txt itself)."""
    if name in _VCS_DIRS or name == "__pycache__":
        return True
    return os.path.isfile(os.path.join(parent, name, "pyvenv.cfg"))


@contextmanager
def zipped(source: Path) -> Iterator[Path]:
    """``source`` as a zip file: a directory is zipped into a temp file (without the folders
    :func:`_left_out` names); a zip file is used as is."""
    if source.is_dir():
        fd, tmp = tempfile.mkstemp(prefix="sitecloud-deploy-", suffix=".zip")
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
                for root, dirs, files in os.walk(source):
                    dirs[:] = sorted(d for d in dirs if not _left_out(root, d))
                    rel_root = Path(root).relative_to(source)
                    if rel_root != Path(".") and not dirs and not files:
                        zf.writestr(f"{rel_root.as_posix()}/", b"")  # keep empty directories
                    for name in sorted(files):
                        full = Path(root) / name
                        # Symlinks could point outside the site: only regular files go up.
                        if full.is_file() and not full.is_symlink():
                            zf.write(full, (rel_root / name).as_posix())
            yield Path(tmp)
        finally:
            Path(tmp).unlink(missing_ok=True)
    elif source.is_file():
        if not zipfile.is_zipfile(source):
            raise InvalidInput(f"{source} is not a zip file", hint="give a directory or a .zip file")
        yield source
    else:
        raise NotFound(f"{source} does not exist", hint="give a directory or a .zip file")
