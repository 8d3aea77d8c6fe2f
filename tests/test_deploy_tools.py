"""Deploying as the tools do, against a whole cloud: curl to Kudu's ``/api/zipdeploy`` (sync, and async
with its status URL polled), each method of a downloaded publish profile used as a tool reads it
(FTPS with ftplib, zip deploy with curl), and ``git push`` over HTTPS with real git; the content is
then served through the front end."""

from __future__ import annotations

import ftplib
import io
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from xml.etree import ElementTree as ET

import pytest

from roles.publisher._git import _pkt, _rejected, _split_report
from tests.cloud import LocalCloud
from tests.support import ResumingFTP_TLS, wait_until

pytestmark = pytest.mark.timeout(300)


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package '{name}', listed in .ci/run)")
    return path


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def cloud(traversable_home: Path) -> Iterator[LocalCloud]:
    cloud = LocalCloud(traversable_home)
    cloud.start()
    try:
        cloud.cli("plan", "create", "deploys", "--max-sites", "30", "--storage-mb", "5")
        cloud.cli("tenant", "create", "contoso")
        yield cloud
    finally:
        cloud.kill_everything()


@pytest.fixture(scope="module")
def subscription(cloud: LocalCloud) -> int:
    return int(cloud.cli("subscription", "create", "--tenant", "contoso", "--plan", "deploys")["id"])


def _site(cloud: LocalCloud, subscription: int, name: str) -> dict[str, Any]:
    return dict(cloud.cli("site", "create", name, "--subscription", str(subscription)))


def _deploy_base(site: dict[str, Any]) -> str:
    """``https://host:port`` of the publisher's deploy port, as the site's own answer gives it."""
    url = urlsplit(site["deploy"]["url"])
    return f"https://{url.netloc}"


def _curl(cloud: LocalCloud, *args: str) -> tuple[int, dict[str, str], bytes]:
    """curl with the cloud's CA; the status, headers (lower-case names) and body."""
    curl = _tool("curl")
    proc = subprocess.run(
        [curl, "-sS", "--cacert", str(cloud.ca_file), "-D", "-", *args],
        capture_output=True,
        timeout=60,
        check=True,
    )
    head, _, body = proc.stdout.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def test_zipdeploy_with_curl_answers_when_the_site_is_live(cloud: LocalCloud, subscription: int) -> None:
    site = _site(cloud, subscription, "kudusync")
    (Path(cloud.home).parent / "sync.zip").write_bytes(_zip({"index.html": b"zipdeployed, sync"}))
    user, password = site["ftp"]["user"], site["ftp"]["password"]
    status, _, body = _curl(
        cloud,
        "-u",
        f"{user}:{password}",
        "--data-binary",
        f"@{cloud.home.parent / 'sync.zip'}",
        "-H",
        "Content-Type: application/zip",
        f"{_deploy_base(site)}/api/zipdeploy",
    )
    assert status == 200, body
    record = json.loads(body)
    assert record["status"] == 4 and record["complete"] is True and record["site_name"] == "kudusync"
    assert record["deployer"] == "ZipDeploy" and record["end_time"]
    cloud.wait_for_content("kudusync", "/", b"zipdeployed, sync")

    # A wrong password is refused with a challenge, and a zip that is not one with what is wrong.
    status, headers, body = _curl(
        cloud, "-u", f"{user}:wrong", "--data-binary", "x", f"{_deploy_base(site)}/api/zipdeploy"
    )
    assert status == 401 and headers["www-authenticate"].startswith("Basic")
    status, _, body = _curl(
        cloud, "-u", f"{user}:{password}", "--data-binary", "x", f"{_deploy_base(site)}/api/zipdeploy"
    )
    assert status == 400 and b"not a zip file" in body
    assert cloud.get("kudusync", "/")[2] == b"zipdeployed, sync"


def test_publishing_to_a_stopped_site_says_it_serves_once_started_at_every_door(
    cloud: LocalCloud, subscription: int, tmp_path: Path
) -> None:
    site = _site(cloud, subscription, "stoppedpub")
    cloud.cli("site", "stop", "stoppedpub")
    kept = "site stoppedpub is stopped: it builds and serves this version once it is started"
    # The README's web deploy: its JSON says so (before: only site, version, files and bytes).
    archive = tmp_path / "site.zip"
    archive.write_bytes(_zip({"index.html": b"deployed while stopped"}))
    auth = f"{site['ftp']['user']}:{site['ftp']['password']}"
    status, _, body = _curl(
        cloud, "-u", auth, "--data-binary", f"@{archive}", f"{_deploy_base(site)}/api/deploy/stoppedpub"
    )
    answer = json.loads(body)
    assert status == 200 and answer["message"].startswith(kept), answer
    # git: the push stands, and says the site is stopped, not that it is live.
    repo = Checkout(cloud, tmp_path / "stoppedpub", _remote(site))
    repo.commit({"index.html": b"pushed while stopped"}, "while stopped")
    pushed = repo.push()
    assert pushed.returncode == 0, pushed.stderr
    assert f"remote: sitecloud: {kept}" in pushed.stderr, pushed.stderr
    assert "live at" not in pushed.stderr, pushed.stderr
    # A running site's answer is as it always was.
    cloud.cli("site", "start", "stoppedpub")
    status, _, body = _curl(
        cloud, "-u", auth, "--data-binary", f"@{archive}", f"{_deploy_base(site)}/api/deploy/stoppedpub"
    )
    assert status == 200 and set(json.loads(body)) == {"site", "version", "files", "bytes"}, body


def test_async_zipdeploy_gives_a_status_url_to_poll(cloud: LocalCloud, subscription: int) -> None:
    site = _site(cloud, subscription, "kuduasync")
    archive = cloud.home.parent / "async.zip"
    archive.write_bytes(_zip({"index.html": b"zipdeployed, async", "css/a.css": b"body{}"}))
    auth = f"{site['ftp']['user']}:{site['ftp']['password']}"
    status, headers, body = _curl(
        cloud,
        "-u",
        auth,
        "--data-binary",
        f"@{archive}",
        f"{_deploy_base(site)}/api/zipdeploy?isAsync=true",
    )
    assert status == 202, body
    location = headers["location"]
    assert location.startswith(f"{_deploy_base(site)}/api/deployments/")

    def polled() -> dict[str, Any] | None:
        code, _, answer = _curl(cloud, "-u", auth, location)
        assert code == 200, answer
        record: dict[str, Any] = json.loads(answer)
        return record if record["complete"] else None

    record = wait_until(polled, timeout=30, what="the async deployment to complete")
    assert record["status"] == 4 and record["message"].startswith("version ")
    cloud.wait_for_content("kuduasync", "/css/a.css", b"body{}")
    code, _, latest = _curl(cloud, "-u", auth, f"{_deploy_base(site)}/api/deployments/latest")
    assert code == 200 and json.loads(latest)["id"] == record["id"]
    code, _, listed = _curl(cloud, "-u", auth, f"{_deploy_base(site)}/api/deployments")
    assert code == 200 and [r["id"] for r in json.loads(listed)][:1] == [record["id"]], listed

    # A broken zip fails the deployment, which says why; the site keeps serving what it had.
    archive.write_bytes(b"PK not really")
    status, headers, _ = _curl(
        cloud, "-u", auth, "--data-binary", f"@{archive}", f"{_deploy_base(site)}/api/zipdeploy?isAsync=true"
    )
    assert status == 202
    failed = wait_until(polled_at(cloud, auth, headers["location"]), timeout=30, what="the failure")
    assert failed["status"] == 3 and "not a zip file" in failed["message"]
    assert cloud.get("kuduasync", "/")[2] == b"zipdeployed, async"
    # Another site's deployment is not this user's to read.
    other = _site(cloud, subscription, "kuduother")
    own_site_only = location.split("?", 1)[0]  # the user names the site, as on Kudu
    code, _, _ = _curl(cloud, "-u", f"{other['ftp']['user']}:{other['ftp']['password']}", own_site_only)
    assert code == 404

    # A zip of a folder (as a file manager makes it) is deployed as it is, and says how to do better.
    archive.write_bytes(_zip({"flaskapp/app.py": b"app = None", "flaskapp/index.html": b"in a folder"}))
    status, headers, _ = _curl(
        cloud, "-u", auth, "--data-binary", f"@{archive}", f"{_deploy_base(site)}/api/zipdeploy?isAsync=true"
    )
    assert status == 202
    nested = wait_until(polled_at(cloud, auth, headers["location"]), timeout=30, what="the nested zip")
    assert nested["status"] == 4, nested
    assert "every file of the zip is under one folder, flaskapp/" in nested["message"], nested
    assert "cd flaskapp && zip -r ../site.zip ." in nested["message"], nested


def test_onedeploy_publishes_a_zip_as_az_webapp_deploy_calls_it(cloud: LocalCloud, subscription: int) -> None:
    # `az webapp deploy --type zip`, Publish-AzWebApp and the Azure SDKs post to Kudu's OneDeploy.
    site = _site(cloud, subscription, "onedeploy")
    archive = cloud.home.parent / "onedeploy.zip"
    archive.write_bytes(_zip({"index.html": b"one deploy, sync"}))
    auth = f"{site['ftp']['user']}:{site['ftp']['password']}"
    base = f"{_deploy_base(site)}/api/publish"
    status, _, body = _curl(
        cloud, "-u", auth, "--data-binary", f"@{archive}", f"{base}?type=zip&clean=true&restart=true"
    )
    assert status == 200, body
    record = json.loads(body)
    assert record["status"] == 4 and record["complete"] is True and record["deployer"] == "OneDeploy"
    cloud.wait_for_content("onedeploy", "/", b"one deploy, sync")

    archive.write_bytes(_zip({"index.html": b"one deploy, async"}))
    status, headers, body = _curl(
        cloud, "-u", auth, "--data-binary", f"@{archive}", f"{base}?type=zip&async=true"
    )
    assert status == 202, body
    done = wait_until(polled_at(cloud, auth, headers["location"]), timeout=30, what="the OneDeploy")
    assert done["status"] == 4, done
    cloud.wait_for_content("onedeploy", "/", b"one deploy, async")

    # What it cannot do is refused with why, and the site keeps what it had.
    for query, said in (
        ("type=war", b"only type=zip"),
        ("type=zip&path=/home/site/wwwroot/sub", b"whole content"),
        ("type=zip&clean=false", b"clean=false"),
        ("type=zip&async=maybe", b"async must be true or false"),
    ):
        status, _, body = _curl(cloud, "-u", auth, "--data-binary", f"@{archive}", f"{base}?{query}")
        assert status == 400 and said in body, (query, body)
    assert cloud.get("onedeploy", "/")[2] == b"one deploy, async"


def test_zips_as_finder_and_windows_powershell_make_them_deploy(cloud: LocalCloud, subscription: int) -> None:
    site = _site(cloud, subscription, "desktopzips")
    auth = f"{site['ftp']['user']}:{site['ftp']['password']}"
    archive = cloud.home.parent / "desktop.zip"
    # macOS Finder's "Compress" of a folder: its AppleDouble copies under __MACOSX/ are no content, and
    # without them the zip is one folder, which the deployment's message says how to avoid.
    archive.write_bytes(
        _zip(
            {
                "mysite/index.html": b"from a Mac",
                "mysite/.DS_Store": b"\0\0\0\1Bud1",
                "__MACOSX/mysite/._index.html": b"\0\5\26\7",
            }
        )
    )
    status, _, body = _curl(
        cloud, "-u", auth, "--data-binary", f"@{archive}", f"{_deploy_base(site)}/api/zipdeploy"
    )
    assert status == 200, body
    assert "every file of the zip is under one folder, mysite/" in json.loads(body)["message"], body
    cloud.wait_for_content("desktopzips", "/mysite/", b"from a Mac")
    assert cloud.get("desktopzips", "/__MACOSX/mysite/._index.html")[0] == 404
    assert cloud.get("desktopzips", "/mysite/.DS_Store")[0] == 404
    # Windows PowerShell's Compress-Archive parts folders with backslashes.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in (("index.html", b"from Windows"), ("css\\site.css", b"body{}")):
            info = zipfile.ZipInfo(name)
            info.create_system = 0  # MS-DOS/Windows, as .NET's ZipArchive writes it
            zf.writestr(info, data)
    archive.write_bytes(buf.getvalue())
    status, _, body = _curl(
        cloud, "-u", auth, "--data-binary", f"@{archive}", f"{_deploy_base(site)}/api/zipdeploy"
    )
    assert status == 200, body
    cloud.wait_for_content("desktopzips", "/css/site.css", b"body{}")


def polled_at(cloud: LocalCloud, auth: str, url: str) -> Any:
    def poll() -> dict[str, Any] | None:
        _, _, answer = _curl(cloud, "-u", auth, url)
        record: dict[str, Any] = json.loads(answer)
        return record if record["complete"] else None

    return poll


def test_every_method_of_the_publish_profile_publishes(cloud: LocalCloud, subscription: int) -> None:
    _site(cloud, subscription, "profiled")
    target = cloud.home.parent / "profiled.PublishSettings"
    cloud.cli("site", "publish-profile", "profiled", "-o", str(target), "--yes")
    root = ET.fromstring(target.read_bytes())
    profiles = {p.get("publishMethod"): p.attrib for p in root.findall("publishProfile")}
    assert set(profiles) == {"ZipDeploy", "FTP"}  # no MSDeploy: nothing here speaks it

    # ZipDeploy as the Azure tools use it: https://<publishUrl>/api/zipdeploy with the profile's user.
    zipdeploy = profiles["ZipDeploy"]
    archive = cloud.home.parent / "profiled.zip"
    archive.write_bytes(_zip({"index.html": b"from the profile's zip deploy"}))
    status, _, body = _curl(
        cloud,
        "-u",
        f"{zipdeploy['userName']}:{zipdeploy['userPWD']}",
        "--data-binary",
        f"@{archive}",
        f"https://{zipdeploy['publishUrl']}/api/zipdeploy",
    )
    assert status == 200, body
    cloud.wait_for_content("profiled", "/", b"from the profile's zip deploy")
    assert zipdeploy["destinationAppUrl"].startswith("https://profiled.sites.localhost")

    # FTP: explicit TLS on the ftps:// URL's host and port, as FileZilla and Visual Studio read it.
    ftp_profile = profiles["FTP"]
    url = urlsplit(ftp_profile["publishUrl"])
    assert url.scheme == "ftps" and url.hostname and url.port
    # As FileZilla does, the data connections resume the control connection's TLS session; Python's
    # own ftplib.FTP_TLS, whose data connections do not, publishes as it stands too.
    for client in (ResumingFTP_TLS, ftplib.FTP_TLS):
        ftps = client(context=ssl.create_default_context(cafile=str(cloud.ca_file)), timeout=10)
        ftps.connect(url.hostname, url.port)
        ftps.login(ftp_profile["userName"], ftp_profile["userPWD"])
        ftps.prot_p()
        body = f"from the profile's FTPS, by {client.__name__}".encode()
        ftps.storbinary("STOR ftps.txt", io.BytesIO(body))
        ftps.quit()
        cloud.wait_for_content("profiled", "/ftps.txt", body)


# --- git push


def _git_env(home: Path) -> dict[str, str]:
    # The repository's own http.sslCAInfo must decide, as for a site owner: no GIT_SSL_CAINFO from here.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    return {
        **inherited,
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": "Site Owner",
        "GIT_AUTHOR_EMAIL": "owner@example.net",
        "GIT_COMMITTER_NAME": "Site Owner",
        "GIT_COMMITTER_EMAIL": "owner@example.net",
    }


class Checkout:
    def __init__(self, cloud: LocalCloud, path: Path, remote: str) -> None:
        self.git = _tool("git")
        self.path = path
        self.env = _git_env(path.parent)
        path.mkdir(parents=True)
        self.run("init", "-q", "-b", "main")
        self.run("config", "http.sslCAInfo", str(cloud.ca_file))
        self.run("remote", "add", "origin", remote)

    def run(
        self, *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.git, *args],
            cwd=self.path,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            input=stdin,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"git {' '.join(args)} failed: {proc.stdout}\n{proc.stderr}")
        return proc

    def commit(self, files: dict[str, bytes | None], message: str) -> None:
        for name, data in files.items():
            target = self.path / name
            if data is None:
                self.run("rm", "-q", name)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            self.run("add", name)
        self.run("commit", "-q", "-m", message)

    def push(self, *refspec: str, remote: str = "origin") -> subprocess.CompletedProcess[str]:
        return self.run("push", remote, *(refspec or ("main",)), check=False)


def _remote(site: dict[str, Any], password: str | None = None) -> str:
    base = urlsplit(site["deploy"]["url"])
    return f"https://{site['ftp']['user']}:{password or site['ftp']['password']}@{base.netloc}/{site['name']}.git"


def test_git_push_deploys_the_pushed_tree_and_a_second_push_replaces_it(
    cloud: LocalCloud, subscription: int, tmp_path: Path
) -> None:
    site = _site(cloud, subscription, "gitsite")
    repo = Checkout(cloud, tmp_path / "gitsite", _remote(site))
    repo.commit({"index.html": b"pushed once", "old.txt": b"goes away"}, "first")
    started = time.monotonic()
    pushed = repo.push()
    assert pushed.returncode == 0, pushed.stderr
    cloud.wait_for_content("gitsite", "/", b"pushed once")
    first = time.monotonic() - started
    # The push's own output says what happened and where the site is live.
    assert "remote: sitecloud: deployed as version" in pushed.stderr
    assert "remote: sitecloud: live at https://gitsite.sites.localhost" in pushed.stderr

    repo.commit({"index.html": b"pushed twice", "old.txt": None, "about/index.html": b"about"}, "second")
    pushed = repo.push()
    assert pushed.returncode == 0, pushed.stderr
    cloud.wait_for_content("gitsite", "/", b"pushed twice")
    assert cloud.get("gitsite", "/about/index.html")[2] == b"about"
    assert cloud.get("gitsite", "/old.txt")[0] == 404  # the whole site flipped to the new tree
    print(f"first git push to live: {first:.2f}s")
    # The same URL clones, with the same credentials.
    ca = f"http.sslCAInfo={cloud.ca_file}"
    cloned = repo.run("-c", ca, "clone", "-q", _remote(site), str(tmp_path / "clone"))
    assert cloned.returncode == 0
    assert (tmp_path / "clone" / "about" / "index.html").read_bytes() == b"about"

    # A forced push (history rewritten) deploys too: non-fast-forwards are allowed.
    repo.run("commit", "-q", "--amend", "-m", "second, amended")
    repo.commit({"index.html": b"forced"}, "third")
    forced = repo.push("+main")
    assert forced.returncode == 0, forced.stderr
    cloud.wait_for_content("gitsite", "/", b"forced")
    # Each push is a version of its own, listed as a git push.
    versions = cloud.cli("site", "versions", "gitsite")["versions"]
    assert [v["source"] for v in versions][-3:] == ["git", "git", "git"], versions

    # Another branch is refused with a message that says what to push instead; the site is unchanged.
    repo.run("checkout", "-q", "-b", "feature")
    repo.commit({"index.html": b"not deployed"}, "feature")
    refused = repo.push("feature")
    assert refused.returncode != 0
    assert "only a push to main or master deploys" in refused.stderr
    assert cloud.get("gitsite", "/")[2] == b"forced"

    # main with a tag (`--follow-tags`, or both named): main deploys, only the tag is refused.
    repo.run("checkout", "-q", "main")
    repo.commit({"index.html": b"tagged release"}, "release")
    repo.run("tag", "-a", "v1.0", "-m", "v1.0")
    tagged = repo.run("push", "--follow-tags", "origin", "main", check=False)
    assert "remote: sitecloud: deployed as version" in tagged.stderr, tagged.stderr
    assert "refs/tags/v1.0 refused: only a push to main or master deploys" in tagged.stderr, tagged.stderr
    assert tagged.returncode != 0  # git says a ref was refused
    cloud.wait_for_content("gitsite", "/", b"tagged release")


def test_git_push_with_a_wrong_password_is_refused_then_throttled(
    cloud: LocalCloud, subscription: int, tmp_path: Path
) -> None:
    site = _site(cloud, subscription, "gitguard")
    repo = Checkout(cloud, tmp_path / "gitguard", _remote(site, "not-the-password"))
    repo.commit({"index.html": b"never deployed"}, "first")
    answers = [repo.push() for _ in range(6)]
    assert all(a.returncode != 0 for a in answers)
    assert "Authentication failed" in answers[0].stderr
    # The publisher's login throttle (shared with FTP and zip deploy) answers 429 once it is full.
    assert "429" in answers[-1].stderr
    status, _, _ = cloud.get("gitguard", "/")
    assert status != 200 or cloud.get("gitguard", "/")[2] != b"never deployed"


def test_a_re_created_site_gets_a_fresh_repository(
    cloud: LocalCloud, subscription: int, tmp_path: Path
) -> None:
    site = _site(cloud, subscription, "gitfresh")
    repo = Checkout(cloud, tmp_path / "gitfresh", _remote(site))
    repo.commit({"index.html": b"first life"}, "first")
    assert repo.push().returncode == 0
    cloud.wait_for_content("gitfresh", "/", b"first life")
    cloud.cli("site", "delete", "gitfresh", "--yes")
    site = _site(cloud, subscription, "gitfresh")
    # The new site's repository has no history: an unrelated history pushes and deploys.
    other = Checkout(cloud, tmp_path / "gitfresh2", _remote(site))
    other.commit({"index.html": b"second life"}, "first again")
    listed = other.run("ls-remote", "origin", check=False)
    assert listed.returncode == 0 and listed.stdout.strip() == "", listed.stderr
    assert other.push().returncode == 0
    cloud.wait_for_content("gitfresh", "/", b"second life")


def test_git_endpoints_refuse_what_they_do_not_serve(cloud: LocalCloud, subscription: int) -> None:
    mine = _site(cloud, subscription, "gitmine")
    theirs = _site(cloud, subscription, "gittheirs")
    base = _deploy_base(mine)
    auth = f"{mine['ftp']['user']}:{mine['ftp']['password']}"
    # The dumb HTTP protocol, and git endpoints that do not exist, get a 4xx that says what is served.
    status, _, body = _curl(cloud, "-u", auth, f"{base}/gitmine.git/info/refs")
    assert status == 400 and b"smart HTTP" in body
    status, _, body = _curl(cloud, "-u", auth, "-X", "POST", f"{base}/gitmine.git/git-evil-pack")
    assert status == 404 and b"no such git endpoint" in body
    status, headers, body = _curl(
        cloud, "-u", auth, f"{base}/Not_A.Site.git/info/refs?service=git-receive-pack"
    )
    # As text, which git shows the pusher as `remote:` lines (JSON it would not show).
    assert status == 400 and headers["content-type"].startswith("text/plain"), headers
    assert body.startswith(b"sitecloud: ") and b"Not_A.Site" in body, body
    # One site's credentials open no other site's repository.
    status, _, _ = _curl(cloud, "-u", auth, f"{base}/{theirs['name']}.git/info/refs?service=git-receive-pack")
    assert status == 401
    # Its own: the smart HTTP advertisement, from a repository made on first use.
    status, headers, body = _curl(cloud, "-u", auth, f"{base}/gitmine.git/info/refs?service=git-receive-pack")
    assert status == 200 and headers["content-type"] == "application/x-git-receive-pack-advertisement"
    assert b"report-status" in body


def test_a_push_that_cannot_deploy_says_why_and_leaves_the_branch_where_it_was(
    cloud: LocalCloud, subscription: int, tmp_path: Path
) -> None:
    site = _site(cloud, subscription, "gitfails")
    repo = Checkout(cloud, tmp_path / "gitfails", _remote(site))
    repo.commit({"index.html": b"good version"}, "good")
    assert repo.push().returncode == 0
    cloud.wait_for_content("gitfails", "/", b"good version")
    good = repo.run("rev-parse", "HEAD").stdout.strip()

    # A symbolic link is refused by the zip trust boundary the pushed tree goes through.
    (repo.path / "escape").symlink_to("/etc/passwd")
    repo.run("add", "escape")
    repo.commit({"index.html": b"bad version"}, "with a link")
    pushed = repo.push()
    assert "remote: sitecloud: deploy FAILED" in pushed.stderr and "symbolic link" in pushed.stderr
    remote_main = repo.run("ls-remote", "origin", "refs/heads/main").stdout.split()[0]
    assert remote_main == good  # put back, so the next push deploys again
    assert cloud.get("gitfails", "/")[2] == b"good version"

    repo.commit({"escape": None, "index.html": b"fixed version"}, "no link")
    fixed = repo.push()
    assert fixed.returncode == 0 and "deployed as version" in fixed.stderr, fixed.stderr
    cloud.wait_for_content("gitfails", "/", b"fixed version")


def _server_repository(cloud: LocalCloud, site: str) -> Path:
    found = list((cloud.home / "roles" / "publisher" / "git").glob(f"{site}@*/{site}.git"))
    assert len(found) == 1, found
    return found[0]


def _bytes_under(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_a_refused_push_leaves_nothing_and_a_pack_over_the_quota_is_refused_as_it_arrives(
    cloud: LocalCloud, subscription: int, tmp_path: Path
) -> None:
    site = _site(cloud, subscription, "gitquota")  # the plan's storage: 5 MB
    repo = Checkout(cloud, tmp_path / "gitquota", _remote(site))
    repo.commit({"index.html": b"fits"}, "small")
    assert repo.push().returncode == 0
    cloud.wait_for_content("gitquota", "/", b"fits")
    server = _server_repository(cloud, "gitquota")
    small = _bytes_under(server)

    # A 3 MB pack git takes, whose tree unpacks past the quota: the deploy refuses it, and its
    # objects, which no ref reaches once main is put back, are dropped after the answer.
    repo.commit({"noise.bin": os.urandom(3 * 2**20), "zeros.bin": bytes(3 * 2**20)}, "6 MB unpacked")
    blob = repo.run("rev-parse", "HEAD:noise.bin").stdout.strip()
    # What git leaves when a push is killed midway (its quarantine) goes too.
    leftover = server / "objects" / "tmp_objdir-incoming-killed" / "pack"
    leftover.mkdir(parents=True)
    (leftover / "tmp_pack_x").write_bytes(os.urandom(2**20))
    refused = repo.push()
    assert refused.returncode != 0 and "quota" in refused.stderr, refused.stderr

    def dropped() -> bool:
        there = subprocess.run(
            [repo.git, "cat-file", "-e", blob], cwd=server, env=repo.env, capture_output=True
        )
        return there.returncode != 0

    wait_until(dropped, timeout=30, what="the refused push's objects to be dropped")
    assert _bytes_under(server) < small + 2**20 and not leftover.parent.exists()

    # A pack bigger than the quota is refused while it arrives (git's receive.maxInputSize), and
    # leaves nothing either.
    repo.run("reset", "-q", "--hard", "HEAD~1")
    repo.commit({"noise.bin": os.urandom(6 * 2**20)}, "6 MB packed")
    over = repo.push()
    assert (
        over.returncode != 0
        and "remote: sitecloud: the push is larger than the site's storage quota (5242880 bytes)"
        in over.stderr
    )
    assert "[remote rejected] main -> main (unpacker error)" in over.stderr, over.stderr
    assert _bytes_under(server) < small + 2**20
    assert not list((server / "objects").glob("tmp_objdir-*"))
    assert cloud.get("gitquota", "/")[2] == b"fits"
    # Within the quota, pushing goes on as before.
    repo.run("reset", "-q", "--hard", "HEAD~1")
    repo.commit({"index.html": b"still pushes"}, "fits again")
    assert repo.push().returncode == 0
    cloud.wait_for_content("gitquota", "/", b"still pushes")


def test_git_history_is_held_to_the_storage_quota_and_a_force_push_frees_it(
    cloud: LocalCloud, subscription: int, tmp_path: Path
) -> None:
    site = _site(cloud, subscription, "githistory")  # the plan's storage: 5 MB
    repo = Checkout(cloud, tmp_path / "githistory", _remote(site))
    repo.commit({"index.html": b"one", "data.bin": os.urandom(3 * 2**20)}, "3 MB")
    assert repo.push().returncode == 0
    cloud.wait_for_content("githistory", "/", b"one")
    server = _server_repository(cloud, "githistory")

    # Each version fits, but the history of both would not: pushed again and again, such commits
    # would fill the publisher's disk past every plan.
    repo.commit({"index.html": b"two", "data.bin": os.urandom(3 * 2**20)}, "another 3 MB")
    refused = repo.push()
    assert refused.returncode != 0, refused.stderr
    assert "remote: sitecloud: the site's git history would take 6.0 MB" in refused.stderr, refused.stderr
    assert "more than its storage quota of 5.0 MB" in refused.stderr and "--force" in refused.stderr
    assert "[remote rejected] main -> main" in refused.stderr
    wait_until(lambda: _bytes_under(server) < 4 * 2**20, timeout=30, what="the refused push's objects to go")
    assert cloud.get("githistory", "/")[2] == b"one"

    # A history that fits, pushed over the old one, is taken: what no branch reaches is dropped.
    repo.run("checkout", "-q", "--orphan", "fresh")
    repo.commit({"index.html": b"three", "data.bin": os.urandom(3 * 2**20)}, "squashed")
    assert repo.push("--force", "fresh:main").returncode == 0
    cloud.wait_for_content("githistory", "/", b"three")
    assert _bytes_under(server) < 4 * 2**20


def _tree_of_trees(repo: Checkout, blob: bytes, *, width: int, depth: int) -> str:
    """A commit whose tree names ``width ** depth`` copies of ``blob``: each level is one tree naming
    the level below ``width`` times, so the pack holds ``depth`` small trees and one blob."""
    (repo.path.parent / "blob").write_bytes(blob)
    sha = repo.run("hash-object", "-w", str(repo.path.parent / "blob")).stdout.strip()
    mode, kind = "100644", "blob"
    for _ in range(depth):
        listing = "".join(f"{mode} {kind} {sha}\tn{i}\n" for i in range(width))
        sha = repo.run("mktree", stdin=listing).stdout.strip()
        mode, kind = "040000", "tree"
    page = repo.run("hash-object", "-w", "--stdin", stdin="bomb").stdout.strip()
    top = repo.run("mktree", stdin=f"040000 tree {sha}\tb\n100644 blob {page}\tindex.html\n").stdout.strip()
    return repo.run("commit-tree", top, "-m", "tree of trees").stdout.strip()


def test_a_small_push_whose_trees_name_millions_of_files_or_bytes_is_refused_at_once(
    cloud: LocalCloud, subscription: int, tmp_path: Path
) -> None:
    site = _site(cloud, subscription, "gittrees")  # the plan's storage: 5 MB
    repo = Checkout(cloud, tmp_path / "gittrees", _remote(site))
    repo.commit({"index.html": b"fits"}, "small")
    assert repo.push().returncode == 0
    cloud.wait_for_content("gittrees", "/", b"fits")

    # A pack of a few KB whose trees name a million files: refused before it is exported as a zip
    # (a level more and the export alone would write gigabytes on the publisher's disk).
    bomb = _tree_of_trees(repo, b"x", width=100, depth=3)
    started = time.monotonic()
    refused = repo.push("--force", f"{bomb}:refs/heads/main")
    took = time.monotonic() - started
    assert refused.returncode != 0, refused.stderr
    assert "remote: sitecloud: deploy FAILED: the commit names more than 100000 files" in refused.stderr
    assert took < 30, f"refused after {took:.1f}s"

    # Few files, but each a copy of one large blob: past the quota, said as such.
    zeros = _tree_of_trees(repo, bytes(2**20), width=8, depth=1)
    refused = repo.push("--force", f"{zeros}:refs/heads/main")
    assert refused.returncode != 0 and "more than the site's quota of 5242880 bytes" in refused.stderr
    assert cloud.get("gittrees", "/")[2] == b"fits"
    repo.commit({"index.html": b"still pushes"}, "fits again")
    assert repo.push().returncode == 0
    cloud.wait_for_content("gittrees", "/", b"still pushes")


def test_export_subst_in_a_pushed_tree_is_not_expanded(
    cloud: LocalCloud, subscription: int, tmp_path: Path
) -> None:
    site = _site(cloud, subscription, "gitsubst")
    repo = Checkout(cloud, tmp_path / "gitsubst", _remote(site))
    # Expanded, each $Format:%B$ would be the whole 100 KB message: 22 KB of them make 200 MB, which
    # git archive builds in memory (a push of a few MB could take the publisher's host down).
    page = b"$Format:%B$" * 2000
    repo.commit({".gitattributes": b"* export-subst\n", "index.html": page}, "x" * 100_000)
    pushed = repo.push()
    assert pushed.returncode == 0, pushed.stderr
    cloud.wait_for_content("gitsubst", "/", page)


def test_deploy_lines_go_only_into_a_report_multiplexed_on_side_bands() -> None:
    report = _pkt(b"\x01" + _pkt(b"unpack ok\n") + _pkt(b"ok refs/heads/main\n") + b"0000")
    assert _split_report(report + b"0000") == (report, True)
    assert _split_report(report) == (report, False)
    # Not multiplexed (no side band asked for), truncated, or not pkt-lines at all: left alone.
    assert _split_report(_pkt(b"unpack ok\n") + b"0000") is None
    assert _split_report(report[:-3]) is None
    assert _split_report(b"HTTP garbage") is None


def test_a_failed_deploy_turns_the_reports_ok_into_ng_with_why() -> None:
    status = _pkt(b"unpack ok\n") + _pkt(b"ok refs/heads/main\n") + b"0000"
    hook = _pkt(b"\x02hook says hi\n")
    # The report-status may come cut across band-1 packets anywhere.
    report = hook + _pkt(b"\x01" + status[:9]) + _pkt(b"\x01" + status[9:]) + b"0000"
    refused = _rejected(report, "refs/heads/main", "deploy failed: the build failed")
    ng = _pkt(b"unpack ok\n") + _pkt(b"ng refs/heads/main deploy failed: the build failed\n") + b"0000"
    assert refused == hook + _pkt(b"\x01" + ng) + b"0000"
    # Without side bands, and report-status v2 (an ok's option lines go with it).
    plain = _pkt(b"unpack ok\n") + _pkt(b"ok refs/heads/main\n") + _pkt(b"option refname refs/heads/main\n")
    assert _rejected(plain + b"0000", "refs/heads/main", "why") == (
        _pkt(b"unpack ok\n") + _pkt(b"ng refs/heads/main why\n") + b"0000"
    )
    # Another ref's ok, and what is not pkt-lines, are left alone.
    assert _rejected(plain, "refs/heads/master", "why") == plain
    assert _rejected(b"HTTP garbage", "refs/heads/main", "why") == b"HTTP garbage"


# --- a deploy whose build fails

# A Python app whose requirements.txt names a package no index has: pip fails at once, offline too.
_MISSING = b"this-package-does-not-exist-xyz==1.0"
_APP = b"""
def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [open("message.txt", "rb").read()]
"""


def _app_files(message: bytes, *, broken: bool) -> dict[str, bytes]:
    files = {"app.py": _APP, "message.txt": message}
    if broken:
        files["requirements.txt"] = b"# the app's packages\n" + _MISSING + b"\n"
    return files


def _sitecloud(cloud: LocalCloud, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "roles.management.cli", "--home", str(cloud.home), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_a_cli_deploy_whose_build_fails_exits_non_zero_with_the_builds_error(
    cloud: LocalCloud, subscription: int, tmp_path: Path
) -> None:
    _site(cloud, subscription, "buildcli")
    good = _sitecloud(
        cloud, "deploy", "buildcli", str(_tree(tmp_path / "app", _app_files(b"v1", broken=False)))
    )
    assert good.returncode == 0, good.stderr
    cloud.wait_for_content("buildcli", "/", b"v1", timeout=60)

    broken = _tree(tmp_path / "app", _app_files(b"v2", broken=True))
    failed = _sitecloud(cloud, "deploy", "buildcli", str(broken))
    assert failed.returncode != 0, (failed.stdout, failed.stderr)
    # pip's lines as they ran, then the error: the build's own last lines, and what to do next.
    assert "No matching distribution found for this-package-does-not-exist-xyz" in failed.stdout
    assert "served" not in failed.stdout.splitlines()[-1]
    error, _, hint = failed.stderr.partition("hint: ")
    assert error.startswith("error: version ") and "its build failed" in error, failed.stderr
    assert "No matching distribution found for this-package-does-not-exist-xyz==1.0" in error
    assert "deploy again" in hint and "site logs buildcli" in hint
    # --json carries it as an error with its code.
    as_json = _sitecloud(cloud, "deploy", "buildcli", str(broken), "--json")
    assert as_json.returncode == failed.returncode
    answer = json.loads(as_json.stdout)
    assert (
        answer["error"]["code"] == "build_failed" and "No matching distribution" in answer["error"]["message"]
    )

    # The site keeps serving what it did, as Kudu keeps the running app: the content before the
    # deploy is put back as a new version (before, the site answered 503 "build failed").
    assert "the site is back at version" in error, error
    cloud.wait_for_content("buildcli", "/message.txt", b"v1", timeout=60)
    cloud.wait_for_content("buildcli", "/", b"v1", timeout=60)
    sources = [
        v["source"]
        for v in json.loads(_sitecloud(cloud, "site", "versions", "buildcli", "--json").stdout)["versions"]
    ]
    assert sources[-1] == "rollback", sources

    # Fixed, the next deploy succeeds and the app runs its new version.
    fixed = _sitecloud(
        cloud, "deploy", "buildcli", str(_tree(tmp_path / "app", _app_files(b"v3", broken=False)))
    )
    assert fixed.returncode == 0, fixed.stderr
    cloud.wait_for_content("buildcli", "/", b"v3", timeout=60)


def test_a_stopped_sites_start_builds_what_was_published_to_it_and_fails_as_its_build_does(
    cloud: LocalCloud, subscription: int, tmp_path: Path
) -> None:
    # Nothing builds while a site is stopped: its start builds what was deployed meanwhile, and
    # reports the build as a deploy does (before, it said "started" and the site answered 503).
    _site(cloud, subscription, "buildstart")
    cloud.cli("site", "stop", "buildstart")
    broken = _tree(tmp_path / "app", _app_files(b"v1", broken=True))
    deployed = _sitecloud(cloud, "deploy", "buildstart", str(broken))
    assert deployed.returncode == 0, deployed.stderr
    assert "it builds and serves this version once it is started" in deployed.stdout, deployed.stdout

    started = _sitecloud(cloud, "site", "start", "buildstart")
    assert started.returncode != 0, (started.stdout, started.stderr)
    assert "No matching distribution found for this-package-does-not-exist-xyz" in started.stdout
    error, _, hint = started.stderr.partition("hint: ")
    assert error.startswith("error: site buildstart is started, but version"), started.stderr
    assert "its build failed" in error and "No matching distribution found" in error, error
    assert "deploy again" in hint and "site rollback buildstart" in hint, hint
    as_json = _sitecloud(cloud, "site", "start", "buildstart", "--json")
    assert as_json.returncode == started.returncode
    assert json.loads(as_json.stdout)["error"]["code"] == "build_failed", as_json.stdout

    # A version that builds: the start ends once the site serves it.
    cloud.cli("site", "stop", "buildstart")
    fixed = _sitecloud(
        cloud, "deploy", "buildstart", str(_tree(tmp_path / "app", _app_files(b"v2", broken=False)))
    )
    assert fixed.returncode == 0, fixed.stderr
    started = _sitecloud(cloud, "site", "start", "buildstart")
    assert started.returncode == 0, started.stderr
    assert started.stdout.splitlines()[-1] == "started buildstart", started.stdout
    status, _, body = cloud.get("buildstart", "/")  # no waiting: it said started
    assert (status, body) == (200, b"v2"), (status, body[:300])


def test_the_portal_start_of_a_stopped_site_reports_its_build_as_the_cli_does(
    cloud: LocalCloud, subscription: int, tmp_path: Path
) -> None:
    from tests.test_portal import post_and_follow, signed_in_page

    _site(cloud, subscription, "buildportal")
    cloud.cli("site", "stop", "buildportal")
    broken = _tree(tmp_path / "app", _app_files(b"v1", broken=True))
    assert _sitecloud(cloud, "deploy", "buildportal", str(broken)).returncode == 0
    with signed_in_page(cloud.home, cloud.ports["api_port"], "builder") as (page, portal):
        page.goto(f"{portal}/portal/sites/buildportal")
        # Before, the page said "Site started: it serves visitors again." and the site answered 503.
        assert post_and_follow(page, "button:text-is('Start site')") == 303
        assert page.locator(".notice").count() == 0, page.inner_text(".notice")
        alert = page.inner_text(".alert")
        assert "site buildportal is started, but version" in alert, alert
        assert "its build failed" in alert, alert
        assert "No matching distribution found for this-package-does-not-exist-xyz" in alert, alert
        # The hint as the CLI's (deploy a fix, or roll back), in the portal's words.
        assert "deploy again" in alert and "roll back to an earlier version" in alert, alert
        assert "sitecloud " not in alert and "`" not in alert, alert

        # A version that builds: the start says so once the site serves it.
        assert post_and_follow(page, "button:text-is('Stop site')") == 303
        fixed = _tree(tmp_path / "app", _app_files(b"v2", broken=False))
        assert _sitecloud(cloud, "deploy", "buildportal", str(fixed)).returncode == 0
        assert post_and_follow(page, "button:text-is('Start site')") == 303
        assert page.locator(".alert").count() == 0, page.inner_text(".alert")
        assert "Site started: it serves visitors again." in page.inner_text(".notice")
        # The controller applied the start: the page says running, not pending.
        assert page.locator("h1 .badge").all_inner_texts() == ["running"]
        assert page.locator(".not-live").count() == 0, page.inner_text(".not-live")
        status, _, body = cloud.get("buildportal", "/")  # no waiting: it said it serves
        assert (status, body) == (200, b"v2"), (status, body[:300])


def test_a_portal_deploy_reports_its_build_and_a_failed_one_is_put_back(
    cloud: LocalCloud, subscription: int, tmp_path: Path
) -> None:
    from tests.test_portal import post_and_follow, signed_in_page

    _site(cloud, subscription, "buildzip")
    good, broken = tmp_path / "good.zip", tmp_path / "broken.zip"
    good.write_bytes(_zip(_app_files(b"v1", broken=False)))
    broken.write_bytes(_zip(_app_files(b"v2", broken=True)))
    with signed_in_page(cloud.home, cloud.ports["api_port"], "zipper") as (page, portal):
        page.goto(f"{portal}/portal/sites/buildzip")
        page.set_input_files("#zip", str(good))
        assert post_and_follow(page, "button:text-is('Deploy')") == 303
        assert page.locator(".alert").count() == 0, page.inner_text(".alert")
        assert "served." in page.inner_text(".notice"), page.inner_text(".notice")
        status, _, body = cloud.get("buildzip", "/")  # no waiting: it said it serves
        assert (status, body) == (200, b"v1"), (status, body[:300])

        # Before, the page said "Deployed 3 file(s)" while the new version did not run.
        page.set_input_files("#zip", str(broken))
        assert post_and_follow(page, "button:text-is('Deploy')") == 303
        assert page.locator(".notice").count() == 0, page.inner_text(".notice")
        alert = page.inner_text(".alert")
        assert "No matching distribution found for this-package-does-not-exist-xyz" in alert, alert
        assert "deploy again" in alert and "sitecloud " not in alert, alert
        assert cloud.get("buildzip", "/")[::2] == (200, b"v1")


def test_a_zipdeploy_whose_build_fails_is_a_failed_deployment(cloud: LocalCloud, subscription: int) -> None:
    site = _site(cloud, subscription, "buildkudu")
    auth = f"{site['ftp']['user']}:{site['ftp']['password']}"
    archive = cloud.home.parent / "buildkudu.zip"
    archive.write_bytes(_zip(_app_files(b"v1", broken=True)))
    # Synchronous: an error status, with the failed (and complete) deployment record as its answer.
    status, _, body = _curl(
        cloud, "-u", auth, "--data-binary", f"@{archive}", f"{_deploy_base(site)}/api/zipdeploy"
    )
    assert status == 422, body
    record = json.loads(body)
    assert (record["status"], record["status_text"], record["complete"]) == (3, "failed", True), record
    assert record["active"] is False and "No matching distribution found" in record["message"]
    code, _, log = _curl(cloud, "-u", auth, record["log_url"])
    messages = [entry["message"] for entry in json.loads(log)]
    assert code == 200 and any(m.startswith("ERROR: No matching distribution") for m in messages), messages
    assert "its build failed" in messages[-1]

    # Asynchronous: the status URL ends at 3 (Failed), complete, saying why.
    status, headers, _ = _curl(
        cloud, "-u", auth, "--data-binary", f"@{archive}", f"{_deploy_base(site)}/api/zipdeploy?isAsync=true"
    )
    assert status == 202
    failed = wait_until(polled_at(cloud, auth, headers["location"]), timeout=120, what="the build to fail")
    assert failed["status"] == 3 and "this-package-does-not-exist-xyz" in failed["message"], failed


def test_a_git_push_whose_build_fails_is_rejected_and_its_branch_left_where_it_was(
    cloud: LocalCloud, subscription: int, tmp_path: Path
) -> None:
    site = _site(cloud, subscription, "buildgit")
    repo = Checkout(cloud, tmp_path / "buildgit", _remote(site))
    repo.commit(_app_files(b"v1", broken=False), "an app that builds")
    pushed = repo.push()
    assert pushed.returncode == 0, pushed.stderr
    cloud.wait_for_content("buildgit", "/", b"v1", timeout=60)
    good = repo.run("rev-parse", "HEAD").stdout.strip()

    repo.commit(_app_files(b"v2", broken=True), "a requirement that does not exist")
    pushed = repo.push()
    assert pushed.returncode != 0, pushed.stderr
    # pip's own error on the pusher's screen, then git's report: main was not updated, and why.
    assert (
        "remote: ERROR: No matching distribution found for this-package-does-not-exist-xyz" in pushed.stderr
    )
    assert "remote: sitecloud: deploy FAILED: version" in pushed.stderr
    rejected = [line for line in pushed.stderr.splitlines() if "[remote rejected]" in line]
    assert rejected and "main -> main (deploy failed: version" in rejected[0], pushed.stderr
    assert "its build failed" in rejected[0]
    remote_main = repo.run("ls-remote", "origin", "refs/heads/main").stdout.split()[0]
    assert remote_main == good
    tracking = repo.run("rev-parse", "refs/remotes/origin/main").stdout.strip()
    assert tracking == good  # git took the push as refused
    # And the site holds what main says: the content of the commit before.
    cloud.wait_for_content("buildgit", "/", b"v1", timeout=60)

    repo.commit({"requirements.txt": None, "message.txt": b"v3"}, "no requirements")
    fixed = repo.push()
    assert fixed.returncode == 0 and "live at" in fixed.stderr, fixed.stderr
    cloud.wait_for_content("buildgit", "/", b"v3", timeout=60)
