"""The platform's wildcard ``*.<domain>`` from pebble by ACME DNS-01, through RFC 2136 updates signed
with a TSIG key, on a cloud from `sitecloud up`.

The test's DNS server takes the signed updates (refusing unsigned ones and bad keys as BIND does) and
answers pebble's TXT lookups: pebble checks the records the controller put there. The front end's
restart with nothing to ask is checked on a front end of its own.
"""

from __future__ import annotations

import base64
import datetime as dt
import ftplib
import io
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.query
import dns.rcode
import dns.update
import pytest
from cryptography import x509

from roles.controller._certificates import wildcard_due_at
from roles.controller._dnsupdate import DnsUpdateFailure, DnsUpdater, TxtRecord
from roles.frontend.config import FrontendConfig
from shared.acme import BACKOFF_FIRST
from shared.dns01 import Dns01Settings, WildcardRecord, WildcardState, check_update_server, check_zone
from shared.errors import InvalidInput
from shared.pki import CertificateAuthority
from tests.cloud import LocalCloud
from tests.support import CloudPKI, RoleProcess, TinyDns, wait_until
from tests.test_acme import Pebble, needs_pebble
from tests.test_frontend import DOMAIN, _frontend_config
from tests.test_hostnames import Api

pytestmark = pytest.mark.timeout(180)

KEY_NAME = "sitecloud-acme."
SECRET = base64.b64encode(os.urandom(32)).decode()
CHALLENGE = "_acme-challenge.sites.localhost"


def _settings(port: int, secret: str = SECRET, key: str = KEY_NAME) -> Dns01Settings:
    return Dns01Settings(
        on=True, server=f"127.0.0.1:{port}", zone="sites.localhost", key_name=key, secret=secret
    )


@pytest.fixture(scope="module")
def tiny_dns() -> Iterator[TinyDns]:
    server = TinyDns(tsig=(KEY_NAME, "hmac-sha256", SECRET))
    try:
        yield server
    finally:
        server.close()


# -- the update method against the test's DNS server -------------------------------------------------


def test_signed_updates_add_and_delete_only_their_values_and_bad_keys_are_refused(tiny_dns: TinyDns) -> None:
    tiny_dns.set(f"other.{CHALLENGE}", "TXT", "kept")
    tiny_dns.set(CHALLENGE, "TXT", "someone-elses")
    ours = [TxtRecord(CHALLENGE, "a" * 43), TxtRecord(CHALLENGE, "b" * 43)]
    updater = DnsUpdater(_settings(tiny_dns.port))
    assert not updater.visible(ours)
    updater.add(ours)
    assert updater.visible(ours)
    assert sorted(tiny_dns.records[(CHALLENGE, "TXT")]) == sorted(["someone-elses", "a" * 43, "b" * 43])
    updater.remove(ours)
    assert tiny_dns.records[(CHALLENGE, "TXT")] == ["someone-elses"]
    del tiny_dns.records[(CHALLENGE, "TXT")], tiny_dns.records[(f"other.{CHALLENGE}", "TXT")]

    wrong = base64.b64encode(os.urandom(32)).decode()
    with pytest.raises(DnsUpdateFailure, match=r"BADSIG.*secret or algorithm"):
        DnsUpdater(_settings(tiny_dns.port, secret=wrong)).add(ours)
    with pytest.raises(
        DnsUpdateFailure, match=r"does not know the TSIG key .nobody. with algorithm hmac-sha256 \(BADKEY\)"
    ):
        DnsUpdater(_settings(tiny_dns.port, key="nobody")).add(ours)
    unsigned = dns.update.UpdateMessage("sites.localhost")
    unsigned.add(CHALLENGE, 60, "TXT", '"x"')
    answer = dns.query.udp(unsigned, "127.0.0.1", port=tiny_dns.port, timeout=5)
    assert answer.rcode() == dns.rcode.REFUSED
    assert (CHALLENGE, "TXT") not in tiny_dns.records


def test_the_wiring_is_checked() -> None:
    assert check_update_server("ns1.example.net") == "ns1.example.net:53"
    assert check_update_server("[2001:db8::53]:5353") == "[2001:db8::53]:5353"
    assert check_zone("Example.NET.", "sites.example.net") == "example.net"
    for bad in ("ns1.example.net:0", "ns1..x", "a b:53", "[::1]x"):
        with pytest.raises(InvalidInput):
            check_update_server(bad)
    with pytest.raises(InvalidInput, match=r"does not hold _acme-challenge\.sites\.example\.net"):
        check_zone("example.org", "sites.example.net")


def test_the_wildcard_falls_due_when_new_renewed_or_rewired_after_a_failure() -> None:
    now = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    wired = _settings(53)
    later = now + dt.timedelta(days=60)
    valid = WildcardRecord("sites.localhost", WildcardState.VALID, due_at=later, tag=wired.tag)
    failed = WildcardRecord("sites.localhost", WildcardState.FAILED, due_at=later, failures=1, tag=wired.tag)
    assert wildcard_due_at(valid, Dns01Settings(), "sites.localhost", now) is None  # off
    assert wildcard_due_at(None, wired, "sites.localhost", now) == now
    assert wildcard_due_at(valid, wired, "other.example", now) == now  # the domain changed
    assert wildcard_due_at(valid, wired, "sites.localhost", now) == later
    assert wildcard_due_at(failed, wired, "sites.localhost", now) == later  # backing off
    rewired = _settings(53, secret=base64.b64encode(b"another secret!!").decode())
    assert wildcard_due_at(failed, rewired, "sites.localhost", now) == now
    # What the controller stores reads back the same, and never shows the key.
    assert WildcardRecord.parse(failed.to_json()) == failed
    view = valid.view(wired, True, "sites.localhost")
    assert view["state"] == "valid" and "key_pem" not in view
    assert valid.view(wired, False, "sites.localhost")["state"] == "off"


# -- a cloud with pebble ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory, tiny_dns: TinyDns) -> Iterator[tuple[LocalCloud, Api]]:
    local = LocalCloud(tmp_path_factory.mktemp("wildcard-cloud") / "home")
    api = Api(local.start(), local.ca_file)
    try:
        api.ok("PATCH", "/settings", {"dns_resolvers": [f"127.0.0.1:{tiny_dns.port}"]})
        api.ok("POST", "/plans", {"name": "web", "max_sites": 1, "storage_mb": 5})
        yield local, api
    finally:
        local.kill_everything()


@pytest.fixture(scope="module")
def pebble(
    tmp_path_factory: pytest.TempPathFactory, cloud: tuple[LocalCloud, Api], tiny_dns: TinyDns
) -> Iterator[Pebble]:
    if not os.access("/usr/bin/pebble", os.X_OK):
        pytest.skip("Debian package pebble (the ACME test CA) is not installed")
    local, api = cloud
    server = Pebble(
        tmp_path_factory.mktemp("pebble"),
        http_port=local.ports["http_port"],
        dns_port=tiny_dns.port,
        validity=90 * 24 * 3600,
    )
    try:
        api.ok(
            "PATCH",
            "/settings",
            {"acme_directory_url": server.directory_url, "acme_ca_bundle": server.tls_ca_pem},
        )
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def site(cloud: tuple[LocalCloud, Api]) -> str:
    local, _ = cloud
    created = local.cli("tenant", "create", "delta")
    sub = local.cli("subscription", "create", "--tenant", "delta", "--plan", "web")
    made = local.cli("site", "create", "delta", "--subscription", str(sub["id"]), token=created["token"])
    ftp = ftplib.FTP()
    ftp.connect(made["ftp"]["host"], made["ftp"]["port"], timeout=10)
    ftp.login(made["ftp"]["user"], made["ftp"]["password"])
    ftp.storbinary("STOR index.html", io.BytesIO(b"<h1>delta</h1>"))
    ftp.quit()
    local.wait_for_content("delta", "/", b"<h1>delta</h1>")
    return f"delta.{local.domain}"


def _served(local: LocalCloud, host: str, cadata: str) -> tuple[x509.Certificate, int, bytes]:
    """HTTPS GET by SNI through the front end, the chain checked against ``cadata`` and the name."""
    context = ssl.create_default_context(cadata=cadata)
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
    return x509.load_der_x509_certificate(der), int(head.split()[1]), body


def _wildcard(api: Api) -> dict[str, Any]:
    return dict(api.ok("GET", "/settings")["wildcard_certificate"])


def test_turning_it_on_needs_the_whole_update_method_and_bad_input_is_a_clear_400(
    cloud: tuple[LocalCloud, Api], tmp_path: Path
) -> None:
    local, api = cloud
    assert _wildcard(api)["state"] == "off"
    status, answer = api.call("PATCH", "/settings", {"wildcard_dns01": True})
    assert status == 400 and "'dns_update_server'" in answer["error"]["message"], answer
    bad = {
        "dns_update_zone": ("example.org", "does not hold _acme-challenge.sites.localhost"),
        "dns_update_key_algorithm": ("hmac-md5", "must be one of hmac-sha256"),
        "dns_update_key_secret": ("not base64!", "not base64"),
        "dns_update_server": ("ns1.example.net:99999", "not 'host[:port]'"),
        "wildcard_certificate": ({}, "unknown field(s) for a settings change: wildcard_certificate"),
    }
    for key, (value, why) in bad.items():
        status, answer = api.call("PATCH", "/settings", {key: value})
        assert status == 400 and why in answer["error"]["message"], (key, answer)
    argv = ["settings", "set", "--dns-update-key-secret-file", str(tmp_path / "none.key")]
    cli = subprocess.run(
        [sys.executable, "-m", "roles.management.cli", "--home", str(local.home), *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert cli.returncode != 0 and f"cannot read {tmp_path / 'none.key'}" in cli.stdout + cli.stderr


@needs_pebble
def test_a_wrong_tsig_secret_fails_with_a_reason_and_backs_off_while_the_ca_wildcard_is_served(
    cloud: tuple[LocalCloud, Api], pebble: Pebble, tiny_dns: TinyDns, site: str, tmp_path: Path
) -> None:
    local, api = cloud
    wrong = tmp_path / "wrong.key"
    wrong.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    started = dt.datetime.now(dt.UTC)
    refused_before = len([u for u in tiny_dns.updates if u[0].startswith("refused")])
    answer = local.cli(
        "settings",
        "set",
        "--wildcard-dns01",
        "on",
        "--dns-update-server",
        f"127.0.0.1:{tiny_dns.port}",
        "--dns-update-zone",
        "sites.localhost",
        "--dns-update-key-name",
        KEY_NAME,
        "--dns-update-key-algorithm",
        "hmac-sha256",
        "--dns-update-key-secret-file",
        str(wrong),
    )
    assert answer["wildcard_dns01"] is True and answer["dns_update_key_secret_set"] is True
    assert "dns_update_key_secret" not in answer and SECRET not in str(answer)
    state = wait_until(
        lambda: (w := _wildcard(api))["state"] == "failed" and w,
        timeout=30,
        what="the wildcard order to fail",
    )
    assert "BADSIG" in state["reason"] and KEY_NAME.rstrip(".") in state["reason"], state
    retry = dt.datetime.fromisoformat(state["retry_at"])
    assert (
        started + BACKOFF_FIRST - dt.timedelta(seconds=5) <= retry <= dt.datetime.now(dt.UTC) + BACKOFF_FIRST
    )
    text = local.cli_text("settings", "show")
    assert "failed: the DNS server" in text and "BADSIG" in text
    # Nothing was added, and the front end still serves the cloud CA's wildcard.
    assert (CHALLENGE, "TXT") not in tiny_dns.records
    cert, status, body = _served(local, site, local.ca_file.read_text())
    assert status == 200 and body == b"<h1>delta</h1>"
    assert "Pebble" not in cert.issuer.rfc4514_string()
    # A nudge of the controller does not end the back-off.
    refused = len([u for u in tiny_dns.updates if u[0].startswith("refused")])
    assert refused > refused_before
    local.cli("settings", "set", "--acme-email", "admin@example.net")
    time.sleep(2)
    assert len([u for u in tiny_dns.updates if u[0].startswith("refused")]) == refused
    assert _wildcard(api) == state


@needs_pebble
def test_records_are_deleted_after_a_failed_validation_too(
    cloud: tuple[LocalCloud, Api], pebble: Pebble, tiny_dns: TinyDns, site: str, tmp_path: Path
) -> None:
    local, api = cloud
    # A second CA that looks the records up where they are not: its validation fails.
    blind = TinyDns()
    other = Pebble(
        tmp_path / "pebble", http_port=local.ports["http_port"], dns_port=blind.port, validity=3600
    )
    try:
        bundle = tmp_path / "other-ca.pem"
        bundle.write_text(other.tls_ca_pem)
        # The right key now, as tsig-keygen writes it; a new wiring ends the back-off at once.
        key_file = tmp_path / "acme.key"
        key_file.write_text(
            f'key "{KEY_NAME.rstrip(".")}" {{\n\talgorithm hmac-sha256;\n\tsecret "{SECRET}";\n}};\n'
        )
        updates_before = len(tiny_dns.updates)
        local.cli(
            "settings",
            "set",
            "--acme-directory",
            other.directory_url,
            "--acme-ca-bundle",
            str(bundle),
            "--dns-update-key-secret-file",
            str(key_file),
        )
        state = wait_until(
            lambda: (w := _wildcard(api))["state"] == "failed" and "validate" in w["reason"] and w,
            timeout=30,
            what="the CA's validation to fail",
        )
        assert "sites.localhost" in state["reason"], state
        # The failure is recorded as it is seen; the record's removal follows it.
        wait_until(
            lambda: tiny_dns.updates[updates_before:] == [("added", CHALLENGE), ("deleted", CHALLENGE)],
            timeout=10,
            what="the challenge record deleted after the failed validation",
        )
        assert (CHALLENGE, "TXT") not in tiny_dns.records
        assert "Pebble" not in _served(local, site, local.ca_file.read_text())[0].issuer.rfc4514_string()
    finally:
        other.stop()
        blind.close()


@needs_pebble
def test_the_wildcard_is_issued_by_dns01_served_for_every_site_name_and_its_records_are_gone(
    cloud: tuple[LocalCloud, Api], pebble: Pebble, tiny_dns: TinyDns, site: str
) -> None:
    local, api = cloud
    # Back to the CA that sees the records: a new wiring again, so it is ordered at once.
    updates_before = len(tiny_dns.updates)
    api.ok(
        "PATCH",
        "/settings",
        {"acme_directory_url": pebble.directory_url, "acme_ca_bundle": pebble.tls_ca_pem},
    )
    state = wait_until(
        lambda: (w := _wildcard(api))["state"] == "valid" and w,
        timeout=40,
        what="the wildcard from pebble",
    )
    assert state["names"] == ["*.sites.localhost", "sites.localhost"] and state["reason"] is None
    root = pebble.root_pem()
    wait_until(
        lambda: "Pebble" in _served(local, site, root)[0].issuer.rfc4514_string(),
        timeout=15,
        what="the front end to serve the wildcard",
    )
    cert, status, body = _served(local, site, root)
    assert status == 200 and body == b"<h1>delta</h1>"
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"*.sites.localhost", "sites.localhost"}
    # Any other site name is covered too (the handshake is checked by name against pebble's root).
    assert "Pebble" in _served(local, "nosuchsite.sites.localhost", root)[0].issuer.rfc4514_string()
    # The records were added, pebble checked them, and they were deleted.
    done = tiny_dns.updates[updates_before:]
    assert ("added", CHALLENGE) in done and done[-1] == ("deleted", CHALLENGE), done
    assert (CHALLENGE, "TXT") not in tiny_dns.records
    assert f"valid until {state['until'][:10]}" in local.cli_text("settings", "show")

    # Turned off, the front ends go back to the cloud CA's wildcard.
    local.cli("settings", "set", "--wildcard-dns01", "off")
    assert _wildcard(api)["state"] == "off"
    wait_until(
        lambda: "Pebble" not in _served(local, site, local.ca_file.read_text())[0].issuer.rfc4514_string(),
        timeout=15,
        what="the cloud CA's wildcard again",
    )


# -- a front end restarted with no controller keeps the wildcard it had -----------------------------


def test_a_restarted_front_end_serves_the_last_wildcard_it_was_given(tmp_path: Path) -> None:
    pki = CloudPKI(tmp_path / "pki")
    public = CertificateAuthority.load_or_create(tmp_path / "public-ca", name="public test CA")
    issued = public.issue_wildcard(DOMAIN)
    issued.write(tmp_path / "wildcard.key", tmp_path / "wildcard.pem")
    config = _frontend_config(pki, tmp_path / "frontend")
    assert isinstance(config, FrontendConfig)
    proc = RoleProcess(config, pki)

    def issuer(cadata: str) -> str:
        context = ssl.create_default_context(cadata=cadata)
        with (
            socket.create_connection(("127.0.0.1", config.https_port), timeout=10) as sock,
            context.wrap_socket(sock, server_hostname=f"blog.{DOMAIN}") as tls,
        ):
            der = tls.getpeercert(binary_form=True) or b""
        return x509.load_der_x509_certificate(der).issuer.rfc4514_string()

    with proc.running():
        assert "public test CA" not in issuer(pki.ca.cert_pem.decode())
        assert proc.health()["wildcard"] == "cloud-ca"
        proc.push_config(
            {
                "version": 1,
                "domain": DOMAIN,
                "sites": {},
                "wildcard": {
                    "cert": (tmp_path / "wildcard.pem").read_text(),
                    "key": (tmp_path / "wildcard.key").read_text(),
                },
            }
        )
        assert "public test CA" in issuer(public.cert_pem.decode())
    # No controller to push anything: the last-known-good snapshot brings the wildcard back.
    with proc.running():
        assert "public test CA" in issuer(public.cert_pem.decode())
        assert proc.health()["wildcard"] == "acme"
        proc.push_config({"version": 2, "domain": DOMAIN, "sites": {}})
        assert "public test CA" not in issuer(pki.ca.cert_pem.decode())
        assert proc.health()["wildcard"] == "cloud-ca"
