"""Usage, daily quotas and access logs end to end on a `sitecloud up` cloud: a site over its plan's
bandwidth for the day gets the 403 quota page (others serve on), an admin lift brings it back; usage
numbers add up to what was sent; a static site's requests show in `site logs` with their request id.
"""

from __future__ import annotations

import csv
import datetime as dt
import ftplib
import io
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.quota import next_utc_day, quota_stop
from tests.cloud import LocalCloud
from tests.support import wait_until

pytestmark = pytest.mark.timeout(300)

_BIG = b"x" * (300 * 1024)


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    cloud = LocalCloud(tmp_path_factory.mktemp("usage") / "home", extra_args=("--usage-interval", "0.3"))
    cloud.start()
    try:
        yield cloud
    finally:
        cloud.kill_everything()


@pytest.fixture(scope="module")
def sites(cloud: LocalCloud) -> dict[str, Any]:
    cloud.cli(
        "plan", "create", "tiny", "--max-sites", "2", "--storage-mb", "5", "--bandwidth-mb-per-day", "1"
    )
    cloud.cli("plan", "create", "roomy", "--max-sites", "2", "--storage-mb", "5")
    tenant = cloud.cli("tenant", "create", "fabrikam")
    tiny = cloud.cli("subscription", "create", "--tenant", "fabrikam", "--plan", "tiny")
    roomy = cloud.cli("subscription", "create", "--tenant", "fabrikam", "--plan", "roomy")
    small = cloud.cli("site", "create", "small", "--subscription", str(tiny["id"]), token=tenant["token"])
    other = cloud.cli("site", "create", "other", "--subscription", str(roomy["id"]), token=tenant["token"])
    return {"tenant": tenant, "small": small, "other": other}


def _upload(cloud: LocalCloud, site: dict[str, Any], files: dict[str, bytes]) -> None:
    ftp = ftplib.FTP()
    ftp.connect(site["ftp"]["host"], site["ftp"]["port"], timeout=10)
    ftp.login(site["ftp"]["user"], site["ftp"]["password"])
    try:
        for name, data in files.items():
            ftp.storbinary(f"STOR {name}", io.BytesIO(data))
    finally:
        ftp.quit()
    for name, data in files.items():
        cloud.wait_for_content(site["name"], f"/{name}", data)


def _api(cloud: LocalCloud, path: str, *, token: str | None = None, accept: str = "") -> tuple[str, bytes]:
    endpoints = json.loads((cloud.home / "endpoints.json").read_text())
    base = endpoints["api"]
    admin = token or Path(endpoints["admin_token_file"]).read_text().strip()
    req = urllib.request.Request(f"{base.rstrip('/')}{path}", headers={"Authorization": f"Bearer {admin}"})
    if accept:
        req.add_header("Accept", accept)
    with urllib.request.urlopen(req, timeout=30, context=_tls(cloud)) as resp:
        return resp.headers.get("Content-Type", ""), resp.read()


def _tls(cloud: LocalCloud) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(cloud.ca_file))


def test_static_request_shows_in_site_logs_with_its_request_id(
    cloud: LocalCloud, sites: dict[str, Any]
) -> None:
    _upload(cloud, sites["other"], {"hello.txt": b"hello"})
    status, headers, body = cloud.get("other", "/hello.txt", headers={"User-Agent": "usage-test/1"})
    assert status == 200 and body == b"hello"
    rid = headers.get("x-request-id", "")
    assert rid, headers

    def logged() -> list[str]:
        lines = cloud.cli("site", "logs", "other", token=sites["tenant"]["token"])["lines"]
        return [line for line in lines if f"id={rid}" in line]

    wait_until(lambda: bool(logged()), timeout=10, what="the access line in site logs")
    line = logged()[0]
    assert '"GET /hello.txt HTTP/1.1" 200' in line and "[access]" in line and '"usage-test/1"' in line


def test_usage_counts_what_was_sent(cloud: LocalCloud, sites: dict[str, Any]) -> None:
    token = sites["tenant"]["token"]
    before = cloud.cli("site", "usage", "other", token=token)["totals"]["requests"]
    for _ in range(5):
        assert cloud.get("other", "/hello.txt")[0] == 200

    def counted() -> bool:
        return bool(cloud.cli("site", "usage", "other", token=token)["totals"]["requests"] >= before + 5)

    wait_until(counted, timeout=15, what="usage to count 5 more requests")
    usage = cloud.cli("site", "usage", "other", token=token)
    today = usage["days"][-1]
    assert today["day"] == dt.datetime.now(dt.UTC).date().isoformat()
    assert today["bytes_out"] >= 5 * len(b"hello") and today["bytes_in"] > 0
    assert today["storage_bytes"] == len(b"hello")
    # The admin export, as JSON and as CSV, holds the same day.
    _, raw = _api(cloud, "/api/v1/usage")
    rows = [r for r in json.loads(raw)["rows"] if r["site"] == "other"]
    assert rows and rows[-1]["tenant"] == "fabrikam" and rows[-1]["plan"] == "roomy"
    kind, raw_csv = _api(cloud, "/api/v1/usage", accept="text/csv")
    assert kind.startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(raw_csv.decode())))
    assert any(r["site"] == "other" and int(r["requests"]) >= 5 for r in table)


def test_bandwidth_quota_stops_the_site_with_403_and_an_admin_lift_brings_it_back(
    cloud: LocalCloud, sites: dict[str, Any]
) -> None:
    token = sites["tenant"]["token"]
    _upload(cloud, sites["small"], {"big.bin": _BIG})

    def stopped() -> bool:
        return cloud.get("small", "/big.bin")[0] == 403

    # 1 MB a day: a few fetches of 300 KB pass it; once reported, the front ends stop the site.
    wait_until(stopped, timeout=30, interval=0.2, what="the site to be stopped by its quota")
    status, _, body = cloud.get("small", "/big.bin")
    assert status == 403 and b"quota exceeded" in body and b"UTC" in body
    # Other sites serve on.
    assert cloud.get("other", "/hello.txt")[:3:2] == (200, b"hello")
    # The tenant sees why and when it resets.
    shown = cloud.cli("site", "show", "small", token=token)
    stop = shown["quota"]["stopped"]
    assert stop["what"] == "bandwidth" and stop["until"] == shown["quota"]["resets_at"]
    # Only an admin lifts it.
    with pytest.raises(urllib.error.HTTPError) as refused:
        _api_post(cloud, "/api/v1/sites/small/quota-reset", token=token)
    with refused.value:
        assert refused.value.code == 403
    cloud.cli("site", "quota-reset", "small")
    wait_until(lambda: cloud.get("small", "/big.bin")[0] == 200, timeout=15, what="the lift to apply")
    assert cloud.cli("site", "show", "small", token=token)["quota"]["lifted_today"] is True


def _api_post(cloud: LocalCloud, path: str, *, token: str) -> bytes:
    base = json.loads((cloud.home / "endpoints.json").read_text())["api"]
    req = urllib.request.Request(
        f"{base.rstrip('/')}{path}", data=b"", method="POST", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(req, timeout=30, context=_tls(cloud)) as resp:
        return bytes(resp.read())


def test_a_stop_ends_at_the_next_utc_day() -> None:
    late = dt.datetime(2026, 3, 1, 23, 59, 30, tzinfo=dt.UTC)
    figures: dict[str, Any] = {
        "bandwidth_mb_per_day": 1,
        "cpu_minutes_per_day": 10,
        "bytes_today": 2 * 1024 * 1024,
        "cpu_seconds_today": 0.0,
        "lifted_day": None,
    }
    stop = quota_stop(**figures, now=late)
    assert stop is not None and stop.what == "bandwidth"
    assert stop.until == next_utc_day(late) == dt.datetime(2026, 3, 2, tzinfo=dt.UTC)
    # The new day starts from nothing (its own usage row), and a lift holds for its day only.
    assert quota_stop(**{**figures, "bytes_today": 0}, now=stop.until) is None
    assert quota_stop(**{**figures, "lifted_day": late.date()}, now=late) is None
    assert quota_stop(**{**figures, "lifted_day": late.date()}, now=late + dt.timedelta(days=1)) is not None
    cpu = quota_stop(**{**figures, "bytes_today": 0, "cpu_seconds_today": 600.0}, now=late)
    assert cpu is not None and cpu.what == "cpu" and "CPU" in cpu.message


def test_usage_range_is_checked(cloud: LocalCloud, sites: dict[str, Any]) -> None:
    token = sites["tenant"]["token"]
    for query, words in (
        ("?from=2026-13-01", "YYYY-MM-DD"),
        ("?from=2026-03-02&to=2026-03-01", "after"),
        ("?from=2020-01-01&to=2026-01-01", "at most"),
    ):
        with pytest.raises(urllib.error.HTTPError) as bad:
            _api(cloud, f"/api/v1/sites/other/usage{query}", token=token)
        with bad.value:
            assert bad.value.code == 400 and words in bad.value.read().decode()
    # Another tenant's site, or none, is not found; the export is an admin's.
    with pytest.raises(urllib.error.HTTPError) as missing:
        _api(cloud, "/api/v1/sites/nosuch/usage", token=token)
    with missing.value:
        assert missing.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as forbidden:
        _api(cloud, "/api/v1/usage", token=token)
    with forbidden.value:
        assert forbidden.value.code == 403
