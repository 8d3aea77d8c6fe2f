"""ACME certificates for custom hostnames, from Debian's pebble (the ACME test CA), and the TLS policy.

A whole cloud runs from `sitecloud up`; pebble validates HTTP-01 challenges by fetching them from the
cloud's front end HTTP port, resolving names through a tiny DNS server the test runs (which the cloud
also asks for ownership proof). Nothing is faked: pebble checks the challenge our front end serves.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ftplib
import hashlib
import http.client
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from cryptography import x509
from sqlalchemy import text

from roles.frontend._routes import build_routes
from roles.frontend._upstream import Upstream
from shared.acme import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    LETSENCRYPT_STAGING,
    AcmeChallenge,
    backoff,
    check_directory_url,
    renewal_time,
)
from shared.contracts.snapshots import FrontendSnapshot
from shared.db.session import _MIGRATIONS, Database
from shared.errors import InvalidInput
from shared.net import free_port
from shared.pki import CertificateAuthority
from tests.cloud import LocalCloud, https_get
from tests.support import TinyDns, wait_until
from tests.test_hostnames import Api

pytestmark = pytest.mark.timeout(300)

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"
# Seconds: renewals fall due 20 s after issue, with 10 s left for a slow (loaded) machine to renew.
CERT_LIFETIME = 30
needs_pebble = pytest.mark.skipif(
    not os.access(PEBBLE, os.X_OK), reason="Debian package pebble (the ACME test CA) is not installed"
)


# -- pure parts -------------------------------------------------------------------------------------


def test_renewal_falls_due_at_two_thirds_of_the_lifetime() -> None:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    assert renewal_time(start, start + dt.timedelta(days=90)) == start + dt.timedelta(days=60)
    assert renewal_time(start, start + dt.timedelta(hours=3)) == start + dt.timedelta(hours=2)


def test_failures_back_off_doubling_up_to_a_day() -> None:
    assert [backoff(n) for n in (1, 2, 3)] == [BACKOFF_FIRST, BACKOFF_FIRST * 2, BACKOFF_FIRST * 4]
    assert backoff(50) == BACKOFF_MAX == dt.timedelta(days=1)


def test_the_directory_setting_takes_aliases_and_https_urls_only() -> None:
    assert check_directory_url("letsencrypt-staging") == LETSENCRYPT_STAGING
    assert check_directory_url("off") == ""
    assert check_directory_url("https://ca.example/dir") == "https://ca.example/dir"
    for bad in ("http://ca.example/dir", "ftp://x", "https://user:pw@ca.example/", 7):
        with pytest.raises(InvalidInput):
            check_directory_url(bad)


def test_a_snapshot_challenge_is_checked_and_bound_to_its_host() -> None:
    token = "A" * 43
    good = AcmeChallenge("www.example.test", token, f"{token}.{'b' * 43}")
    snapshot: dict[str, Any] = {
        "domain": "sites.localhost",
        "sites": {},
        "acme_challenges": [
            good.to_json(),
            {"host": "x.test", "token": "../../etc", "key_authorization": "z"},
        ],
    }
    routes = build_routes(
        FrontendSnapshot.parse({"version": 1, **snapshot}),
        lambda h, p, t: Upstream(h, p, t),
        lambda s: [0, 0, 0],
    )
    # A bad entry (a path for a token) refuses the challenge list, never the routes.
    assert routes.challenges == {} and any("ACME" in s for s in routes.skipped)
    one = build_routes(
        FrontendSnapshot.parse({"version": 1, **snapshot, "acme_challenges": [good.to_json()]}),
        lambda h, p, t: Upstream(h, p, t),
        lambda s: [0, 0, 0],
    )
    assert one.challenges == {
        (
            b"www.example.test",
            f"/.well-known/acme-challenge/{token}".encode(),
        ): good.key_authorization.encode()
    }


# -- a cloud with pebble ----------------------------------------------------------------------------


class Pebble:
    """pebble on loopback with a TLS certificate from a CA of the test's, validating on ``http_port``."""

    def __init__(self, workdir: Path, *, http_port: int, dns_port: int, validity: int) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        ca = CertificateAuthority.load_or_create(workdir / "tls-ca", name="pebble listener test CA")
        listener = ca.issue("localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        listener.write(workdir / "key.pem", workdir / "cert.pem")
        self.tls_ca_pem = ca.cert_pem.decode()
        self.port, self.management_port = free_port(), free_port()
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.port}",
                "managementListenAddress": f"127.0.0.1:{self.management_port}",
                "certificate": str(workdir / "cert.pem"),
                "privateKey": str(workdir / "key.pem"),
                "httpPort": http_port,
                "tlsPort": free_port(),
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
                # Short-lived certificates, so a renewal falls due (at two thirds) while the test runs.
                "certificateValidityPeriod": validity,
            }
        }
        (workdir / "pebble.json").write_text(json.dumps(config))
        self.log_path = workdir / "pebble.log"
        env = {
            **os.environ,
            "PEBBLE_VA_NOSLEEP": "1",  # no random wait before validating; the challenge is still fetched
            "PEBBLE_WFE_NONCEREJECT": "0",
            "PEBBLE_AUTHZREUSE": "0",  # every order proves the name again, renewals included
        }
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [PEBBLE, "-config", str(workdir / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns_port}"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=workdir,
            )
        self._ctx = ssl.create_default_context(cadata=self.tls_ca_pem)
        wait_until(self._up, timeout=20, what="pebble to listen")

    @property
    def directory_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def _up(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"pebble exited:\n{self.log()}")
        try:
            with urllib.request.urlopen(self.directory_url, context=self._ctx, timeout=2):
                return True
        except OSError:
            return False

    def root_pem(self) -> str:
        """The root its certificates chain to (new on every start)."""
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=self._ctx, timeout=5) as resp:
            return str(resp.read().decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def validations(self, host: str) -> int:
        """Challenges for ``host`` pebble's validator took up (one per order here)."""
        return self.log().count(
            f'Pulled a task from the Tasks queue: &va.vaTask{{Identifier:acme.Identifier{{Type:"dns", Value:"{host}"}}'
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def tiny_dns() -> Iterator[TinyDns]:
    server = TinyDns()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory, tiny_dns: TinyDns) -> Iterator[tuple[LocalCloud, Api]]:
    local = LocalCloud(tmp_path_factory.mktemp("acme-cloud") / "home")
    api = Api(local.start(), local.ca_file)
    try:
        api.ok("PATCH", "/settings", {"dns_resolvers": [f"127.0.0.1:{tiny_dns.port}"]})
        api.ok("POST", "/plans", {"name": "web", "max_sites": 1, "storage_mb": 5, "max_custom_hostnames": 5})
        yield local, api
    finally:
        local.kill_everything()


@pytest.fixture(scope="module")
def pebble(
    tmp_path_factory: pytest.TempPathFactory, cloud: tuple[LocalCloud, Api], tiny_dns: TinyDns
) -> Iterator[Pebble]:
    if not os.access(PEBBLE, os.X_OK):
        pytest.skip("Debian package pebble (the ACME test CA) is not installed")
    local, api = cloud
    server = Pebble(
        tmp_path_factory.mktemp("pebble"),
        http_port=local.ports["http_port"],
        dns_port=tiny_dns.port,
        validity=CERT_LIFETIME,
    )
    try:
        settings = api.ok(
            "PATCH",
            "/settings",
            {"acme_directory_url": server.directory_url, "acme_ca_bundle": server.tls_ca_pem},
        )
        assert settings["acme_directory_url"] == server.directory_url
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bravo(cloud: tuple[LocalCloud, Api]) -> dict[str, Any]:
    """A tenant with a site whose content is up, HTTPS-only (challenges must still be answered on HTTP)."""
    local, _ = cloud
    created = local.cli("tenant", "create", "bravo")
    sub = local.cli("subscription", "create", "--tenant", "bravo", "--plan", "web")
    made = local.cli("site", "create", "bravo", "--subscription", str(sub["id"]), token=created["token"])
    ftp = ftplib.FTP()
    ftp.connect(made["ftp"]["host"], made["ftp"]["port"], timeout=10)
    ftp.login(made["ftp"]["user"], made["ftp"]["password"])
    ftp.storbinary("STOR index.html", io.BytesIO(b"<h1>bravo home</h1>"))
    ftp.quit()
    local.wait_for_content("bravo", "/", b"<h1>bravo home</h1>")
    local.cli("site", "set", "bravo", "https_only=true", token=created["token"])
    return {"token": created["token"], "verification_id": sub["verification_id"]}


def _cert_state(api: Api, token: str, hostname: str) -> dict[str, Any]:
    rows = api.ok("GET", "/sites/bravo/hostnames", token=token)["hostnames"]
    return dict(next(h for h in rows if h["hostname"] == hostname)["certificate_state"])


def _get_verified(local: LocalCloud, host: str, root_pem: str) -> tuple[str, str, int, bytes]:
    """HTTPS GET by SNI through the front end, the chain checked against pebble's root and the name:
    (certificate SHA-256, issuer, status, body)."""
    context = ssl.create_default_context(cadata=root_pem)
    with (
        socket.create_connection(("127.0.0.1", local.ports["https_port"]), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True) or b""
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := tls.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    issuer = x509.load_der_x509_certificate(der).issuer.rfc4514_string()
    return hashlib.sha256(der).hexdigest(), issuer, int(head.split()[1]), body


def _issued(fingerprint: str, local: LocalCloud, host: str, root_pem: str) -> dict[str, dt.datetime]:
    """The validity of the certificate the front end serves for ``host`` (which has ``fingerprint``)."""
    context = ssl.create_default_context(cadata=root_pem)
    with (
        socket.create_connection(("127.0.0.1", local.ports["https_port"]), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True) or b""
    assert hashlib.sha256(der).hexdigest() == fingerprint
    cert = x509.load_der_x509_certificate(der)
    return {"not_before": cert.not_valid_before_utc, "not_after": cert.not_valid_after_utc}


@needs_pebble
def test_a_verified_name_gets_a_certificate_from_pebble_served_by_sni_and_renewed_without_a_failed_request(
    cloud: tuple[LocalCloud, Api], pebble: Pebble, bravo: dict[str, Any], tiny_dns: TinyDns
) -> None:
    local, api = cloud
    host = "www.acme.test"
    added = api.ok("POST", "/sites/bravo/hostnames", {"hostname": host}, token=bravo["token"])
    assert added["certificate_state"]["state"] == "pending_verification"
    tiny_dns.set(host, "A", "127.0.0.1")
    tiny_dns.set(f"asuid.{host}", "TXT", bravo["verification_id"])
    checked = local.cli("site", "hostname", "verify", "bravo", host, token=bravo["token"])
    assert checked["state"] == "verified"
    wait_until(
        lambda: _cert_state(api, bravo["token"], host)["state"] == "valid",
        timeout=60,
        what=f"a certificate for {host} from pebble",
    )
    state = _cert_state(api, bravo["token"], host)
    assert state["source"] == "acme" and state["until"] and state["reason"] is None
    root = pebble.root_pem()
    wait_until(
        lambda: _get_verified(local, host, root)[2] == 200,
        timeout=15,
        what="the certificate on the front end",
    )
    first, issuer, status, body = _get_verified(local, host, root)
    assert status == 200 and body == b"<h1>bravo home</h1>" and "Pebble" in issuer
    listed = local.cli("site", "hostname", "list", "bravo", token=bravo["token"])
    assert listed["hostnames"][0]["certificate_state"]["state"] == "valid"
    text = local.cli_text("--token", bravo["token"], "site", "hostname", "list", "bravo")
    assert f"valid until {state['until'][:10]}" in text

    issued = _issued(first, local, host, root)
    assert (issued["not_after"] - issued["not_before"]).total_seconds() <= CERT_LIFETIME + 1

    # Visitors keep being answered while the certificate is replaced: first by the renewal that falls
    # due at two thirds of its lifetime, then by one asked for now.
    failures: list[str] = []
    served: list[str] = [first]
    stop = threading.Event()

    def visit() -> None:
        while not stop.is_set():
            try:
                fingerprint, _, code, _ = _get_verified(local, host, root)
                if fingerprint != served[-1]:
                    served.append(fingerprint)
                if code != 200:
                    failures.append(f"status {code}")
            except (OSError, ssl.SSLError) as err:
                failures.append(repr(err))
            time.sleep(0.05)

    visitor = threading.Thread(target=visit)
    visitor.start()
    try:
        due = renewal_time(issued["not_before"], issued["not_after"])
        wait_until(lambda: len(served) >= 2, timeout=CERT_LIFETIME, what="the renewal at two thirds")
        renewed_at = dt.datetime.now(dt.UTC)
        assert due - dt.timedelta(seconds=1) <= renewed_at < issued["not_after"], (due, renewed_at)
        # A tenant may not order again minutes after the last order (the CA's rate limits are the
        # cloud's); an admin may.
        status, refused = api.call("POST", f"/sites/bravo/hostnames/{host}/renew", token=bravo["token"])
        assert status == 429 and "try again in" in refused["error"]["hint"], refused
        assert api.call("POST", f"/sites/bravo/hostnames/{host}/renew")[0] == 202
        wait_until(lambda: len(served) >= 3, timeout=CERT_LIFETIME / 2, what="the renewal asked for")
    finally:
        stop.set()
        visitor.join()
    assert failures == [] and len(set(served)) == len(served) >= 3
    assert _cert_state(api, bravo["token"], host)["state"] == "valid"


@needs_pebble
def test_a_failed_order_says_why_and_backs_off(
    cloud: tuple[LocalCloud, Api], pebble: Pebble, bravo: dict[str, Any], tiny_dns: TinyDns
) -> None:
    local, api = cloud
    host = "nowhere.acme.test"  # proven by TXT, but its name does not resolve: pebble cannot fetch
    tiny_dns.set(f"asuid.{host}", "TXT", bravo["verification_id"])
    started = dt.datetime.now(dt.UTC)
    api.ok("POST", "/sites/bravo/hostnames", {"hostname": host}, token=bravo["token"])
    wait_until(
        lambda: _cert_state(api, bravo["token"], host)["state"] == "failed",
        timeout=60,
        what=f"the order for {host} to fail",
    )
    state = _cert_state(api, bravo["token"], host)
    assert host in state["reason"] and "validate" in state["reason"], state
    retry = dt.datetime.fromisoformat(state["retry_at"])
    assert (
        started + BACKOFF_FIRST - dt.timedelta(seconds=5) <= retry <= dt.datetime.now(dt.UTC) + BACKOFF_FIRST
    )
    text = local.cli_text("--token", bravo["token"], "site", "hostname", "list", "bravo")
    assert "failed: the CA could not validate" in text
    assert pebble.validations(host) == 1
    # The controller is woken (any change nudges it), and still waits out the back-off.
    local.cli("site", "set", "bravo", "NUDGE=1", token=bravo["token"])
    time.sleep(2)
    assert pebble.validations(host) == 1
    assert _cert_state(api, bravo["token"], host) == state
    # A retry asked for now (by an admin: the tenant must wait) fails again and waits twice as long.
    assert api.call("POST", f"/sites/bravo/hostnames/{host}/renew", token=bravo["token"])[0] == 429
    assert api.call("POST", f"/sites/bravo/hostnames/{host}/renew")[0] == 202
    wait_until(
        lambda: _cert_state(api, bravo["token"], host).get("retry_at") not in (None, state["retry_at"]),
        timeout=60,
        what="the second failure",
    )
    again = _cert_state(api, bravo["token"], host)
    assert again["state"] == "failed" and pebble.validations(host) == 2
    assert dt.datetime.fromisoformat(again["retry_at"]) > retry + BACKOFF_FIRST - dt.timedelta(seconds=5)
    api.ok("DELETE", f"/sites/bravo/hostnames/{host}", token=bravo["token"])


def test_renewing_a_pending_or_unknown_name_is_a_clear_4xx(
    cloud: tuple[LocalCloud, Api], bravo: dict[str, Any]
) -> None:
    _, api = cloud
    api.ok("POST", "/sites/bravo/hostnames", {"hostname": "later.acme.test"}, token=bravo["token"])
    status, answer = api.call("POST", "/sites/bravo/hostnames/later.acme.test/renew", token=bravo["token"])
    assert status == 400 and "not verified" in answer["error"]["message"]
    status, answer = api.call("POST", "/sites/bravo/hostnames/none.acme.test/renew", token=bravo["token"])
    assert status == 404
    status, answer = api.call("PATCH", "/settings", {"acme_directory_url": "http://ca.example/dir"})
    assert status == 400 and "https://" in answer["error"]["message"]
    api.ok("DELETE", "/sites/bravo/hostnames/later.acme.test", token=bravo["token"])


# -- TLS policy -------------------------------------------------------------------------------------


def _tls11_control(client: ssl.SSLContext, tmp_path: Path) -> str | None:
    """Whether ``client`` can complete a TLS 1.1 handshake with a server that allows it (None: yes)."""
    ca = CertificateAuthority.load_or_create(tmp_path / "control-ca")
    ca.issue("localhost", dns_names=["localhost"]).write(tmp_path / "key.pem", tmp_path / "cert.pem")
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1
    server.set_ciphers("ALL:@SECLEVEL=0")
    server.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    problem: list[str] = []

    def accept() -> None:
        conn, _ = listener.accept()
        with contextlib.suppress(OSError), server.wrap_socket(conn, server_side=True):
            pass
        conn.close()

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        with (
            socket.create_connection(listener.getsockname(), timeout=10) as sock,
            client.wrap_socket(sock, server_hostname="localhost") as tls,
        ):
            if tls.version() != "TLSv1.1":
                problem.append(f"negotiated {tls.version()}")
    except (OSError, ssl.SSLError) as err:
        problem.append(str(err))
    finally:
        thread.join(10)
        listener.close()
    return problem[0] if problem else None


def test_tls_1_1_is_refused_by_the_front_end(cloud: tuple[LocalCloud, Api], tmp_path: Path) -> None:
    local, _ = cloud
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # offering TLS 1.1 is the point here
        try:
            context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
            context.set_ciphers("ALL:@SECLEVEL=0")
        except (ValueError, ssl.SSLError) as err:
            pytest.skip(f"this OpenSSL cannot offer TLS 1.1 at all: {err}")
        # The same client completes TLS 1.1 with a server that allows it: its refusal below is the front end's.
        problem = _tls11_control(context, tmp_path)
        if problem is not None:
            pytest.skip(f"this OpenSSL will not speak TLS 1.1 even to a willing server: {problem}")
        with (
            socket.create_connection(("127.0.0.1", local.ports["https_port"]), timeout=10) as sock,
            pytest.raises((ssl.SSLError, ConnectionError)),
        ):
            context.wrap_socket(sock, server_hostname="bravo.sites.localhost")
    # TLS 1.2 with the intermediate suites is served.
    modern = ssl.create_default_context(cafile=str(local.ca_file))
    modern.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", local.ports["https_port"]), timeout=10) as sock,
        modern.wrap_socket(sock, server_hostname="bravo.sites.localhost") as tls,
    ):
        cipher = tls.cipher()
        assert cipher is not None and cipher[1] == "TLSv1.2" and cipher[0].startswith("ECDHE-")


def test_hsts_is_sent_on_https_answers_of_sites_that_ask_for_it(
    cloud: tuple[LocalCloud, Api], bravo: dict[str, Any]
) -> None:
    local, _ = cloud
    port, host = local.ports["https_port"], "bravo.sites.localhost"
    status, headers, _ = https_get(port, host, ca_file=local.ca_file)
    assert status == 200 and "strict-transport-security" not in headers
    local.cli("site", "set", "bravo", "hsts=true", token=bravo["token"])
    wait_until(
        lambda: "strict-transport-security" in https_get(port, host, ca_file=local.ca_file)[1],
        timeout=10,
        what="the HSTS header",
    )
    assert https_get(port, host, ca_file=local.ca_file)[1]["strict-transport-security"] == "max-age=31536000"
    # Never on plain HTTP (RFC 6797 7.2): there the https_only redirect answers, without it.
    conn = http.client.HTTPConnection("127.0.0.1", local.ports["http_port"], timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 301 and resp.getheader("Strict-Transport-Security") is None
    finally:
        conn.close()
    local.cli("site", "unset", "bravo", "hsts", token=bravo["token"])
    wait_until(
        lambda: "strict-transport-security" not in https_get(port, host, ca_file=local.ca_file)[1],
        timeout=10,
        what="the HSTS header to go",
    )


def test_the_upgrade_marks_stored_certificates_as_uploads(tmp_path: Path) -> None:
    """Certificates stored before ACME were tenants' uploads: ACME must leave them alone."""
    db = Database.sqlite(tmp_path / "old.db")
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["engine"] = db.engine
    command.upgrade(cfg, "0006")
    with db.engine.begin() as c:
        c.execute(text("insert into tenants (name) values ('t')"))
        c.execute(text("insert into plans (name, max_sites, storage_mb) values ('p', 1, 1)"))
        c.execute(text("insert into subscriptions (tenant_id, plan_id, state) values (1, 1, 'active')"))
        c.execute(
            text(
                "insert into sites (uid, name, subscription_id, state, app_settings) "
                "values ('u', 's', 1, 'running', '{}')"
            )
        )
        c.execute(
            text(
                "insert into custom_hostnames (site_id, hostname, cert_pem, key_pem, state) values "
                "(1, 'a.example.test', 'CERT', 'KEY', 'verified'), (1, 'b.example.test', null, null, 'verified')"
            )
        )
    command.upgrade(cfg, "head")
    with db.engine.begin() as c:
        rows = c.execute(
            text("select hostname, cert_source, acme_failures from custom_hostnames order by hostname")
        ).all()
        assert rows == [("a.example.test", "upload", 0), ("b.example.test", None, 0)]
    command.downgrade(cfg, "0006")
    command.upgrade(cfg, "head")
    with db.engine.begin() as c:
        assert c.execute(text("select count(*) from custom_hostnames")).scalar() == 2
    db.dispose()
