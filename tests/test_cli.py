"""The `sitecloud` CLI, run as a real process against a real management process."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import types
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from roles.management import cli
from roles.management._cli_client import zipped
from shared.home_lock import hold_home
from shared.net import free_port
from tests.test_management_api import ManagementCloud, start_management

_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ManagementCloud]:
    yield from start_management(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def home(cloud: ManagementCloud) -> Path:
    return cloud.write_endpoints(cloud.home / "home")


def run(
    home: Path, *args: str, env: dict[str, str] | None = None, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SITECLOUD_")}
    return subprocess.run(
        [sys.executable, "-m", "roles.management.cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        cwd=_ROOT,
        env={**environ, **(env or {})},
        input=input_text,
        timeout=30,
    )


def ok_json(home: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    result = run(home, *args, "--json", env=env)
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stderr == ""
    return json.loads(result.stdout)


def test_admin_and_tenant_flow_as_json(home: Path, cloud: ManagementCloud) -> None:
    plan = ok_json(home, "plan", "create", "starter", "--max-sites", "3", "--storage-mb", "200")
    assert (plan["name"], plan["max_sites"], plan["storage_mb"], plan["public"]) == ("starter", 3, 200, False)
    assert plan in ok_json(home, "plan", "list")["plans"]
    tenant = ok_json(home, "tenant", "create", "acme")
    assert tenant["name"] == "acme" and tenant["token"].startswith("sct_")
    assert tenant["id"] in [t["id"] for t in ok_json(home, "tenant", "list")["tenants"]]
    sub = ok_json(home, "subscription", "create", "--tenant", "acme", "--plan", "starter")
    assert isinstance(sub["id"], int) and sub["tenant"] == "acme" and sub["plan"] == "starter"

    # The tenant works with its own token, by flag or by environment.
    as_tenant = ["--token", tenant["token"]]
    site = ok_json(home, *as_tenant, "site", "create", "blog", "--subscription", str(sub["id"]))
    assert (
        site["name"] == "blog" and site["url"] == f"https://blog.sites.localhost:{cloud.config.https_port}/"
    )
    assert site["ftp"]["user"] == "blog" and site["ftp"]["password"]
    assert site["ftp"]["port"] == cloud.config.ftp_port and site["ftp"]["host"] == cloud.config.ftp_host
    assert site["deploy"] == {
        "url": f"{cloud.config.deploy_url}/api/deploy/blog",
        "git": f"{cloud.config.deploy_url}/blog.git",
        "user": "blog",
        "password": site["ftp"]["password"],
    }
    env = {"SITECLOUD_TOKEN": tenant["token"]}
    assert [s["name"] for s in ok_json(home, "site", "list", env=env)["sites"]] == ["blog"]
    shown = ok_json(home, "site", "show", "blog", env=env)
    assert "password" not in shown["ftp"] and shown["tenant"] == "acme"
    assert [s["id"] for s in ok_json(home, "subscription", "list", env=env)["subscriptions"]] == [sub["id"]]

    roles = ok_json(home, "role", "list")["roles"]
    assert roles[0]["role"] == "worker" and roles[0]["state"] == "Ready"

    # --json works globally too, before the command word.
    result = run(home, "--json", "site", "delete", "blog", "--yes", *as_tenant)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"site": "blog", "deleted": True}
    assert ok_json(home, "site", "list", env=env) == {"sites": []}


def test_human_output(home: Path) -> None:
    result = run(home, "plan", "create", "human-plan", "--max-sites", "12", "--storage-mb", "1024")
    assert result.returncode == 0 and "created plan human-plan" in result.stdout
    result = run(home, "plan", "list")
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["NAME", "MAX", "SITES", "STORAGE", "MB"]
    row = next(line for line in lines if line.startswith("human-plan"))
    # Columns line up under their headers.
    assert row.index("12") == lines[0].index("MAX SITES")
    assert row.index("1024") == lines[0].index("STORAGE MB")

    result = run(home, "tenant", "create", "human")
    assert result.returncode == 0
    token = next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("token:"))
    assert "shown only once" in result.stdout
    sub = ok_json(home, "subscription", "create", "--tenant", "human", "--plan", "human-plan")

    # A tenant with one subscription need not name it.
    result = run(home, "--token", token, "site", "create", "human-site")
    assert result.returncode == 0, result.stderr
    fields = dict(line.strip().split("  ", 1) for line in result.stdout.splitlines() if line.startswith("  "))
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert fields["ftp user"] == "human-site" and len(fields["ftp password"]) >= 16
    assert fields["deploy password"] == fields["ftp password"]
    assert "shown only this once" in result.stdout

    # The admin sees every tenant's subscriptions: which one is asked for, with the ones there are.
    result = run(home, "--json", "site", "create", "which-one")
    error = json.loads(result.stdout)["error"]
    assert result.returncode == 2 and error["message"].startswith("name the subscription the site goes in")
    assert f"{sub['id']} (human, plan human-plan)" in error["hint"], error

    result = run(home, "site", "show", "human-site")
    assert (
        result.returncode == 0 and "password" not in result.stdout and "https://human-site." in result.stdout
    )
    result = run(home, "site", "list")
    assert result.stdout.splitlines()[0].split() == ["NAME", "TENANT", "SUBSCRIPTION", "STATE", "URL"]
    result = run(home, "role", "list")
    assert result.stdout.splitlines()[0].split()[:3] == ["ROLE", "HOST", "STATE"]
    assert "worker" in result.stdout and "s ago" in result.stdout
    result = run(home, "site", "delete", "human-site", "--yes")
    assert (result.returncode, result.stdout) == (0, "deleted site human-site\n")


def test_expected_errors_are_messages_not_tracebacks(home: Path, tmp_path: Path) -> None:
    result = run(tmp_path / "nowhere", "site", "list")
    assert result.returncode == 6
    assert result.stderr == (
        f"error: no cloud at {tmp_path / 'nowhere'}\nhint: run `sitecloud up` first, or pass --home\n"
    )
    result = run(tmp_path / "nowhere", "site", "list", "--json")
    assert result.returncode == 6 and json.loads(result.stdout)["error"]["code"] == "unavailable"

    result = run(home, "site", "create", "Shop", "--subscription", "1")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: site name 'Shop' has upper-case letters\nhint: use 'shop'\n"
    result = run(home, "site", "create", "Shop", "--subscription", "1", "--json")
    assert result.returncode == 2 and result.stderr == ""
    assert json.loads(result.stdout) == {
        "error": {
            "code": "invalid_input",
            "message": "site name 'Shop' has upper-case letters",
            "hint": "use 'shop'",
        }
    }

    result = run(home, "--token", "sct_wrong", "site", "list")
    assert result.returncode == 4 and result.stderr.startswith("error: the token is not valid\n")
    result = run(home, "site", "show", "no-such-site")
    assert result.returncode == 3 and "error: no site 'no-such-site'" in result.stderr

    # Usage errors are argparse's: exit 2.
    result = run(home, "plan", "create", "x", "--max-sites", "1")
    assert result.returncode == 2 and "--storage-mb" in result.stderr
    assert run(home).returncode == 2

    unreachable = tmp_path / "down"
    api = f"https://127.0.0.1:{free_port()}"
    json_home = json.loads((home / "endpoints.json").read_text())
    unreachable.mkdir()
    (unreachable / "endpoints.json").write_text(json.dumps({**json_home, "api": api}))
    result = run(unreachable, "site", "list")
    assert result.returncode == 6
    assert result.stderr == (
        f"error: cannot reach the management API at {api}\n"
        f"hint: is `sitecloud up` running? Start it with `sitecloud up --home {unreachable}`; if it runs, "
        "its management role is down: restarting `sitecloud up` starts it again\n"
    )
    # While `sitecloud up` holds the home, the hint says so: management itself is down.
    with hold_home(unreachable):
        result = run(unreachable, "site", "list", "--json")
    assert result.returncode == 6
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "unavailable" and error["message"] == f"cannot reach the management API at {api}"
    assert error["hint"].startswith(f"`sitecloud up` runs (pid {os.getpid()}) but its management role")
    assert str(unreachable / "logs" / "management.log") in error["hint"]
    for r in (result, run(home, "site", "show", "Bad_name")):
        assert "Traceback" not in r.stderr


def test_a_token_with_a_line_break_is_cleaned_or_refused_never_a_traceback(home: Path) -> None:
    tenant = ok_json(home, "tenant", "create", "pasted")
    token = tenant["token"]
    # Pasted from a file or a CI secret: the line break around it goes.
    for given in (f"{token}\n", f"{token}\r\n", f"  {token}\t"):
        assert ok_json(home, "site", "list", env={"SITECLOUD_TOKEN": given}) == {"sites": []}
        assert ok_json(home, "--token", given, "site", "list") == {"sites": []}

    # Inside the token it cannot be cleaned: a clear refusal, as JSON under --json.
    for given, what, by_env in (
        ("sct_a\nb", "a line break", True),
        ("sct_a b", "a space", False),
        ("sct_a\x7fb", "a control character", False),
        ("sct_ä", "a character that is not ASCII", True),
    ):
        env = {"SITECLOUD_TOKEN": given} if by_env else None
        argv = ("site", "list") if by_env else ("--token", given, "site", "list")
        where = "SITECLOUD_TOKEN" if by_env else "--token"
        result = run(home, *argv, env=env)
        assert result.returncode == 4 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.startswith(f"error: the API token given by {where} contains {what}"), (
            result.stderr
        )
        result = run(home, *argv, "--json", env=env)
        assert result.returncode == 4 and result.stderr == "", result.stderr
        assert json.loads(result.stdout)["error"]["code"] == "unauthorized"

    # Only whitespace: refused, not quietly replaced by the admin token.
    result = run(home, "--token", " \n", "tenant", "list")
    assert result.returncode == 4 and "error: the API token given by --token is empty" in result.stderr


def test_a_broken_api_address_in_endpoints_is_an_error_not_a_traceback(home: Path, tmp_path: Path) -> None:
    good = json.loads((home / "endpoints.json").read_text())
    for api in ("https://127.0.0.1:80x90", "https://127.0.0.1 x:8090", "https://127.0.0.1:8090/a\x7f"):
        (tmp_path / "endpoints.json").write_text(json.dumps({**good, "api": api}))
        result = run(tmp_path, "site", "list", "--json")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert (
            json.loads(result.stdout)["error"]["message"] == f"the API address {api!r} is not an https:// URL"
        )


def test_a_usage_date_with_a_space_reaches_the_server_as_typed(home: Path) -> None:
    result = run(home, "site", "usage", "no-such-site", "--from", "2026-01-01 x", "--json")
    assert "Traceback" not in result.stderr and result.stderr == "", result.stderr
    assert json.loads(result.stdout)["error"]["code"] != "unavailable", result.stdout


def _site_for(home: Path, name: str) -> dict[str, str]:
    """A tenant with a site of its own; returns the env that acts as that tenant."""
    ok_json(home, "plan", "create", f"{name}-plan", "--max-sites", "3", "--storage-mb", "10")
    tenant = ok_json(home, "tenant", "create", f"{name}-tenant")
    sub = ok_json(home, "subscription", "create", "--tenant", f"{name}-tenant", "--plan", f"{name}-plan")
    env = {"SITECLOUD_TOKEN": tenant["token"], "SITECLOUD_SUB": str(sub["id"])}
    ok_json(home, "site", "create", name, "--subscription", str(sub["id"]), env=env)
    return env


def test_a_tenants_control_characters_reach_no_terminal_raw(home: Path) -> None:
    env = _site_for(home, "escapes")
    value = "a\x1b]0;TITLE\x07b\x1b[31mred\x9b1m\x7f\u00e9"
    ok_json(home, "site", "set", "escapes", f"EVIL={value}", env=env)
    shown = run(home, "site", "settings", "escapes", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "EVIL=a\\x1b]0;TITLE\\x07b\\x1b[31mred\\x9b1m\\x7f\u00e9" in shown.stdout
    assert not any(c in shown.stdout for c in "\x1b\x07\x9b\x7f")
    # As JSON the value is exact, and still nothing raw reaches the terminal.
    answer = run(home, "site", "settings", "escapes", "--json", env=env)
    assert json.loads(answer.stdout)["settings"]["EVIL"] == value
    assert not any(c in answer.stdout for c in "\x1b\x07\x9b\x7f")
    # A line break in a value does not show as a second setting.
    ok_json(home, "site", "set", "escapes", "EVIL=x\nDB_PASSWORD=spoofed\tz", env=env)
    shown = run(home, "site", "settings", "escapes", env=env)
    assert "EVIL=x\\nDB_PASSWORD=spoofed\\tz" in shown.stdout
    assert not any(line.startswith("DB_PASSWORD") for line in shown.stdout.splitlines())


def _on_a_terminal(home: Path, args: list[str], env: dict[str, str], answer: str) -> tuple[int, str]:
    """Run the CLI with a pseudo-terminal as stdin and stderr, answer its question; (exit code, what it wrote)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SITECLOUD_")}
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "roles.management.cli", "--home", str(home), *args],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=slave,
        cwd=_ROOT,
        env={**environ, **env},
    )
    os.close(slave)
    seen = b""
    try:
        while b"confirm: " not in seen and b"[y/N] " not in seen:
            ready, _, _ = select.select([master], [], [], 20)
            assert ready, f"no question asked: {seen!r}"
            seen += os.read(master, 4096)
        os.write(master, answer.encode() + b"\n")
        code = proc.wait(timeout=30)
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the terminal is gone with the process (EIO)
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(master)
        if proc.stdout is not None:
            proc.stdout.close()
    return code, seen.decode(errors="replace")


def test_destructive_commands_ask_first(home: Path) -> None:
    env = _site_for(home, "ux-site")
    # No terminal to ask on (as in scripts and these tests): refused, naming --yes, and nothing changes.
    result = run(home, "site", "delete", "ux-site", env=env)
    assert result.returncode == 4, result.stderr
    assert result.stderr.startswith(
        "error: not confirmed: this would delete site ux-site and all its content"
    )
    assert "--yes" in result.stderr
    result = run(home, "site", "delete", "ux-site", "--json", env=env)
    assert result.returncode == 4 and json.loads(result.stdout)["error"]["code"] == "confirmation_required"
    assert ok_json(home, "site", "show", "ux-site", env=env)["name"] == "ux-site"
    for args in (
        ["site", "reset-password", "ux-site"],
        ["site", "publish-profile", "ux-site", "-o", "-"],
        ["site", "hostname", "remove", "ux-site", "www.ux.example"],
        ["subscription", "delete", env["SITECLOUD_SUB"]],
        ["token", "revoke", "1"],
        ["host", "delete", "h1.example"],
        ["role", "remove", "worker", "h1.example"],
    ):
        result = run(home, *args)
        assert result.returncode == 4 and "--yes" in result.stderr, (args, result.stderr)

    # On a terminal: the site's name must be typed; a wrong answer changes nothing.
    code, said = _on_a_terminal(home, ["site", "delete", "ux-site"], env, "ux-sit")
    assert code == 4 and "Type ux-site to confirm" in said and "nothing was changed" in said, said
    assert ok_json(home, "site", "show", "ux-site", env=env)["name"] == "ux-site"
    code, said = _on_a_terminal(home, ["site", "reset-password", "ux-site"], env, "n")
    assert code == 4 and "[y/N]" in said, said
    code, said = _on_a_terminal(home, ["site", "delete", "ux-site"], env, "ux-site")
    assert code == 0, said
    result = run(home, "site", "show", "ux-site", env=env)
    assert result.returncode == 3


def test_version_usage_errors_and_suggestions(home: Path) -> None:
    result = run(home, "--version")
    assert result.returncode == 0 and result.stdout.startswith("sitecloud ")
    version = ok_json(home, "--version")["version"]
    assert version and result.stdout == f"sitecloud {version}\n"

    # Mistyped commands: a suggestion, exit 2, and a JSON error object under --json.
    result = run(home, "sites", "list")
    assert result.returncode == 2 and "did you mean 'site'?" in result.stderr, result.stderr
    assert result.stderr.startswith("usage: sitecloud")
    result = run(home, "site", "lst", "--json")
    assert result.returncode == 2 and result.stderr == ""
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "usage" and "did you mean 'list'?" in error["message"]
    assert error["hint"] == "see `sitecloud site --help`"
    result = run(home, "--json", "plan", "create", "x", "--max-sites", "1")
    assert result.returncode == 2
    assert "--storage-mb" in json.loads(result.stdout)["error"]["message"]
    # An option the subcommand does not have: its own usage line and help, not the top's.
    result = run(home, "site", "logs", "x", "--tail", "3")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("usage: sitecloud site logs "), result.stderr
    assert "unrecognized arguments: --tail 3" in result.stderr
    error = json.loads(run(home, "--json", "site", "logs", "x", "--tail", "3").stdout)["error"]
    assert error["hint"] == "see `sitecloud site logs --help`"
    # No command at all: the same error object, not the help text.
    result = run(home, "--json")
    assert result.returncode == 2 and result.stderr == ""
    assert json.loads(result.stdout)["error"]["message"] == "a command is required"

    # A mistyped site name: the closest one of the sites there are.
    env = _site_for(home, "suggest-me")
    result = run(home, "site", "show", "sugest-me", env=env)
    assert result.returncode == 3
    assert "hint: did you mean 'suggest-me'? (see `sitecloud site list`)" in result.stderr, result.stderr
    result = run(home, "site", "hostname", "list", "nothing-like-it", env=env)
    assert result.returncode == 3 and "hint: see `sitecloud site list`" in result.stderr

    # The suggested spelling of a name is one the server accepts.
    result = run(home, "site", "create", "Blog_1", "--subscription", env["SITECLOUD_SUB"], env=env)
    assert result.returncode == 2 and "hint: use 'blog-1'" in result.stderr, result.stderr
    ok_json(home, "site", "create", "blog-1", "--subscription", env["SITECLOUD_SUB"], env=env)

    # Exit codes follow the API's answer: a second plan of the same name is a conflict.
    result = run(home, "plan", "create", "suggest-me-plan", "--max-sites", "1", "--storage-mb", "1")
    assert result.returncode == 5, result.stderr


def test_a_reader_that_goes_away_gets_no_traceback(home: Path) -> None:
    # `sitecloud plan list | head -1`: before, a BrokenPipeError traceback on stderr.
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SITECLOUD_")}
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "roles.management.cli", "--home", str(home), "plan", "list"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            cwd=_ROOT,
            env=environ,
            timeout=30,
        )
    finally:
        os.close(write)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_deploy_zips_a_directory_and_relays_errors(home: Path, tmp_path: Path) -> None:
    sub = ok_json(home, "plan", "create", "deploy-plan", "--max-sites", "1", "--storage-mb", "10")
    ok_json(home, "tenant", "create", "deploy-tenant")
    sub = ok_json(home, "subscription", "create", "--tenant", "deploy-tenant", "--plan", "deploy-plan")
    ok_json(home, "site", "create", "deploy-me", "--subscription", str(sub["id"]))

    site_dir = tmp_path / "www"
    (site_dir / "css").mkdir(parents=True)
    (site_dir / "index.html").write_text("<h1>hi</h1>")
    (site_dir / "css" / "a.css").write_text("h1{}")
    # The publisher is not running in this test: the upload goes through and its error comes back.
    result = run(home, "deploy", "deploy-me", str(site_dir))
    assert result.returncode == 6, result.stderr
    # Not where it listens: that is in the management log.
    assert result.stderr.startswith("error: the publisher is unavailable now (connection refused)"), (
        result.stderr
    )
    zip_path = tmp_path / "site.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("index.html", "<h1>zip</h1>")
    result = run(home, "deploy", "deploy-me", str(zip_path), "--json")
    assert result.returncode == 6 and json.loads(result.stdout)["error"]["code"] == "unavailable"

    # Refused before the body is read: the answer still gets through, even for a big upload.
    big = tmp_path / "big.zip"
    with zipfile.ZipFile(big, "w") as zf:
        zf.writestr("blob.bin", os.urandom(8 * 1024 * 1024))
    result = run(home, "--token", "sct_wrong", "deploy", "deploy-me", str(big))
    assert result.returncode == 4 and "error: the token is not valid" in result.stderr, result.stderr

    result = run(home, "deploy", "not-a-site", str(zip_path))
    assert result.returncode == 3 and result.stderr.startswith("error: no site 'not-a-site'")
    result = run(home, "deploy", "deploy-me", str(tmp_path / "missing"))
    assert result.returncode == 3 and "does not exist" in result.stderr
    result = run(home, "deploy", "deploy-me", str(site_dir / "index.html"))
    assert result.returncode == 2 and "is not a zip file" in result.stderr


def test_zipped_directory_holds_the_tree(tmp_path: Path) -> None:
    from roles.management._cli_client import zipped

    (tmp_path / "src" / "img").mkdir(parents=True)
    (tmp_path / "src" / "empty").mkdir()
    (tmp_path / "src" / "index.html").write_text("x")
    (tmp_path / "src" / "img" / "a.png").write_bytes(b"\x89PNG")
    (tmp_path / "src" / "link").symlink_to("/etc/passwd")
    with zipped(tmp_path / "src") as z:
        names = sorted(zipfile.ZipFile(z).namelist())
        assert names == ["empty/", "img/a.png", "index.html"]
    assert not z.exists()


def test_a_python_project_deploys_without_its_virtual_environment_and_bytecode(tmp_path: Path) -> None:
    # Flask's installation guide makes the environment inside the project: `python3 -m venv .venv`.
    # It went up whole (tens of MB, built for this machine; a plan's quota refused bigger ones).
    import venv

    project = tmp_path / "myproject"
    venv.create(project / ".venv", with_pip=False)
    (project / "app.py").write_text("from flask import Flask\napp = Flask(__name__)\n")
    (project / "requirements.txt").write_text("flask\n")
    (project / "__pycache__").mkdir()
    (project / "__pycache__" / "app.cpython-311.pyc").write_bytes(b"\x00")
    (project / "venv-notes").mkdir()  # a folder of the site's own, whatever its name
    (project / "venv-notes" / "readme.txt").write_text("mine")
    with zipped(project) as path, zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == ["app.py", "requirements.txt", "venv-notes/readme.txt"]


def test_up_is_handed_to_the_controller(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def run_up(argv: list[str]) -> int:
        seen.append(argv)
        return 7

    module = types.ModuleType("roles.controller.up")
    module.run_up = run_up  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "roles.controller.up", module)
    monkeypatch.setenv("SITECLOUD_HOME", "/elsewhere")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert cli.main(["--home", str(tmp_path), "up", "--domain", "example.test", "--json"]) == 7
    assert seen == [["--domain", "example.test", "--json"]]
    assert os.environ["SITECLOUD_HOME"] == str(tmp_path)


def test_up_warns_when_the_advertised_address_is_not_this_machines() -> None:
    from roles.controller.up import _is_this_machine

    assert _is_this_machine("127.0.0.1") and _is_this_machine("localhost")
    # TEST-NET-2 (RFC 5737) is on no interface here: a typo, or an address behind a NAT.
    assert not _is_this_machine("198.51.100.77")
    # A name that does not resolve here says nothing either way: no warning.
    assert _is_this_machine("nosuchhost.invalid")


def test_a_second_up_on_a_home_keeps_its_ports_domain_and_db_unless_told_otherwise(tmp_path: Path) -> None:
    # Before, `up` without the flags moved every site of a home made with --https-port 47443 to 8443.
    from roles.controller.config import CloudConfig
    from roles.controller.home import CloudHome
    from roles.controller.up import _parser, _remembered_choices

    home = tmp_path / "cloud"
    first = ["--home", str(home), "--domain", "example.test", "--https-port", "47443", "--ftp-port", "47021"]
    chosen = _remembered_choices(home, _parser().parse_args(first))
    assert (chosen["domain"], chosen["https_port"], chosen["http_port"]) == ("example.test", 47443, 8080)
    CloudHome(
        CloudConfig(
            home=home, domain=chosen["domain"], https_port=47443, ftp_port=47021, db_url="sqlite:///x.db"
        )
    ).prepare()
    again = _remembered_choices(home, _parser().parse_args(["--home", str(home)]))
    assert (again["domain"], again["https_port"], again["ftp_port"], again["db"]) == (
        "example.test",
        47443,
        47021,
        "sqlite:///x.db",
    )
    moved = _remembered_choices(home, _parser().parse_args(["--home", str(home), "--https-port", "9443"]))
    assert (moved["https_port"], moved["ftp_port"]) == (9443, 47021)


def test_a_plain_up_on_a_control_plane_home_keeps_its_local_roles_and_usage_interval(tmp_path: Path) -> None:
    # Before, `up` without --local-roles on a home made with `--local-roles management` (the data plane
    # on other hosts) started all five roles here: a second, empty fileserver the cloud then switched
    # to whenever the real one stopped. --usage-interval and --processes were dropped the same way.
    from roles.controller.config import CloudConfig
    from roles.controller.home import CloudHome
    from roles.controller.up import _parser, _remembered_choices

    home = tmp_path / "cloud"
    first = ["--home", str(home), "--local-roles", "management", "--usage-interval", "2", "--processes", "2"]
    chosen = _remembered_choices(home, _parser().parse_args(first))
    CloudHome(
        CloudConfig(
            home=home,
            local_roles=tuple(chosen["local_roles"].split(",")),
            usage_interval=chosen["usage_interval"],
            processes=chosen["processes"],
        )
    ).prepare()
    again = _remembered_choices(home, _parser().parse_args(["--home", str(home)]))
    assert (again["local_roles"], again["usage_interval"], again["processes"]) == ("management", 2.0, 2)
    told = _remembered_choices(
        home, _parser().parse_args(["--home", str(home), "--local-roles", "management,worker"])
    )
    assert told["local_roles"] == "management,worker"
    fresh = _remembered_choices(tmp_path / "other", _parser().parse_args(["--home", str(tmp_path / "other")]))
    assert fresh["local_roles"] == "fileserver,worker,publisher,frontend,management"
    assert (fresh["usage_interval"], fresh["processes"]) == (30.0, 1)


def test_an_up_without_advertise_after_one_with_it_serves_only_this_machine_again(tmp_path: Path) -> None:
    # Before, --advertise's widened bind (0.0.0.0) was remembered as if asked for: every later `up`
    # kept listening on all addresses.
    from roles.controller.config import CloudConfig
    from roles.controller.home import CloudHome
    from roles.controller.up import _parser, _remembered_choices

    home = tmp_path / "cloud"
    chosen = _remembered_choices(home, _parser().parse_args(["--home", str(home), "--advertise", "10.0.0.5"]))
    config = CloudConfig(home=home, bind=chosen["bind"], advertise=chosen["advertise"])
    assert config.bind == "0.0.0.0"
    CloudHome(config).prepare()
    again = _remembered_choices(home, _parser().parse_args(["--home", str(home)]))
    assert (again["advertise"], again["bind"]) == ("10.0.0.5", "127.0.0.1")
    assert CloudConfig(home=home, bind=again["bind"], advertise=again["advertise"]).bind == "0.0.0.0"
    alone = _remembered_choices(home, _parser().parse_args(["--home", str(home), "--advertise", ""]))
    assert CloudConfig(home=home, bind=alone["bind"], advertise=alone["advertise"]).bind == "127.0.0.1"


def test_the_admins_role_settings_reach_the_controller_and_the_roles_configs(tmp_path: Path) -> None:
    from roles.controller.config import CloudConfig
    from roles.controller.home import CloudHome
    from roles.controller.up import _controller_settings
    from shared.errors import InvalidInput

    home = tmp_path / "cloud"
    home.mkdir()
    settings = {
        "controller": {"revive_after": 4, "role_stop_timeout": 3},
        "worker": {"app_home_removal_delay": 1.5},
        "management": {"role_stale_after": 2},
        "publisher": {"build_unreached_grace": 0.5},
    }
    (home / "cloud.json").write_text(json.dumps(settings))
    config = CloudConfig(home=home, **_controller_settings(home))
    assert (config.revive_after, config.role_stop_timeout) == (4, 3)
    CloudHome(config).prepare()
    for kind in ("worker", "management", "publisher"):
        written = json.loads((home / "roles" / kind / "role.json").read_text())
        assert settings[kind].items() <= written.items(), (kind, written)
    # Kept for the next `up`, beside what `up` itself writes there.
    assert json.loads((home / "cloud.json").read_text()).items() >= settings.items()
    # The product's own when nothing is set.
    plain = CloudConfig(home=tmp_path / "plain")
    assert (plain.revive_after, plain.role_stop_timeout) == (15.0, 10.0)

    (home / "cloud.json").write_text(json.dumps({"controller": {"revive_afer": 4}}))
    with pytest.raises(InvalidInput, match="unknown controller settings"):
        _controller_settings(home)
    with pytest.raises(InvalidInput, match="revive_after must be a number of seconds > 0"):
        CloudConfig(home=home, revive_after=0)
    (home / "cloud.json").write_text(json.dumps({"worker": {"app_home_removal_delay": "soon"}}))
    with pytest.raises(InvalidInput, match="bad worker settings: app_home_removal_delay must be"):
        CloudHome(CloudConfig(home=home)).prepare()


def test_up_processes_reach_the_front_end_and_worker_and_bad_counts_are_refused(tmp_path: Path) -> None:
    from roles.controller.config import CloudConfig
    from roles.controller.home import CloudHome

    home = CloudHome(CloudConfig(home=tmp_path / "cloud", processes=2))
    home.prepare()
    frontend = json.loads((home.role_home("frontend") / "role.json").read_text())
    worker = json.loads((home.role_home("worker") / "role.json").read_text())
    # One lane per front-end process: lanes spread over the worker's processes, which share a listener.
    assert (frontend["processes"], frontend["lanes_per_worker"], worker["processes"]) == (2, 2, 2)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "roles.management.cli",
            "--home",
            str(tmp_path / "x"),
            "up",
            "--processes",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2 and "give between 1 and 64 processes" in result.stderr
    assert not (tmp_path / "x").exists()


def test_the_shell_completes_commands(tmp_path: Path) -> None:
    """argcomplete's protocol, as bash's `register-python-argcomplete sitecloud` drives it."""
    answers = tmp_path / "completions"
    for line, expected in (("sitecloud si", {"site"}), ("sitecloud site de", {"delete"})):
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SITECLOUD_")},
            "_ARGCOMPLETE": "1",
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
            "_ARGCOMPLETE_STDOUT_FILENAME": str(answers),
        }
        result = subprocess.run(
            [sys.executable, "-m", "roles.management.cli"],
            capture_output=True,
            text=True,
            cwd=_ROOT,
            env=env,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        assert {w.strip() for w in answers.read_text().split("\v")} == expected


def test_plan_and_tenant_delete_ask_first_and_a_plan_in_use_is_refused(home: Path) -> None:
    env = _site_for(home, "going")
    # Without a terminal: refused until --yes, and nothing changes.
    for args in (["tenant", "delete", "going-tenant"], ["plan", "delete", "going-plan"]):
        result = run(home, *args)
        assert result.returncode == 4 and "--yes" in result.stderr, (args, result.stderr)
    code, said = _on_a_terminal(home, ["tenant", "delete", "going-tenant"], {}, "going")
    assert code == 4 and "Type going-tenant to confirm" in said and "nothing was changed" in said, said

    # A plan in use: a conflict (exit 5), saying what to do.
    result = run(home, "plan", "delete", "going-plan", "--yes")
    assert result.returncode == 5, result.stderr
    assert (
        "is used by 1 subscription" in result.stderr
        and "(s)" not in result.stderr
        and "retire the plan" in result.stderr
    )

    shown = run(home, "tenant", "show", "going-tenant")
    assert shown.returncode == 0 and "going" in shown.stdout and "SUBSCRIPTION" in shown.stdout, shown.stdout
    assert ok_json(home, "tenant", "show", "going-tenant")["sites"][0]["name"] == "going"

    assert ok_json(home, "tenant", "delete", "going-tenant", "--yes") == {
        "tenant": "going-tenant",
        "deleted": True,
    }
    assert run(home, "site", "show", "going").returncode == 3
    assert run(home, "site", "list", env=env).returncode == 4  # its token went with it
    result = run(home, "plan", "delete", "going-plan", "--yes")
    assert result.returncode == 0 and result.stdout == "deleted plan going-plan\n"
    assert run(home, "plan", "show", "going-plan").returncode == 3


def test_user_reset_link(home: Path) -> None:
    ok_json(home, "tenant", "create", "resetters")
    ok_json(home, "user", "create", "resetter", "--tenant", "resetters")
    link = ok_json(home, "user", "reset-link", "resetter")
    assert link["url"].startswith("https://127.0.0.1:") and "/reset-password/" in link["url"]
    text = run(home, "user", "reset-link", "resetter")
    assert text.returncode == 0 and "works once" in text.stdout and "/reset-password/" in text.stdout
    assert run(home, "user", "reset-link", "nobody-at-all").returncode == 3


def test_a_directory_deploys_without_its_version_control_folders(tmp_path: Path) -> None:
    site_dir = tmp_path / "checkout"
    (site_dir / ".git" / "objects").mkdir(parents=True)
    (site_dir / ".git" / "config").write_text("[core]")
    (site_dir / "docs" / ".svn").mkdir(parents=True)
    (site_dir / "docs" / ".svn" / "entries").write_text("x")
    (site_dir / "index.html").write_text("<h1>hi</h1>")
    (site_dir / "docs" / "a.html").write_text("a")
    (site_dir / ".well-known").mkdir()
    (site_dir / ".well-known" / "security.txt").write_text("Contact: x")
    with zipped(site_dir) as path, zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == [".well-known/security.txt", "docs/a.html", "index.html"]
