"""The self-service `sitecloud` commands (plans, subscriptions, accounts), as real processes against a real management process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from tests.test_cli import ok_json, run
from tests.test_management_api import ManagementCloud, start_management
from tests.test_management_selfservice import _cert


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagementCloud]:
    yield from start_management(tmp_path_factory.mktemp("cli6"))


@pytest.fixture(scope="module")
def home(cloud: ManagementCloud) -> Path:
    return cloud.write_endpoints(cloud.home / "home")


def test_plans_subscriptions_and_accounts(home: Path) -> None:
    plan = ok_json(
        home,
        "plan",
        "create",
        "pro",
        "--max-sites",
        "2",
        "--storage-mb",
        "100",
        "--compute-mode",
        "reserved",
        "--worker-size",
        "small",
        "--bandwidth-mb-per-day",
        "500",
        "--always-on",
        "--public",
    )
    assert (plan["compute_mode"], plan["worker_size"], plan["bandwidth_mb_per_day"], plan["public"]) == (
        "reserved",
        "small",
        500,
        True,
    )
    plan = ok_json(
        home, "plan", "update", "pro", "--max-sites", "5", "--bandwidth-mb-per-day", "unlimited", "--private"
    )
    assert (plan["max_sites"], plan["bandwidth_mb_per_day"], plan["public"]) == (5, None, False)
    result = run(home, "plan", "update", "pro")
    assert result.returncode == 2 and "nothing to change" in result.stderr
    result = run(home, "plan", "show", "pro")
    assert result.returncode == 0 and "reserved (small)" in result.stdout and "unlimited" in result.stdout
    # Made as a person would: it says what a reserved plan needs to run where it promises.
    result = run(home, "plan", "create", "dedicated", "--max-sites", "1", "--storage-mb", "10",
                 "--compute-mode", "reserved", "--worker-size", "large")  # fmt: skip
    assert result.returncode == 0 and "role add worker HOST --size large --reserved-for" in result.stdout

    tenant = ok_json(home, "tenant", "create", "cli6")
    sub = ok_json(home, "subscription", "create", "--tenant", "cli6", "--plan", "pro")
    assert ok_json(home, "subscription", "suspend", str(sub["id"]))["state"] == "suspended"
    assert ok_json(home, "subscription", "resume", str(sub["id"]))["state"] == "active"
    shown = ok_json(home, "--token", tenant["token"], "subscription", "show", str(sub["id"]))
    assert shown["quotas"]["max_sites"] == 5 and shown["usage"]["sites"] == 0
    result = run(home, "subscription", "list")
    assert result.stdout.splitlines()[0].split() == ["ID", "TENANT", "PLAN", "STATE", "SITES", "STORAGE"]

    # Tokens of one's own.
    env = {"SITECLOUD_TOKEN": tenant["token"]}
    token = ok_json(home, "token", "create", "laptop", env=env)
    assert token["token"].startswith("sct_")
    assert token["id"] in [t["id"] for t in ok_json(home, "token", "list", env=env)["tokens"]]
    assert ok_json(home, "token", "revoke", str(token["id"]), "--yes", env=env) == {
        "token": token["id"],
        "deleted": True,
    }
    result = run(home, "--token", token["token"], "site", "list")
    assert result.returncode == 4 and "the token is not valid" in result.stderr

    # An admin account and `sitecloud login`; users of a tenant.
    result = run(home, "admin", "create-user", "ops")
    assert result.returncode == 0 and "created admin ops" in result.stdout and "password: " in result.stdout
    password = next(
        line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("password: ")
    )
    login = run(home, "login", "ops", "--password-stdin", "--json", input_text=password + "\n")
    assert login.returncode == 0, login.stderr
    ops_token = json.loads(login.stdout)["token"]
    assert ok_json(home, "--token", ops_token, "settings", "show")["signup_enabled"] is False
    assert (
        ok_json(home, "--token", ops_token, "settings", "set", "--signup", "open")["signup_enabled"] is True
    )
    ok_json(home, "settings", "set", "--signup", "closed")
    user = ok_json(home, "user", "create", "cli6-alice", "--tenant", "cli6")
    assert user["tenant"] == "cli6" and user["password"]
    names = [u["username"] for u in ok_json(home, "user", "list")["users"]]
    assert {"ops", "cli6-alice"} <= set(names)
    bad = run(home, "login", "ops", "--password-stdin", input_text="wrong password\n")
    assert bad.returncode == 4 and bad.stderr.startswith("error: wrong user name or password")


def test_site_commands(home: Path, tmp_path: Path) -> None:
    ok_json(
        home,
        "plan",
        "create",
        "sites6",
        "--max-sites",
        "2",
        "--storage-mb",
        "10",
        "--max-custom-hostnames",
        "2",
    )
    ok_json(home, "tenant", "create", "sites6")
    sub = ok_json(home, "subscription", "create", "--tenant", "sites6", "--plan", "sites6")
    ok_json(home, "site", "create", "cli-site", "--subscription", str(sub["id"]))

    assert ok_json(home, "site", "stop", "cli-site")["state"] == "stopped"
    # No controller runs here: the start is stored, and a NOTE says it is not live yet.
    started = run(home, "site", "start", "cli-site").stdout.splitlines()
    assert started[0] == "started cli-site" and started[1].startswith("NOTE: not live yet"), started
    assert ok_json(home, "site", "set", "cli-site", "A=1", "B=x=y")["settings"] == {"A": "1", "B": "x=y"}
    assert ok_json(home, "site", "unset", "cli-site", "A")["settings"] == {"B": "x=y"}
    assert run(home, "site", "settings", "cli-site").stdout == "B=x=y\n"
    result = run(home, "site", "set", "cli-site", "novalue")
    assert result.returncode == 2 and "is not KEY=VALUE" in result.stderr

    reset = ok_json(home, "site", "reset-password", "cli-site", "--yes")
    assert len(reset["ftp"]["password"]) >= 16
    target = tmp_path / "profile.xml"
    answer = ok_json(home, "site", "publish-profile", "cli-site", "-o", str(target), "--yes")
    assert answer == {"site": "cli-site", "file": str(target), "bytes": target.stat().st_size}
    assert target.stat().st_mode & 0o077 == 0  # it holds a password
    root = ET.fromstring(target.read_bytes())
    assert [p.get("publishMethod") for p in root] == ["ZipDeploy", "FTP"]
    assert root[0].get("userPWD") != reset["ftp"]["password"]

    cert_pem, key_pem, key, cert = _cert(["www.cli.example", "cli.example"])
    (tmp_path / "cert.pem").write_text(cert_pem)
    (tmp_path / "key.pem").write_text(key_pem)
    added = ok_json(
        home,
        "hostname",
        "add",
        "cli-site",
        "www.cli.example",
        "--cert",
        str(tmp_path / "cert.pem"),
        "--key",
        str(tmp_path / "key.pem"),
    )
    assert added["certificate"]["names"] == ["www.cli.example", "cli.example"]
    pfx = pkcs12.serialize_key_and_certificates(
        b"x", key, cert, None, serialization.BestAvailableEncryption(b"pw")
    )
    (tmp_path / "site.pfx").write_bytes(pfx)
    result = run(
        home,
        "hostname",
        "add",
        "cli-site",
        "cli.example",
        "--pfx",
        str(tmp_path / "site.pfx"),
        "--password-stdin",
        input_text="pw\n",
    )
    assert result.returncode == 0, result.stderr
    # Pending until DNS proves it: the CLI shows the records to create.
    assert "cli.example is pending for cli-site with a certificate until" in result.stdout
    assert (
        "TXT   asuid.cli.example" in result.stdout
        and "CNAME cli.example  cli-site.sites.localhost" in result.stdout
    )
    result = run(home, "hostname", "add", "cli-site", "shop.cli.example", "--json")
    assert json.loads(result.stdout)["error"]["code"] == "limit_reached"
    assert [h["hostname"] for h in ok_json(home, "hostname", "list", "cli-site")["hostnames"]] == [
        "cli.example",
        "www.cli.example",
    ]
    assert ok_json(home, "hostname", "check", "www.cli.example")["available"] is False
    assert (
        run(home, "hostname", "remove", "cli-site", "www.cli.example", "--yes").stdout
        == "removed www.cli.example from cli-site\n"
    )
    assert run(home, "hostname", "check", "www.cli.example").stdout == "www.cli.example is free\n"
