"""Bad input never gets a 500: the management API, its portals and the CLI answer what is wrong.

A real management process over HTTPS and a real SQLite DB (``tests/test_management_api.py``);
requests are written byte for byte on a TLS socket, so headers and bodies that no well-behaved
client would send reach the server as sent. After each, the role's log must hold no traceback.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from roles.fileserver.config import FileserverConfig
from roles.management._input import MAX_JSON_DEPTH, check_text, parse_json_object
from roles.management._models import Rollback, SiteScale, validated
from roles.management.portal._flash import open_flash, seal_flash
from roles.publisher.config import PublisherConfig
from shared.credentials import hash_password
from shared.errors import BadRequest, InvalidInput
from shared.names import validate_site_name
from tests.support import CloudPKI, RoleProcess
from tests.test_management_api import ManagementCloud, start_management
from tests.test_publisher import SITES
from tests.test_publisher import Cloud as PublisherCloud


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagementCloud]:
    yield from start_management(tmp_path_factory.mktemp("bad-input"))


def raw(
    cloud: ManagementCloud, method: str, path: str, headers: list[bytes], body: bytes = b""
) -> tuple[int, bytes]:
    """One request as these exact bytes; (status, body) of the answer."""
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: localhost", b"Connection: close", *headers]
    if body or method in ("POST", "PATCH"):
        head.append(b"Content-Length: %d" % len(body))
    ctx = cloud.pki.client_ssl(None)
    with (
        socket.create_connection(("127.0.0.1", cloud.config.api_port), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        tls.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), payload


def admin_header(cloud: ManagementCloud) -> bytes:
    return f"Authorization: Bearer {cloud.admin}".encode()


@pytest.fixture(autouse=True)
def no_traceback(cloud: ManagementCloud) -> Iterator[None]:
    """Whatever a test sends, the role logs no traceback for it."""
    mark = len(cloud.proc.log())
    yield
    new = cloud.proc.log()[mark:]
    assert "Traceback" not in new and "unhandled error" not in new, new[-3000:]


def error_of(status: int, body: bytes) -> dict[str, str]:
    assert 400 <= status < 500, (status, body[:300])
    return dict(json.loads(body)["error"])


def json_post(cloud: ManagementCloud, path: str, body: bytes, *, auth: bool = True) -> tuple[int, bytes]:
    headers = [b"Content-Type: application/json"] + ([admin_header(cloud)] if auth else [])
    return raw(cloud, "POST", path, headers, body)


@pytest.mark.parametrize(
    "value",
    [
        b"Bearer \xff\xfe",
        "Bearer \u00e9".encode(),
        "Bearer \u00e9".encode("latin-1"),
        b"Bearer sct_\xed\xa0\x80",
        b"Bearer " + b"a" * 5000,
        b"\xff",
        b"Basic \xff",
    ],
    ids=["bytes-ff-fe", "utf8-e-acute", "latin1-e-acute", "surrogate-bytes", "long", "no-scheme", "basic"],
)
def test_a_bad_authorization_header_gets_401(cloud: ManagementCloud, value: bytes) -> None:
    status, body = raw(cloud, "GET", "/api/v1/me", [b"Authorization: " + value])
    assert status == 401, body
    assert error_of(status, body)["code"] == "unauthorized"


def test_a_control_character_in_a_header_is_refused_by_the_parser(cloud: ManagementCloud) -> None:
    status, _ = raw(cloud, "GET", "/api/v1/me", [b"Authorization: Bearer \x01x"])
    assert status == 400


DEEP = b"[" * 5000 + b"]" * 5000


@pytest.mark.parametrize(
    ("path", "body", "says"),
    [
        ("/users", DEEP, "nested deeper"),
        ("/users", b'{"a":' * 40 + b"1" + b"}" * 40, "nested deeper"),
        ("/users", b'{"username": ' + b"[" * 40 + b"]" * 40 + b"}", "nested deeper"),
        ("/auth/token", DEEP, "nested deeper"),
        ("/users", b"[]", "must be a JSON object, not an array"),
        ("/users", b'"me"', "must be a JSON object, not a string"),
        ("/users", b"null", "must be a JSON object, not null"),
        ("/users", b"{", "not valid JSON"),
        ("/users", b"", "not valid JSON"),
        ("/users", b'{"username": "\xff\xfe"}', "not UTF-8"),
        ("/users", b'{"username": "\\ud800"}', "not valid Unicode"),
        ("/users", b'{"\\udfff": 1}', "not valid Unicode"),
        ("/users", b'{"username": "a\\u0000b"}', "NUL"),
        ("/auth/token", b'{"username": "\\ud800", "password": "x"}', "not valid Unicode"),
        ("/auth/token", b'{"username": "root", "password": "\\udc80"}', "not valid Unicode"),
        ("/signup", b'{"username": "\\ud800", "password": "long enough pass"}', "not valid Unicode"),
        ("/plans", b'{"name": "p", "max_sites": NaN}', "not a JSON number"),
        ("/plans", b'{"name": "p", "max_sites": 1e999}', "too large"),
        ("/plans", b'{"name": "p", "max_sites": ' + b"9" * 5000 + b"}", "not valid JSON"),
        ("/tenants", b'{"name": "t", "x": ["\\ud83d"]}', "not valid Unicode"),
    ],
)
def test_a_bad_json_body_gets_400_saying_what_is_wrong(
    cloud: ManagementCloud, path: str, body: bytes, says: str
) -> None:
    status, answer = json_post(cloud, f"/api/v1{path}", body, auth=path not in ("/auth/token", "/signup"))
    assert status == 400, answer
    assert says in error_of(status, answer)["message"]


def test_a_body_over_the_limit_gets_413(cloud: ManagementCloud) -> None:
    status, answer = json_post(cloud, "/api/v1/users", b'{"username": "' + b"a" * (2 << 20) + b'"}')
    assert status == 413, answer[:300]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/users", {"username": 5}),
        ("/users", {"username": ["a"]}),
        ("/users", {"username": "x" * 100_000}),
        ("/plans", {"name": {"a": 1}}),
        ("/plans", {"name": "p1", "max_sites": "many"}),
        ("/plans", {"name": "p2", "max_sites": True}),
        ("/plans", {"name": "p3", "max_sites": -1}),
        ("/plans", {"name": "p4", "storage_mb": 10**30}),
        ("/tenants", {"name": None}),
        ("/tenants", {"name": "t\u00e9\u0301"}),
        ("/subscriptions", {"tenant": 1, "plan": 2}),
        ("/sites", {"name": "\u00e9", "subscription": "x"}),
        ("/sites", {"name": "ok-name", "subscription": 10**30}),
        ("/tokens", {"name": 3}),
        ("/hosts", {"name": "\u00e9.example", "fabric": 5}),
    ],
)
def test_wrong_types_and_values_get_4xx(cloud: ManagementCloud, path: str, body: object) -> None:
    status, answer = json_post(cloud, f"/api/v1{path}", json.dumps(body).encode())
    error_of(status, answer)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/sites/%FF%FE",
        "/api/v1/sites/%ED%A0%80",
        "/api/v1/sites/a%00b",
        "/api/v1/plans/%FF",
        "/api/v1/sites/%FF/settings",
        "/api/v1/hostnames/%FF%FE/availability",
        "/api/v1/sites/x/logs?lines=%FF",
        "/api/v1/sites/x/logs?lines=" + "9" * 5000,
    ],
)
def test_a_bad_name_in_the_path_gets_4xx(cloud: ManagementCloud, path: str) -> None:
    status, answer = raw(cloud, "GET", path, [admin_header(cloud)])
    error_of(status, answer)


def _portal(
    cloud: ManagementCloud, method: str, path: str, headers: list[bytes], body: bytes = b""
) -> tuple[int, bytes]:
    status, answer = raw(cloud, method, path, headers, body)
    assert status < 500, (status, answer[:500])
    return status, answer


def test_portal_cookies_and_forms_that_no_browser_would_send_get_4xx(cloud: ManagementCloud) -> None:
    bad_cookie = b"Cookie: __Host-sitecloud_session=\xff\xfe; __Host-sitecloud_csrf=\xed\xa0\x80"
    # A session cookie we could not have set is no session: off to the sign-in page.
    status, _ = _portal(cloud, "GET", "/portal/", [bad_cookie])
    assert status == 303
    status, page = _portal(cloud, "GET", "/signin", [bad_cookie])
    assert status == 200 and b"<form" in page
    form = [b"Content-Type: application/x-www-form-urlencoded", bad_cookie]
    status, _ = _portal(cloud, "POST", "/signin", form, b"csrf=x&username=%FF%FE&password=%ED%A0%80")
    assert status == 403, "the CSRF cookie is not ours: the form is refused"
    good = [b"Content-Type: application/x-www-form-urlencoded", b"Cookie: __Host-sitecloud_csrf=abc"]
    for body in (
        b"csrf=abc&username=%00root&password=x",
        b"csrf=abc&username=root&password=a%00b",
    ):
        status, page = _portal(cloud, "POST", "/signin", good, body)
        assert status == 400 and b"NUL" in page, page[:500]
    # Bytes that are not UTF-8 become U+FFFD on the way in: only a wrong password, so the form goes
    # back (303) to the sign-in page, which says so.
    status, _ = _portal(cloud, "POST", "/signin", good, b"csrf=abc&username=%FF%FE&password=%ED%A0%80")
    assert status == 303
    multipart = (
        b'--b\r\nContent-Disposition: form-data; name="csrf"\r\n\r\nabc\r\n'
        b'--b\r\nContent-Disposition: form-data; name="username"\r\n\r\n\xff\xfe\r\n--b--\r\n'
    )
    status, _ = _portal(
        cloud,
        "POST",
        "/signin",
        [b"Content-Type: multipart/form-data; boundary=b", b"Cookie: __Host-sitecloud_csrf=abc"],
        multipart,
    )
    assert status == 400


def test_the_cli_refuses_an_argument_that_is_not_text_without_a_traceback(cloud: ManagementCloud) -> None:
    home = cloud.write_endpoints(cloud.home / "cli-home")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SITECLOUD_")}
    for args in (
        [b"site", b"show", b"\xff\xfe"],
        [b"site", b"show", b"a\xed\xa0\x80"],
        [b"plan", b"show", b"\xff"],
    ):
        result = subprocess.run(
            [sys.executable.encode(), b"-m", b"roles.management.cli", b"--home", str(home).encode(), *args],
            capture_output=True,
            cwd=root,
            env=env,
            timeout=30,
        )
        err = result.stderr.decode(errors="replace")
        assert result.returncode != 0, err
        assert "Traceback" not in err + result.stdout.decode(errors="replace"), err
        assert "UTF-8" in err, err
    # Text that is no valid name reaches the server, which says what a name may be.
    for name in ("", "../x", "a/b", "x" * 5000, "\u00e9\u0301", "%2e%2e", "a b"):
        result = subprocess.run(
            [sys.executable, "-m", "roles.management.cli", "--home", str(home), "site", "show", name],
            capture_output=True,
            cwd=root,
            env=env,
            timeout=30,
        )
        err = result.stderr.decode(errors="replace")
        assert result.returncode != 0 and err.startswith("error: "), (name[:20], err)
        assert "Traceback" not in err, err


def _session(cloud: ManagementCloud) -> tuple[bytes, str]:
    """A signed-in admin's portal cookie and the CSRF token its forms carry."""
    status, answer = json_post(cloud, "/api/v1/users", json.dumps({"username": "portal-admin"}).encode())
    password = json.loads(answer)["password"] if status == 201 else ""
    form = f"csrf=abc&username=portal-admin&password={password}".encode()
    headers = [b"Content-Type: application/x-www-form-urlencoded", b"Cookie: __Host-sitecloud_csrf=abc"]
    ctx = cloud.pki.client_ssl(None)
    head = b"POST /signin HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + b"\r\n".join(headers)
    with (
        socket.create_connection(("127.0.0.1", cloud.config.api_port), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        tls.sendall(head + b"\r\nContent-Length: %d\r\n\r\n" % len(form) + form)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 303"), answer[:300]
    value = re.search(rb"__Host-sitecloud_session=([^;\s]+)", answer)
    assert value is not None
    cookie = b"Cookie: __Host-sitecloud_session=" + value.group(1)
    _, page = raw(cloud, "GET", "/admin/tenants", [cookie])
    csrf = re.search(rb'name="csrf" value="([^"]+)"', page)
    assert csrf is not None, page[:500]
    return cookie, csrf.group(1).decode()


def test_signed_in_portal_forms_and_addresses_with_bad_values_get_4xx(cloud: ManagementCloud) -> None:
    cookie, csrf = _session(cloud)
    form = [b"Content-Type: application/x-www-form-urlencoded", cookie]
    for body in (
        f"csrf={csrf}&action=suspend&subscription=many",
        f"csrf={csrf}&action=resume&subscription=%C2%B2",
        f"csrf={csrf}&action=suspend&subscription=" + "9" * 5000,
        f"csrf={csrf}&action=create&name=a%00b",
    ):
        status, page = _portal(cloud, "POST", "/admin/tenants", form, body.encode())
        assert 400 <= status < 500, (body[:80], status, page[:300])
    for path in ("/admin/plans/a%00b", "/portal/sites/a%00b", "/portal/sites/x?check=a%00b"):
        status, page = _portal(cloud, "GET", path, [cookie])
        assert status == 400 and b"NUL" in page, (path, status)
    status, page = _portal(cloud, "POST", "/admin/plans/%00", form, f"csrf={csrf}&max_sites=%C2%B2".encode())
    assert status == 400, page[:300]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("DELETE", "/api/v1/hosts/a%00b"),
        ("POST", "/api/v1/roles/worker/a%00b/restart"),
        ("GET", "/api/v1/sites?x=%00"),
        ("GET", "/api/v1/sites/x/logs?lines=1&follow=%00"),
    ],
)
def test_a_nul_anywhere_in_the_address_gets_400(cloud: ManagementCloud, method: str, path: str) -> None:
    status, answer = raw(cloud, method, path, [admin_header(cloud)])
    assert status == 400, answer
    assert "NUL" in error_of(status, answer)["message"]


@pytest.fixture(scope="module")
def publisher(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PublisherCloud]:
    root = tmp_path_factory.mktemp("bad-deploy")
    pki = CloudPKI(root / "pki")
    fileserver = RoleProcess(
        pki.role_config(FileserverConfig, "fileserver", root / "fileserver"), pki
    ).start()
    proc = RoleProcess(pki.role_config(PublisherConfig, "publisher", root / "publisher"), pki)
    try:
        proc.start()
        cloud = PublisherCloud(
            pki, fileserver, proc, {name: hash_password(pw) for name, (pw, _) in SITES.items()}
        )
        cloud.push()
        yield cloud
    finally:
        proc.stop()
        fileserver.stop()


@pytest.mark.parametrize(
    "value",
    [
        b"Basic \xff\xfe",
        b"Basic " + base64.b64encode(b"web:\xff\xfe"),
        b"Basic " + base64.b64encode("w\u00e9b:p\u00e4ss".encode()),
        b"Basic " + base64.b64encode(b"\xed\xa0\x80:x"),
        b"Basic " + b"A" * 6000,
        b"Basic !!!",
        b"Bearer x",
        b"\xff",
    ],
    ids=["raw-bytes", "password-not-utf8", "utf8", "surrogate", "long", "not-base64", "bearer", "no-scheme"],
)
def test_web_deploy_basic_auth_that_is_not_text_gets_401(publisher: PublisherCloud, value: bytes) -> None:
    mark = len(publisher.publisher.log())
    head = (
        b"POST /api/deploy/web HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
        b"Content-Type: application/zip\r\nContent-Length: 0\r\nAuthorization: " + value + b"\r\n\r\n"
    )
    ctx = publisher.pki.client_ssl(None)
    with (
        socket.create_connection(("127.0.0.1", publisher.config.deploy_port), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        tls.sendall(head)
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401"), answer[:300]
    assert b'"unauthorized"' in answer
    new = publisher.publisher.log()[mark:]
    assert "Traceback" not in new, new[-3000:]


@pytest.mark.parametrize(
    "target",
    [
        b"/portal/\xff\xfe",
        b"/signin?n=\xff",
        b"/api/v1/sites/\xff\xfe",
        b"/nowhere/\xed\xa0\x80",
        b"/admin/plans/\xc3\xa9",
    ],
)
def test_raw_bytes_in_the_request_target_get_4xx_or_a_page(cloud: ManagementCloud, target: bytes) -> None:
    ctx = cloud.pki.client_ssl(None)
    with (
        socket.create_connection(("127.0.0.1", cloud.config.api_port), timeout=10) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        tls.sendall(
            b"GET "
            + target
            + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            + admin_header(cloud)
            + b"\r\n\r\n"
        )
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    assert status < 500, answer[:500]


def test_the_json_boundary_on_its_own() -> None:
    nested = b'{"a": ' * (MAX_JSON_DEPTH - 1) + b"[1]" + b"}" * (MAX_JSON_DEPTH - 1)
    assert parse_json_object(nested)["a"]
    with pytest.raises(BadRequest, match="nested deeper"):
        parse_json_object(b'{"a": ' * MAX_JSON_DEPTH + b"[1]" + b"}" * MAX_JSON_DEPTH)
    assert parse_json_object('{"name": "caf\u00e9 \U0001f600"}'.encode()) == {"name": "caf\u00e9 \U0001f600"}
    assert parse_json_object(b'{"name": "\\ud83d\\ude00"}') == {"name": "\U0001f600"}, (
        "a surrogate pair is fine"
    )
    for body in (b'{"n": "\\ud83d"}', b'{"n": "\\ude00\\ud83d"}', b'{"n": ["x", {"m": "\\udfff"}]}'):
        with pytest.raises(InvalidInput, match="not valid Unicode"):
            parse_json_object(body)
    assert check_text("plain", "x") == "plain"


def test_a_number_out_of_its_range_is_told_the_range_it_must_be_in() -> None:
    # A rollback to version 0 is an integer: the refusal says which ones are allowed.
    with pytest.raises(InvalidInput, match=r"^'version' must be an integer of at least 1 or null \(got 0\)"):
        validated(Rollback, {"version": 0})
    with pytest.raises(InvalidInput, match=r"^'instances' must be an integer from 1 to \d+ \(got 0\)"):
        validated(SiteScale, {"instances": 0})


@pytest.mark.parametrize(
    "name", ["Blog_1", "Shop", "a_b", "--x--", "WWW", "My Site!", "ab.cd", "x" * 70, "Été", "_", "API"]
)
def test_a_suggested_site_name_is_one_that_is_accepted(name: str) -> None:
    with pytest.raises(InvalidInput) as refused:
        validate_site_name(name)
    hint = refused.value.hint or ""
    suggested = re.fullmatch(r"use '([^']*)'", hint)
    if suggested is None:
        assert "letters a-z" in hint or "another name" in hint, hint
    else:
        assert validate_site_name(suggested.group(1)) == suggested.group(1)


def test_a_portal_flash_opens_only_for_the_session_that_sealed_it() -> None:
    sealed = seal_flash("session-a", {"notice": "hi", "data": {"secret": "pw"}})
    assert open_flash("session-a", sealed) == {"notice": "hi", "data": {"secret": "pw"}}
    assert open_flash("session-b", sealed) is None
    flipped = sealed[:-2] + ("A" if sealed[-2] != "A" else "B") + sealed[-1]
    assert open_flash("session-a", flipped) is None
    for junk in ("", "%%%", "AAAA", "x" * 5000):
        assert open_flash("session-a", junk) is None
    # A form too big for a cookie is dropped; the message stays.
    big = seal_flash("session-a", {"error": {"message": "no"}, "form": {"v": "x" * 5000}})
    assert open_flash("session-a", big) == {"error": {"message": "no"}}
    # An error too long for a cookie (a failed build's lines) is cut to fit, not dropped with it.
    lines = "\n".join(f"ERROR: line {i} " + "é" * 300 for i in range(20))
    long = seal_flash("session-a", {"error": {"message": lines, "hint": "deploy again"}, "form": {"v": "x"}})
    assert len(long) <= 3800
    shown = open_flash("session-a", long)
    assert shown is not None and shown["error"]["hint"] == "deploy again" and "form" not in shown
    message = shown["error"]["message"]
    assert message.startswith("ERROR: line 0 é") and message.endswith(" …"), message[:100]
