"""Custom hostnames: the names a tenant may claim, and DNS proof of ownership before a name is routed.

A tiny authoritative DNS server (dnspython's message parsing over a UDP socket) answers for the test's
zone; the cloud is configured to ask it. Claims go through the CLI and the REST API of a whole cloud
started by `sitecloud up`, and visits through its front end.
"""

from __future__ import annotations

import datetime as dt
import ftplib
import hashlib
import http.client
import io
import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import text

from shared.db.session import _MIGRATIONS, Database
from shared.errors import InvalidInput
from shared.names import validate_custom_hostname
from tests.cloud import LocalCloud
from tests.support import TinyDns, wait_until

pytestmark = pytest.mark.timeout(300)


class Api:
    """The management REST API over HTTPS, as any client calls it."""

    def __init__(self, endpoints: dict[str, Any], ca_file: Path) -> None:
        self.base = endpoints["api"].rstrip("/")
        self.admin_token = Path(endpoints["admin_token_file"]).read_text().strip()
        self._context = ssl.create_default_context(cafile=str(ca_file))

    def call(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"{self.base}/api/v1{path}", data=data, method=method)
        req.add_header("Authorization", f"Bearer {token or self.admin_token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self._context, timeout=30) as resp:
                raw = resp.read()
                return resp.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as err:
            raw = err.read()
            return err.code, json.loads(raw) if raw else None

    def ok(self, method: str, path: str, body: Any = None, *, token: str | None = None) -> Any:
        status, answer = self.call(method, path, body, token=token)
        assert status < 300, f"{method} {path}: {status} {answer}"
        return answer


@pytest.fixture(scope="module")
def tiny_dns() -> Iterator[TinyDns]:
    server = TinyDns()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory, tiny_dns: TinyDns) -> Iterator[tuple[LocalCloud, Api]]:
    cloud = LocalCloud(tmp_path_factory.mktemp("cloud") / "home")
    api = Api(cloud.start(), cloud.ca_file)
    try:
        # ACME is tested against pebble (test_acme.py); here verified names must not reach out to a real CA.
        settings = api.ok(
            "PATCH",
            "/settings",
            {"dns_resolvers": [f"127.0.0.1:{tiny_dns.port}"], "acme_directory_url": "off"},
        )
        assert settings["dns_resolvers"] == [f"127.0.0.1:{tiny_dns.port}"]
        yield cloud, api
    finally:
        cloud.kill_everything()


@pytest.fixture(scope="module")
def tenants(cloud: tuple[LocalCloud, Api]) -> dict[str, dict[str, Any]]:
    """bravo owns example.test and bravo.test; mallory owns nothing but tries."""
    local, api = cloud
    api.ok("POST", "/plans", {"name": "web", "max_sites": 1, "storage_mb": 5, "max_custom_hostnames": 3})
    out = {}
    for tenant, site in (("bravo", "bravo"), ("mallory", "evil")):
        created = local.cli("tenant", "create", tenant)
        sub = local.cli("subscription", "create", "--tenant", tenant, "--plan", "web")
        made = local.cli("site", "create", site, "--subscription", str(sub["id"]), token=created["token"])
        ftp = ftplib.FTP()
        ftp.connect(made["ftp"]["host"], made["ftp"]["port"], timeout=10)
        ftp.login(made["ftp"]["user"], made["ftp"]["password"])
        ftp.storbinary("STOR index.html", io.BytesIO(f"<h1>{site} home</h1>".encode()))
        ftp.quit()
        local.wait_for_content(site, "/", f"<h1>{site} home</h1>".encode())
        out[tenant] = {
            "token": created["token"],
            "site": site,
            "sub": sub["id"],
            "verification_id": sub["verification_id"],
        }
    return out


def _visit(local: LocalCloud, host: str) -> tuple[int, bytes]:
    """Plain HTTP to the front end with ``Host: <host>``, as a visitor whose DNS points here."""
    conn = http.client.HTTPConnection("127.0.0.1", local.ports["http_port"], timeout=10)
    try:
        conn.request("GET", "/", headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_a_claim_is_pending_and_unrouted_until_its_txt_record_proves_it(
    cloud: tuple[LocalCloud, Api], tenants: dict[str, dict[str, Any]], tiny_dns: TinyDns
) -> None:
    local, api = cloud
    bravo = tenants["bravo"]
    added = local.cli("site", "hostname", "add", "bravo", "www.example.test", token=bravo["token"])
    assert added["state"] == "pending" and added["site"] == "bravo"
    assert {"type": "TXT", "name": "asuid.www.example.test", "value": bravo["verification_id"]} in added[
        "records"
    ]
    assert {"type": "CNAME", "name": "www.example.test", "value": "bravo.sites.localhost"} in added["records"]
    assert bravo["verification_id"] in local.cli_text(
        "--token", bravo["token"], "subscription", "show", str(bravo["sub"])
    )
    text = local.cli_text("--token", bravo["token"], "site", "hostname", "list", "bravo")
    assert "www.example.test" in text and "pending" in text and bravo["verification_id"] in text
    # Pending: the front end does not know the name (the platform's 404 page), bravo's content stays away.
    status, body = _visit(local, "www.example.test")
    assert status == 404 and b"bravo home" not in body
    checked = local.cli("site", "hostname", "verify", "bravo", "www.example.test", token=bravo["token"])
    assert checked["state"] == "pending" and "asuid.www.example.test does not exist" in checked["problem"]

    tiny_dns.set("asuid.www.example.test", "TXT", bravo["verification_id"])
    verified = local.cli("site", "hostname", "verify", "bravo", "www.example.test", token=bravo["token"])
    assert verified["state"] == "verified" and verified["records"] == [] and verified["verified_at"]
    assert _visit(local, "www.example.test") == (200, b"<h1>bravo home</h1>")
    listed = api.ok("GET", "/sites/bravo/hostnames", token=bravo["token"])
    assert [(h["hostname"], h["state"]) for h in listed["hostnames"]] == [("www.example.test", "verified")]


def _self_signed(name: str) -> tuple[str, str, bytes]:
    """PEM certificate and key for ``name``, and the certificate's DER."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return (
        cert.public_bytes(serialization.Encoding.PEM).decode(),
        key_pem,
        cert.public_bytes(serialization.Encoding.DER),
    )


def _visit_https(local: LocalCloud, host: str) -> tuple[str, int, bytes]:
    """HTTPS to the front end with SNI and Host ``host``: the served certificate's SHA-256, status, body."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the fingerprint is compared instead
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
    return hashlib.sha256(der).hexdigest(), int(head.split()[1]), body


def test_a_verified_name_is_served_over_https_with_its_own_certificate_by_sni(
    cloud: tuple[LocalCloud, Api], tenants: dict[str, dict[str, Any]], tiny_dns: TinyDns
) -> None:
    local, api = cloud
    bravo = tenants["bravo"]
    cert_pem, key_pem, der = _self_signed("secure.example.test")
    body = {"hostname": "secure.example.test", "certificate": cert_pem, "key": key_pem}
    added = api.ok("POST", "/sites/bravo/hostnames", body, token=bravo["token"])
    assert added["state"] == "pending"
    fingerprint, status, _ = _visit_https(local, "secure.example.test")
    assert fingerprint != hashlib.sha256(der).hexdigest() and status == 404
    tiny_dns.set("asuid.secure.example.test", "TXT", bravo["verification_id"])
    checked = api.ok("POST", "/sites/bravo/hostnames/secure.example.test/verify", token=bravo["token"])
    assert checked["state"] == "verified"
    fingerprint, status, page = _visit_https(local, "secure.example.test")
    assert fingerprint == hashlib.sha256(der).hexdigest()
    assert status == 200 and b"bravo home" in page
    api.ok("DELETE", "/sites/bravo/hostnames/secure.example.test", token=bravo["token"])


def test_a_cname_alone_proves_nothing_and_the_txt_record_proves_a_claim(
    cloud: tuple[LocalCloud, Api], tenants: dict[str, dict[str, Any]], tiny_dns: TinyDns
) -> None:
    # A CNAME to <site>.<domain> may be one another tenant left behind when it deleted a site of that
    # name: it sends visitors, but only the subscription's TXT record proves the name.
    local, api = cloud
    bravo = tenants["bravo"]
    tiny_dns.set("shop.example.test", "CNAME", "bravo.sites.localhost")
    added = api.ok("POST", "/sites/bravo/hostnames", {"hostname": "shop.example.test"}, token=bravo["token"])
    assert added["state"] == "pending"
    checked = api.ok("POST", "/sites/bravo/hostnames/shop.example.test/verify", token=bravo["token"])
    assert checked["state"] == "pending", checked
    assert "only the TXT record proves the name is yours" in checked["problem"], checked
    assert _visit(local, "shop.example.test")[0] != 200

    tiny_dns.set("asuid.shop.example.test", "TXT", bravo["verification_id"])
    checked = api.ok("POST", "/sites/bravo/hostnames/shop.example.test/verify", token=bravo["token"])
    assert checked["state"] == "verified", checked
    wait_until(
        lambda: _visit(local, "shop.example.test")[0] == 200, timeout=10, what="shop.example.test served"
    )
    assert _visit(local, "shop.example.test") == (200, b"<h1>bravo home</h1>")
    api.ok("DELETE", "/sites/bravo/hostnames/shop.example.test", token=bravo["token"])


def test_a_hostile_pending_claim_never_routes_and_the_real_owner_takes_the_name(
    cloud: tuple[LocalCloud, Api], tenants: dict[str, dict[str, Any]], tiny_dns: TinyDns
) -> None:
    local, api = cloud
    bravo, mallory = tenants["bravo"], tenants["mallory"]
    status, claim = api.call(
        "POST", "/sites/evil/hostnames", {"hostname": "www.bravo.test"}, token=mallory["token"]
    )
    assert (status, claim["state"]) == (201, "pending")
    assert _visit(local, "www.bravo.test")[0] == 404
    assert (
        api.ok("POST", "/sites/evil/hostnames/www.bravo.test/verify", token=mallory["token"])["state"]
        == "pending"
    )

    # The owner without proof is told exactly what proves it ...
    status, refused = api.call(
        "POST", "/sites/bravo/hostnames", {"hostname": "www.bravo.test"}, token=bravo["token"]
    )
    assert status == 409, refused
    assert f"asuid.www.bravo.test with {bravo['verification_id']}" in refused["error"]["hint"]
    # ... creates the record, and takes the name: mallory's claim is gone, bravo's content is served.
    tiny_dns.set("asuid.www.bravo.test", "TXT", bravo["verification_id"])
    status, taken = api.call(
        "POST", "/sites/bravo/hostnames", {"hostname": "www.bravo.test"}, token=bravo["token"]
    )
    assert (status, taken["state"]) == (201, "verified"), taken
    assert api.ok("GET", "/sites/evil/hostnames", token=mallory["token"])["hostnames"] == []
    assert _visit(local, "www.bravo.test") == (200, b"<h1>bravo home</h1>")

    # A verified name does not move without proof by the new owner.
    status, refused = api.call(
        "POST", "/sites/evil/hostnames", {"hostname": "www.bravo.test"}, token=mallory["token"]
    )
    assert status == 409 and "does not prove you own it" in refused["error"]["message"]
    assert _visit(local, "www.bravo.test") == (200, b"<h1>bravo home</h1>")


REFUSED = {
    "127.0.0.1": "is an IP address",
    "0x7f.1": "is an IP address",
    "2130706433": "is an IP address",
    "127.1": "is an IP address",
    "[::1]": "is an IP address",
    "::ffff:127.0.0.1": "is an IP address",
    "www": "single label",
    "localhost": "loopback name",
    "app.localhost": "loopback name",
    "x.other.localhost": "loopback name",
    "127.0.0.1.nip.io": "wildcard DNS service",
    "app.10-0-0-1.sslip.io": "wildcard DNS service",
    "x.traefik.me": "wildcard DNS service",
    "www.lvh.me": "wildcard DNS service",
    "10.0.0.1.example.org": "embeds an IP address",
    "ip-10-0-0-1.example.org": "embeds an IP address",
    "bad_name.example.org": "not a valid host name",
    "-x.example.org": "not a valid host name",
    "xn--zz.example.org": "not a valid host name",
    "a..example.org": "not a valid host name",
    "www.example.123": "numeric label",
}


@pytest.mark.parametrize(("name", "reason"), sorted(REFUSED.items()))
def test_validate_custom_hostname_refuses_with_a_reason(name: str, reason: str) -> None:
    with pytest.raises(InvalidInput, match=reason):
        validate_custom_hostname(name, platform_domain="sites.example.net")


def test_validate_custom_hostname_accepts_unicode_as_a_labels_and_refuses_platform_names() -> None:
    assert validate_custom_hostname("WWW.Bücher.Example.", platform_domain="sites.example.net") == (
        "www.xn--bcher-kva.example"
    )
    with pytest.raises(InvalidInput, match="belong to the platform"):
        validate_custom_hostname("a.sites.example.net", platform_domain="sites.example.net")
    with pytest.raises(InvalidInput, match="platform's own services"):
        validate_custom_hostname(
            "ftp.cloud.example.net", platform_domain="sites.example.net", reserved=["ftp.cloud.example.net"]
        )
    with pytest.raises(InvalidInput, match="wildcard DNS service"):
        validate_custom_hostname(
            "1.2.3.4.ip.example.com", platform_domain="x.test", ip_dns_services=["ip.example.com"]
        )


def test_refused_names_get_a_clear_400_from_the_api(
    cloud: tuple[LocalCloud, Api], tenants: dict[str, dict[str, Any]]
) -> None:
    _, api = cloud
    token = tenants["mallory"]["token"]
    for name, reason in [*REFUSED.items(), ("x.sites.localhost", "belong to the platform")]:
        status, answer = api.call("POST", "/sites/evil/hostnames", {"hostname": name}, token=token)
        assert status == 400, (name, status, answer)
        assert answer["error"]["code"] == "invalid_input" and reason in answer["error"]["message"], answer
    unicode = api.ok("POST", "/sites/evil/hostnames", {"hostname": "www.bücher.example"}, token=token)
    assert (unicode["hostname"], unicode["state"]) == ("www.xn--bcher-kva.example", "pending")
    api.ok("DELETE", "/sites/evil/hostnames/www.xn--bcher-kva.example", token=token)
    # An admin's list of wildcard-IP services and resolvers is checked as well.
    status, answer = api.call("PATCH", "/settings", {"dns_resolvers": ["dns.example.net"]})
    assert status == 400 and "is not an IP address" in answer["error"]["message"]
    status, answer = api.call("PATCH", "/settings", {"ip_dns_services": ["nip.io", "not a domain"]})
    assert status == 400 and "is not a domain name" in answer["error"]["message"]


def test_the_upgrade_gives_each_subscription_an_id_and_starts_old_names_pending(tmp_path: Path) -> None:
    """Names claimed before verification existed were never proven: after the upgrade they are pending."""
    db = Database.sqlite(tmp_path / "old.db")
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["engine"] = db.engine
    command.upgrade(cfg, "0005")
    with db.engine.begin() as c:
        c.execute(text("insert into tenants (name) values ('t')"))
        c.execute(text("insert into plans (name, max_sites, storage_mb) values ('p', 1, 1)"))
        c.execute(
            text(
                "insert into subscriptions (tenant_id, plan_id, state) values (1, 1, 'active'), (1, 1, 'active')"
            )
        )
        c.execute(
            text(
                "insert into sites (uid, name, subscription_id, state, app_settings) values ('u', 's', 1, 'running', '{}')"
            )
        )
        c.execute(text("insert into custom_hostnames (site_id, hostname) values (1, '127.0.0.1')"))
    command.upgrade(cfg, "head")
    with db.engine.begin() as c:
        ids = [row[0] for row in c.execute(text("select verification_id from subscriptions"))]
        assert len(ids) == 2 and len(set(ids)) == 2 and all(len(i) == 64 for i in ids)
        assert c.execute(text("select hostname, state from custom_hostnames")).all() == [
            ("127.0.0.1", "pending")
        ]
    # Down and up again keeps every site and name (no table rebuild cascades on SQLite).
    command.downgrade(cfg, "0005")
    command.upgrade(cfg, "head")
    with db.engine.begin() as c:
        assert c.execute(text("select name from sites")).all() == [("s",)]
        assert c.execute(text("select hostname from custom_hostnames")).all() == [("127.0.0.1",)]
    db.dispose()
