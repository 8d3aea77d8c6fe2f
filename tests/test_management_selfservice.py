"""Self-service over the REST API of a real management process: plans and quotas, subscriptions, accounts and
tokens, site state, app settings, publishing credentials and profiles, custom hostnames, roles; and a
tenant trying every other tenant's resource."""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from roles.management._usage import StorageReader
from shared.credentials import verify_password
from shared.db import PublishingCredential, Site
from shared.errors import Unavailable
from tests.support import call
from tests.test_management_api import ManagementCloud, start_management


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagementCloud]:
    yield from start_management(tmp_path_factory.mktemp("selfservice"))


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def _tenant(cloud: ManagementCloud, **plan: Any) -> tuple[str, int, str]:
    """A tenant with one subscription to a new plan: (token, subscription id, plan name)."""
    name, plan_name = _unique("t"), _unique("p")
    cloud.ok("POST", "/plans", body={"name": plan_name, "max_sites": 3, "storage_mb": 10, **plan})
    token = cloud.ok("POST", "/tenants", body={"name": name})["token"]
    sub = cloud.ok("POST", "/subscriptions", body={"tenant": name, "plan": plan_name})
    return token, int(sub["id"]), plan_name


def _cert(names: list[str], *, days: int = 30, key: Any = None) -> tuple[str, str, Any, x509.Certificate]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=2))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    return cert.public_bytes(serialization.Encoding.PEM).decode(), key_pem, key, cert


_HOSTILE_RSA = serialization.load_pem_private_key(
    (Path(__file__).parent / "data" / "hostile" / "rsa-8192.key").read_bytes(), password=None
)


def _cert_body(name: str, key: Any) -> dict[str, str]:
    cert_pem, key_pem, _, _ = _cert([name], key=key)
    return {"hostname": name, "certificate": cert_pem, "key": key_pem}


def test_plan_quotas_update_public_private_retire(cloud: ManagementCloud) -> None:
    name = _unique("gold")
    status, body = cloud.call(
        "POST",
        "/plans",
        body={"name": name, "max_sites": 1, "storage_mb": 5, "compute_mode": "reserved"},
    )
    assert status == 400 and "worker_size" in body["error"]["message"]
    plan = cloud.ok(
        "POST",
        "/plans",
        body={
            "name": name,
            "max_sites": 1,
            "storage_mb": 5,
            "bandwidth_mb_per_day": 2048,
            "cpu_minutes_per_day": 60,
            "max_custom_hostnames": 2,
            "compute_mode": "reserved",
            "worker_size": "medium",
            "always_on": True,
            "max_instances_per_site": 3,
        },
    )
    assert plan["worker_size"] == "medium" and plan["bandwidth_mb_per_day"] == 2048 and not plan["public"]
    for bad in [
        {"max_sites": -1},
        {"compute_mode": "gpu"},
        {"public": "yes"},
        {"color": "red"},
        {"name": "x"},
    ]:
        status, body = cloud.call("PATCH", f"/plans/{name}", body=bad)
        assert status == 400 and body["error"]["code"] == "invalid_input", (bad, body)

    token = cloud.ok("POST", "/tenants", body={"name": _unique("shopper")})["token"]
    # Private: tenants neither see it nor may subscribe to it.
    assert name not in [p["name"] for p in cloud.ok("GET", "/plans", token=token)["plans"]]
    assert cloud.call("GET", f"/plans/{name}", token=token)[0] == 404
    assert cloud.call("POST", "/subscriptions", token=token, body={"plan": name})[0] == 404

    before = cloud.generation()
    updated = cloud.ok(
        "PATCH", f"/plans/{name}", body={"public": True, "storage_mb": 50, "bandwidth_mb_per_day": None}
    )
    assert updated["public"] and updated["storage_mb"] == 50 and updated["bandwidth_mb_per_day"] is None
    # A plan change is desired state: the controller pushes the new quotas to every role.
    assert cloud.generation() > before
    assert name in [p["name"] for p in cloud.ok("GET", "/plans", token=token)["plans"]]
    sub = cloud.ok("POST", "/subscriptions", token=token, body={"plan": name})
    assert sub["plan"] == name and sub["quotas"]["storage_mb"] == 50
    # Existing subscriptions take a change at once.
    cloud.ok("PATCH", f"/plans/{name}", body={"max_sites": 4})
    assert cloud.ok("GET", f"/subscriptions/{sub['id']}", token=token)["quotas"]["max_sites"] == 4

    cloud.ok("PATCH", f"/plans/{name}", body={"retired": True})
    assert name not in [p["name"] for p in cloud.ok("GET", "/plans", token=token)["plans"]]
    status, body = cloud.call("POST", "/subscriptions", body={"tenant": sub["tenant"], "plan": name})
    assert status == 403 and "retired" in body["error"]["message"]
    # Retiring keeps the existing subscription working.
    site = cloud.ok("POST", "/sites", token=token, body={"name": _unique("still"), "subscription": sub["id"]})
    assert site["state"] == "running"
    assert cloud.ok("GET", f"/plans/{name}")["subscriptions"] == 1


def test_subscription_suspend_resume_delete(cloud: ManagementCloud) -> None:
    token, sub, _ = _tenant(cloud)
    site = _unique("susp")
    cloud.ok("POST", "/sites", token=token, body={"name": site, "subscription": sub})
    # Only admins suspend, resume and delete.
    for path in (f"/subscriptions/{sub}/suspend", f"/subscriptions/{sub}/resume"):
        assert cloud.call("POST", path, token=token)[0] == 403
    assert cloud.call("DELETE", f"/subscriptions/{sub}", token=token)[0] == 403

    before = cloud.generation()
    assert cloud.ok("POST", f"/subscriptions/{sub}/suspend")["state"] == "suspended"
    assert cloud.generation() > before
    status, body = cloud.call(
        "POST", "/sites", token=token, body={"name": _unique("no"), "subscription": sub}
    )
    assert status == 403 and "suspended" in body["error"]["message"]
    cloud.ok("POST", f"/sites/{site}/stop", token=token)
    status, body = cloud.call("POST", f"/sites/{site}/start", token=token)
    assert status == 403 and "suspended" in body["error"]["message"]
    assert cloud.ok("POST", f"/subscriptions/{sub}/resume")["state"] == "active"
    assert cloud.ok("POST", f"/sites/{site}/start", token=token)["state"] == "running"

    assert cloud.call("DELETE", f"/subscriptions/{sub}")[0] == 204
    assert cloud.call("GET", f"/sites/{site}", token=token)[0] == 404
    assert cloud.ok("GET", "/subscriptions", token=token) == {"subscriptions": [], "next_cursor": None}
    assert cloud.call("DELETE", f"/subscriptions/{sub}")[0] == 404
    assert cloud.call("GET", "/subscriptions/99999999")[0] == 404


def test_several_subscriptions_and_usage(cloud: ManagementCloud) -> None:
    token, first, _ = _tenant(cloud)
    tenant = cloud.ok("GET", f"/subscriptions/{first}", token=token)["tenant"]
    plan = _unique("second")
    cloud.ok(
        "POST", "/plans", body={"name": plan, "max_sites": 1, "storage_mb": 1, "max_custom_hostnames": 1}
    )
    second = cloud.ok("POST", "/subscriptions", body={"tenant": tenant, "plan": plan})["id"]
    cloud.ok("POST", "/sites", token=token, body={"name": _unique("u1"), "subscription": first})
    cloud.ok("POST", "/sites", token=token, body={"name": _unique("u2"), "subscription": first})
    subs = {s["id"]: s for s in cloud.ok("GET", "/subscriptions", token=token)["subscriptions"]}
    assert set(subs) == {first, second}
    assert subs[first]["usage"]["sites"] == 2 and subs[second]["usage"]["sites"] == 0
    # No fileserver runs here: storage is unknown, not an error.
    assert subs[first]["usage"]["storage_bytes"] is None
    assert subs[second]["usage"]["storage_bytes"] == 0


async def test_a_site_s_storage_stands_while_the_fileserver_does_not_answer() -> None:
    answers: list[Any] = [{"site": "s", "version": 3, "total_bytes": 1234, "quota_bytes": 10**6}]

    class Fileserver:
        async def get_json(self, url: str) -> Any:
            answer = answers.pop(0) if answers else Unavailable("cannot reach the fileserver")
            if isinstance(answer, Exception):
                raise answer
            return answer

    async def urls() -> list[str]:
        return ["https://fileserver"]

    reader = StorageReader(Fileserver(), urls)  # type: ignore[arg-type]
    assert await reader.sizes(["s", "never"]) == {"s": 1234, "never": None}
    reader.forget("s")  # asked again, and the fileserver is gone: the size it gave stands
    assert await reader.sizes(["s", "never"]) == {"s": 1234, "never": None}


def test_max_sites_edge(cloud: ManagementCloud) -> None:
    token, sub, plan = _tenant(cloud, max_sites=0)
    status, body = cloud.call(
        "POST", "/sites", token=token, body={"name": _unique("none"), "subscription": sub}
    )
    assert (
        status == 409 and body["error"]["code"] == "limit_reached" and "allows 0" in body["error"]["message"]
    )
    cloud.ok("PATCH", f"/plans/{plan}", body={"max_sites": 1})
    first = _unique("one")
    cloud.ok("POST", "/sites", token=token, body={"name": first, "subscription": sub})
    assert (
        cloud.call("POST", "/sites", token=token, body={"name": _unique("two"), "subscription": sub})[0]
        == 409
    )
    # Lowering a plan below what a subscription uses keeps its sites and refuses new ones.
    cloud.ok("PATCH", f"/plans/{plan}", body={"max_sites": 0})
    assert cloud.ok("GET", f"/sites/{first}", token=token)["state"] == "running"
    cloud.ok("DELETE", f"/sites/{first}", token=token)
    assert cloud.call("POST", "/sites", token=token, body={"name": first, "subscription": sub})[0] == 409


def test_site_start_stop_and_app_settings(cloud: ManagementCloud) -> None:
    token, sub, _ = _tenant(cloud)
    name = _unique("state")
    cloud.ok("POST", "/sites", token=token, body={"name": name, "subscription": sub})
    before = cloud.generation()
    assert cloud.ok("POST", f"/sites/{name}/stop", token=token)["state"] == "stopped"
    assert cloud.ok("GET", f"/sites/{name}", token=token)["state"] == "stopped"
    assert cloud.generation() == before + 1
    assert cloud.ok("POST", f"/sites/{name}/start", token=token)["state"] == "running"

    # No setting is sticky to a deployment slot until the owner says so.
    assert cloud.ok("GET", f"/sites/{name}/settings", token=token) == {
        "site": name,
        "settings": {},
        "sticky": [],
    }
    answer = cloud.ok("PATCH", f"/sites/{name}/settings", token=token, body={"B": "2", "A_1": "x=y"})
    # No controller runs here: the change is stored, and the answer says it is not live yet.
    assert answer.pop("pending").startswith("not live yet"), answer
    assert answer == {"site": name, "settings": {"A_1": "x=y", "B": "2"}, "sticky": []}
    answer = cloud.ok("PATCH", f"/sites/{name}/settings", token=token, body={"B": None, "C": ""})
    assert answer["settings"] == {"A_1": "x=y", "C": ""}
    for bad in [{"1X": "v"}, {"A-B": "v"}, {"A": 1}, {"A": "x" * 4097}]:
        status, body = cloud.call("PATCH", f"/sites/{name}/settings", token=token, body=bad)
        assert status == 400 and body["error"]["code"] == "invalid_input", bad
    too_many = {f"K{i}": "v" for i in range(101)}
    status, body = cloud.call("PATCH", f"/sites/{name}/settings", token=token, body=too_many)
    assert status == 409 and body["error"]["code"] == "limit_reached"
    assert cloud.ok("GET", f"/sites/{name}/settings")["settings"] == {"A_1": "x=y", "C": ""}


def test_publishing_password_reset_and_publish_profile(cloud: ManagementCloud) -> None:
    token, sub, _ = _tenant(cloud)
    name = _unique("pub")
    created = cloud.ok("POST", "/sites", token=token, body={"name": name, "subscription": sub})
    reset = cloud.ok("POST", f"/sites/{name}/publishing-password", token=token)
    assert reset["ftp"]["password"] == reset["deploy"]["password"] != created["ftp"]["password"]

    def stored_hash() -> str:
        with cloud.db.session() as s:
            site = s.execute(select(Site).where(Site.name == name)).scalar_one()
            return s.execute(
                select(PublishingCredential.password_hash).where(PublishingCredential.site_id == site.id)
            ).scalar_one()

    assert verify_password(reset["ftp"]["password"], stored_hash())
    assert not verify_password(created["ftp"]["password"], stored_hash())

    status, xml = call(
        f"{cloud.api}/sites/{name}/publish-profile",
        cloud.pki.client_ssl(None),
        method="POST",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert status == 200 and isinstance(xml, bytes)
    root = ET.fromstring(xml)
    assert root.tag == "publishData"
    profiles = {p.get("publishMethod"): p.attrib for p in root.findall("publishProfile")}
    assert set(profiles) == {"ZipDeploy", "FTP"}
    web_deploy, ftp = profiles["ZipDeploy"], profiles["FTP"]
    password = ftp["userPWD"]
    assert web_deploy["userPWD"] == password and web_deploy["userName"] == ftp["userName"] == name
    assert web_deploy["destinationAppUrl"] == created["url"]
    assert web_deploy["publishUrl"] == cloud.config.deploy_url.removeprefix("https://")
    assert ftp["publishUrl"] == f"ftps://{cloud.config.ftp_host}:{cloud.config.ftp_port}/"
    assert web_deploy["SQLServerDBConnectionString"] == ""
    # The profile carries a new password: the one from the reset no longer works.
    assert verify_password(password, stored_hash()) and not verify_password(
        reset["ftp"]["password"], stored_hash()
    )


def test_custom_hostnames_certificates_and_quota(cloud: ManagementCloud) -> None:
    token, sub, plan = _tenant(cloud, max_custom_hostnames=2)
    site = _unique("hosts")
    cloud.ok("POST", "/sites", token=token, body={"name": site, "subscription": sub})
    domain = f"{uuid.uuid4().hex[:8]}.example.com"
    www, shop, blog = f"www.{domain}", f"shop.{domain}", f"blog.{domain}"
    cert_pem, key_pem, _, cert = _cert([www, domain])

    free = cloud.ok("GET", f"/hostnames/{www}/availability", token=token)
    assert free == {"hostname": www, "available": True, "reason": ""}
    added = cloud.ok(
        "POST",
        f"/sites/{site}/hostnames",
        token=token,
        body={"hostname": www, "certificate": cert_pem, "key": key_pem},
    )
    assert added["hostname"] == www and added["certificate"]["names"] == [www, domain]
    assert added["certificate"]["fingerprint_sha256"] == cert.fingerprint(hashes.SHA256()).hex()
    taken = cloud.ok("GET", f"/hostnames/{www.upper()}/availability", token=token)
    assert taken["available"] is False and "already" in taken["reason"]
    platform = cloud.ok("GET", f"/hostnames/x.{cloud.config.domain}/availability", token=token)
    assert platform["available"] is False

    # A wildcard certificate in a PFX with a password.
    _, _, wild_key, wild = _cert([f"*.{domain}"])
    pfx = pkcs12.serialize_key_and_certificates(
        b"shop", wild_key, wild, None, serialization.BestAvailableEncryption(b"s3cret")
    )
    body = {"hostname": shop, "pfx": base64.b64encode(pfx).decode(), "password": "s3cret"}
    assert cloud.ok("POST", f"/sites/{site}/hostnames", token=token, body=body)["certificate"]["names"] == [
        f"*.{domain}"
    ]
    listed = cloud.ok("GET", f"/sites/{site}/hostnames", token=token)["hostnames"]
    assert [h["hostname"] for h in listed] == [shop, www]
    assert "key" not in str(listed)
    assert cloud.ok("GET", f"/sites/{site}", token=token)["hostnames"] == [shop, www]

    # The quota edge: 2 of 2 used.
    status, body = cloud.call("POST", f"/sites/{site}/hostnames", token=token, body={"hostname": blog})
    assert (
        status == 409 and body["error"]["code"] == "limit_reached" and "allows 2" in body["error"]["message"]
    )
    cloud.ok("PATCH", f"/plans/{plan}", body={"max_custom_hostnames": 3})
    other_pem, other_key_pem, _, _ = _cert([blog])
    expired = _cert([blog], days=-1)
    bad_bodies = [
        ({"hostname": blog, "certificate": cert_pem, "key": key_pem}, "does not cover"),
        ({"hostname": blog, "certificate": other_pem, "key": key_pem}, "does not match"),
        ({"hostname": blog, "certificate": expired[0], "key": expired[1]}, "expired"),
        ({"hostname": blog, "certificate": "not a cert", "key": key_pem}, "PEM"),
        ({"hostname": blog, "certificate": other_pem}, "private key is required"),
        ({"hostname": blog, "pfx": base64.b64encode(pfx).decode(), "password": "wrong"}, "PFX"),
        ({"hostname": blog, "pfx": "%%%"}, "base64"),
        # Each handshake would sign with it on the front end's one loop: 8192 bits cost 50 ms a time.
        (_cert_body(blog, _HOSTILE_RSA), "8192 bits"),
        (_cert_body(blog, ec.generate_private_key(ec.SECP256K1())), "curve secp256k1"),
        ({"hostname": f"x.{cloud.config.domain}"}, "belong to the platform"),
        ({"hostname": "bad_name.example.com"}, "not a valid host name"),
    ]
    for bad, fragment in bad_bodies:
        status, answer = cloud.call("POST", f"/sites/{site}/hostnames", token=token, body=bad)
        assert status == 400 and fragment in answer["error"]["message"], (bad.get("hostname"), answer)
    # A name another site uses is refused, whoever asks.
    other_token, other_sub, _ = _tenant(cloud, max_custom_hostnames=5)
    other_site = _unique("other")
    cloud.ok("POST", "/sites", token=other_token, body={"name": other_site, "subscription": other_sub})
    status, body = cloud.call(
        "POST", f"/sites/{other_site}/hostnames", token=other_token, body={"hostname": www}
    )
    assert status == 409 and body["error"]["code"] == "already_exists"

    # The expired-but-otherwise-fine certificate above did not count against the quota.
    cloud.ok(
        "POST",
        f"/sites/{site}/hostnames",
        token=token,
        body={"hostname": blog, "certificate": other_pem, "key": other_key_pem},
    )
    assert cloud.call("DELETE", f"/sites/{site}/hostnames/{www}", token=token)[0] == 204
    assert cloud.call("DELETE", f"/sites/{site}/hostnames/{www}", token=token)[0] == 404
    assert cloud.ok("GET", f"/hostnames/{www}/availability", token=token)["available"] is True
    sub_usage = cloud.ok("GET", f"/subscriptions/{sub}", token=token)["usage"]
    assert sub_usage["custom_hostnames"] == 2


def test_tokens_users_signup_and_signin_limits(cloud: ManagementCloud) -> None:
    token, _, _ = _tenant(cloud)
    me = cloud.ok("GET", "/me", token=token)
    assert me["admin"] is False and me["tenant"]
    made = cloud.ok("POST", "/tokens", token=token, body={"name": "laptop"})
    assert made["token"].startswith("sct_") and made["prefix"] == made["token"][:8]
    assert cloud.ok("GET", "/me", token=made["token"])["tenant"] == me["tenant"]
    listed = cloud.ok("GET", "/tokens", token=token)["tokens"]
    assert made["id"] in [t["id"] for t in listed] and "token" not in listed[0]
    # Another tenant cannot revoke it, the admin token does not see it, its owner can.
    other, _, _ = _tenant(cloud)
    assert cloud.call("DELETE", f"/tokens/{made['id']}", token=other)[0] == 404
    assert made["id"] not in [t["id"] for t in cloud.ok("GET", "/tokens")["tokens"]]
    assert cloud.call("DELETE", f"/tokens/{made['id']}", token=token)[0] == 204
    assert cloud.call("GET", "/me", token=made["token"])[0] == 401

    # Sign-up is closed until the admin opens it.
    assert cloud.ok("GET", "/settings")["signup_enabled"] is False
    assert cloud.call("GET", "/settings", token=token)[0] == 403
    assert cloud.call("PATCH", "/settings", token=token, body={"signup_enabled": True})[0] == 403
    newcomer = _unique("new")
    status, body = cloud.call(
        "POST", "/signup", token=None, body={"username": newcomer, "password": "long enough pw"}
    )
    assert status == 403 and "closed" in body["error"]["message"]
    assert cloud.ok("PATCH", "/settings", body={"signup_enabled": True})["signup_enabled"] is True
    try:
        status, body = cloud.call(
            "POST", "/signup", token=None, body={"username": newcomer, "password": "short"}
        )
        assert status == 400 and "password" in body["error"]["message"]
        user = cloud.ok(
            "POST", "/signup", token=None, body={"username": newcomer, "password": "long enough pw"}
        )
        assert user["tenant"] == newcomer and user["admin"] is False
        assert (
            cloud.call(
                "POST", "/signup", token=None, body={"username": newcomer, "password": "long enough pw"}
            )[0]
            == 409
        )
    finally:
        cloud.ok("PATCH", "/settings", body={"signup_enabled": False})
    issued = cloud.ok(
        "POST",
        "/auth/token",
        token=None,
        body={"username": newcomer, "password": "long enough pw", "name": "cli"},
    )
    assert cloud.ok("GET", "/me", token=issued["token"]) == {
        "admin": False,
        "tenant": newcomer,
        "username": newcomer,
    }

    # An admin account: generated password, shown once; it signs in to an admin token.
    admin_name = _unique("root")
    admin = cloud.ok("POST", "/users", body={"username": admin_name})
    assert admin["admin"] is True and len(admin["password"]) >= 16
    assert cloud.call("POST", "/users", token=token, body={"username": _unique("x")})[0] == 403
    assert cloud.call("POST", "/users", body={"username": admin_name})[0] == 409
    admin_token = cloud.ok(
        "POST",
        "/auth/token",
        token=None,
        body={"username": admin_name, "password": admin["password"], "name": "ops"},
    )["token"]
    assert cloud.ok("GET", "/me", token=admin_token)["admin"] is True
    assert admin_name in [u["username"] for u in cloud.ok("GET", "/users", token=admin_token)["users"]]

    # Failed sign-ins: five per user name, then refused even with the right password.
    for _ in range(5):
        status, body = cloud.call(
            "POST", "/auth/token", token=None, body={"username": newcomer, "password": "wrong password!"}
        )
        assert status == 401 and body["error"]["message"] == "wrong user name or password"
    status, body = cloud.call(
        "POST", "/auth/token", token=None, body={"username": newcomer, "password": "long enough pw"}
    )
    assert status == 429 and body["error"]["code"] == "rate_limited" and "try again" in body["error"]["hint"]
    # An unknown user answers exactly like a wrong password.
    status, body = cloud.call(
        "POST", "/auth/token", token=None, body={"username": _unique("ghost"), "password": "x" * 12}
    )
    assert status == 401 and body["error"]["message"] == "wrong user name or password"


def test_a_tenant_is_refused_every_other_tenants_resource(cloud: ManagementCloud) -> None:
    alice, alice_sub, alice_plan = _tenant(cloud, max_custom_hostnames=1)
    bob, bob_sub, _ = _tenant(cloud)
    site = _unique("alices")
    cloud.ok("POST", "/sites", token=alice, body={"name": site, "subscription": alice_sub})
    cloud.ok("PATCH", f"/sites/{site}/settings", token=alice, body={"SECRET": "alice"})
    host = f"www.{uuid.uuid4().hex[:8]}.example.org"
    cloud.ok("POST", f"/sites/{site}/hostnames", token=alice, body={"hostname": host})
    token_id = cloud.ok("POST", "/tokens", token=alice, body={"name": "alices"})["id"]
    before = cloud.generation()

    attempts: list[tuple[str, str, Any, int]] = [
        ("GET", f"/sites/{site}", None, 404),
        ("DELETE", f"/sites/{site}", None, 404),
        ("POST", f"/sites/{site}/deploy", None, 404),
        ("POST", f"/sites/{site}/start", None, 404),
        ("POST", f"/sites/{site}/stop", None, 404),
        ("POST", f"/sites/{site}/publishing-password", None, 404),
        ("POST", f"/sites/{site}/publish-profile", None, 404),
        ("GET", f"/sites/{site}/settings", None, 404),
        ("PATCH", f"/sites/{site}/settings", {"SECRET": "bob"}, 404),
        ("GET", f"/sites/{site}/hostnames", None, 404),
        ("POST", f"/sites/{site}/hostnames", {"hostname": "evil.example.org"}, 404),
        ("DELETE", f"/sites/{site}/hostnames/{host}", None, 404),
        ("GET", f"/subscriptions/{alice_sub}", None, 404),
        ("POST", "/sites", {"name": _unique("in-alices"), "subscription": alice_sub}, 404),
        ("DELETE", f"/tokens/{token_id}", None, 404),
        ("POST", f"/subscriptions/{alice_sub}/suspend", None, 403),
        ("POST", f"/subscriptions/{alice_sub}/resume", None, 403),
        ("DELETE", f"/subscriptions/{alice_sub}", None, 403),
        ("PATCH", f"/plans/{alice_plan}", {"max_sites": 99}, 403),
        ("GET", f"/plans/{alice_plan}", None, 404),
        ("GET", "/users", None, 403),
        ("POST", "/users", {"username": _unique("bobs"), "tenant": "x"}, 403),
        ("GET", "/tenants", None, 403),
        ("GET", "/settings", None, 403),
        ("GET", "/roles", None, 403),
    ]
    for method, path, body, expected in attempts:
        status, answer = cloud.call(method, path, token=bob, body=body)
        assert status == expected, (method, path, status, answer)
        assert site not in str(answer.get("hint", "")) if isinstance(answer, dict) else True
    # Nothing changed for Alice.
    assert cloud.generation() == before
    assert cloud.ok("GET", f"/sites/{site}/settings", token=alice)["settings"] == {"SECRET": "alice"}
    assert cloud.ok("GET", f"/sites/{site}", token=alice)["hostnames"] == [host]
    assert token_id in [t["id"] for t in cloud.ok("GET", "/tokens", token=alice)["tokens"]]
    assert [s["id"] for s in cloud.ok("GET", "/subscriptions", token=bob)["subscriptions"]] == [bob_sub]
    assert site not in [s["name"] for s in cloud.ok("GET", "/sites", token=bob)["sites"]]


def test_site_scale_within_the_plan(cloud: ManagementCloud) -> None:
    token, sub, _ = _tenant(cloud, max_instances_per_site=3)
    name = _unique("scale")
    assert cloud.ok("POST", "/sites", token=token, body={"name": name, "subscription": sub})["instances"] == 1
    before = cloud.generation()
    assert cloud.ok("POST", f"/sites/{name}/scale", token=token, body={"instances": 3})["instances"] == 3
    assert cloud.generation() == before + 1
    status, body = cloud.call("POST", f"/sites/{name}/scale", token=token, body={"instances": 4})
    assert status == 409 and body["error"]["code"] == "limit_reached"
    for bad in ({"instances": 0}, {"instances": "2"}, {}):
        status, body = cloud.call("POST", f"/sites/{name}/scale", token=token, body=bad)
        assert status == 400, bad
    assert cloud.ok("GET", f"/sites/{name}", token=token)["instances"] == 3
    # Another tenant cannot scale it, nor learn it exists.
    other, _, _ = _tenant(cloud)
    assert cloud.call("POST", f"/sites/{name}/scale", token=other, body={"instances": 1})[0] == 404
