"""Prometheus metrics and the front end's /healthz, scraped from real role processes with real clients.

A front end of its own (a PKI, no cloud) shows /healthz before and after its first snapshot, the plain
metrics port and the folding of per-site series; one ``sitecloud up`` cloud shows every role's /metrics
over mTLS and counters that rise by exactly the requests sent.
"""

from __future__ import annotations

import ftplib
import http.client
import io
import json
import ssl
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from roles.frontend.config import FrontendConfig
from roles.worker.config import WorkerConfig
from shared.config import ROLE_KINDS
from shared.net import free_port
from shared.tls import client_context_from_files
from tests.cloud import LocalCloud, running_cloud
from tests.support import CloudPKI, RoleProcess, call, lane_exchange, wait_until

DOMAIN = "sites.test"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def scrape(url: str, ctx: ssl.SSLContext | None) -> Samples:
    with urllib.request.urlopen(f"{url}/metrics", context=ctx, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return parse(resp.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def plain_get(port: int, host: str, path: str = "/") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# -- one front end, no cloud -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fe_pki(tmp_path_factory: pytest.TempPathFactory) -> CloudPKI:
    return CloudPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def frontend(fe_pki: CloudPKI, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RoleProcess]:
    config = fe_pki.role_config(
        FrontendConfig,
        "frontend",
        tmp_path_factory.mktemp("frontend"),
        metrics_port=free_port(),
        metrics_top_sites=2,
        usage_interval=0,
        connect_timeout=1.0,
    )
    fe_pki.ca.issue_wildcard(DOMAIN).write(config.wildcard_key_file, config.wildcard_cert_file)
    proc = RoleProcess(config, fe_pki)
    with proc.running():
        yield proc


def test_healthz_is_503_with_a_reason_before_a_snapshot_and_200_after(frontend: RoleProcess) -> None:
    config = frontend.config
    assert isinstance(config, FrontendConfig)
    status, body = plain_get(config.http_port, "127.0.0.1", "/healthz")
    assert status == 503 and b"no config snapshot applied" in body
    frontend.push_config({"version": 1, "domain": DOMAIN, "sites": {}})
    status, body = plain_get(config.http_port, "127.0.0.1", "/healthz")
    assert (status, body) == (200, b"ok\n")
    # A site's own /healthz is the site's: only a name that is no site's gets the front end's.
    closed = free_port()
    frontend.push_config(
        {"version": 2, "domain": DOMAIN, "sites": {"blog": {"workers": [f"localhost:{closed}"]}}}
    )
    status, _ = plain_get(config.http_port, f"blog.{DOMAIN}", "/healthz")
    assert status == 502


def test_metrics_over_mtls_are_for_the_controller_and_management_only(frontend: RoleProcess) -> None:
    for role in ("controller", "management"):
        samples = scrape(frontend.control_url, frontend.pki.client_ssl(role))
        assert value(samples, "sitecloud_config_version") >= 1
        assert (
            value(
                samples,
                "sitecloud_role_info",
                role="frontend",
                host=frontend.config.host,
                code_version=_code_version(samples),
            )
            == 1
        )
        assert value(samples, "process_resident_memory_bytes") > 0
    for role in ("worker", "publisher"):
        status, body = call(f"{frontend.control_url}/metrics", frontend.pki.client_ssl(role))
        assert status == 403, body
        assert "may not call GET /metrics" in body["error"]["message"]


def _code_version(samples: Samples) -> str:
    for (name, labels), _ in samples.items():
        if name == "sitecloud_role_info":
            return dict(labels)["code_version"]
    raise AssertionError("no sitecloud_role_info")


def test_per_site_series_are_the_busiest_sites_and_the_rest_folded(frontend: RoleProcess) -> None:
    config = frontend.config
    assert isinstance(config, FrontendConfig)
    closed = f"localhost:{free_port()}"
    sites = {name: {"workers": [closed]} for name in ("a", "b", "c", "d")}
    frontend.push_config({"version": 10, "domain": DOMAIN, "sites": sites})
    plain = f"http://127.0.0.1:{config.metrics_port}"
    before = scrape(plain, None)
    sent = {"a": 5, "b": 4, "c": 2, "d": 1}
    for name, n in sent.items():
        for _ in range(n):
            status, _ = plain_get(config.http_port, f"{name}.{DOMAIN}")
            assert status == 502  # no worker listens: answered all the same
    after = scrape(plain, None)  # the plain port: no client certificate
    # It answers /metrics and nothing else (no config, no health), on loopback.
    status, body = plain_get(config.metrics_port, "127.0.0.1", "/v1/health")
    assert status == 404 and b"no such endpoint" in body
    site_series = {
        dict(labels)["site"] for name, labels in after if name == "sitecloud_frontend_site_requests_total"
    }
    assert site_series == {"a", "b", "_other"}
    assert value(after, "sitecloud_frontend_site_requests_total", site="a") == 5
    assert value(after, "sitecloud_frontend_site_requests_total", site="b") == 4
    assert value(after, "sitecloud_frontend_site_requests_total", site="_other") == 3 + value(
        before, "sitecloud_frontend_site_requests_total", site="_other"
    ) + sum(value(before, "sitecloud_frontend_site_requests_total", site=s) for s in ("c", "d", "blog"))
    grew = value(after, "sitecloud_frontend_requests_total", code="5xx") - value(
        before, "sitecloud_frontend_requests_total", code="5xx"
    )
    assert grew == 12
    count = value(after, "sitecloud_frontend_request_duration_seconds_count") - value(
        before, "sitecloud_frontend_request_duration_seconds_count"
    )
    assert count == 12
    assert value(after, "sitecloud_frontend_site_received_bytes_total", site="a") > 0
    assert value(after, "sitecloud_frontend_site_sent_bytes_total", site="a") > 0


# -- one cloud, every role -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCloud]:
    yield from running_cloud(tmp_path_factory)


@pytest.fixture(scope="module")
def site(cloud: LocalCloud) -> dict[str, Any]:
    cloud.cli("plan", "create", "basic", "--max-sites", "2", "--storage-mb", "5")
    cloud.cli("tenant", "create", "contoso")
    sub = cloud.cli("subscription", "create", "--tenant", "contoso", "--plan", "basic")
    blog: dict[str, Any] = cloud.cli("site", "create", "blog", "--subscription", str(sub["id"]))
    wait_until(lambda: cloud.get("blog")[0] == 200, timeout=20, what="the new site to be served")
    return blog


def _controls(cloud: LocalCloud) -> tuple[dict[str, str], ssl.SSLContext]:
    """Every role's control URL, and a client with the controller's own certificate."""
    ports = json.loads((cloud.home / "cloud.json").read_text())["internal_ports"]
    tls = cloud.home / "controller" / "tls"
    ctx = client_context_from_files(tls / "role.pem", tls / "role.key", tls / "ca.pem")
    urls = {kind: f"https://localhost:{port}" for kind, port in ports.items() if kind in ROLE_KINDS}
    return urls, ctx


def test_every_role_answers_metrics_over_mtls(cloud: LocalCloud, site: dict[str, Any]) -> None:
    urls, ctx = _controls(cloud)
    assert set(urls) >= {"controller", "management", "frontend", "worker", "fileserver", "publisher"}
    for kind, url in urls.items():
        samples = scrape(url, ctx)
        assert value(samples, "process_cpu_seconds_total") > 0, kind
        assert value(samples, "sitecloud_config_version") >= 1, kind
        assert any(
            name == "sitecloud_role_info" and dict(labels)["role"] == kind for name, labels in samples
        ), kind

    # The controller: every role it runs counted by state, none behind on its config once settled.
    def settled() -> Samples | None:
        samples = scrape(urls["controller"], ctx)
        ready = value(samples, "sitecloud_controller_roles", state="Ready")
        lag = sum(v for (name, _), v in samples.items() if name == "sitecloud_controller_role_config_lag")
        return samples if ready == len(urls) - 1 and lag == 0 else None

    samples = wait_until(settled, timeout=20, what="every role Ready and on the newest config")
    assert value(samples, "sitecloud_controller_reconcile_duration_seconds_count") >= 1


def test_seven_gets_raise_the_front_end_and_worker_2xx_counters_by_seven(
    cloud: LocalCloud, site: dict[str, Any]
) -> None:
    urls, ctx = _controls(cloud)

    def twoxx() -> tuple[float, float, float]:
        fe, w = scrape(urls["frontend"], ctx), scrape(urls["worker"], ctx)
        return (
            value(fe, "sitecloud_frontend_requests_total", code="2xx"),
            value(w, "sitecloud_worker_requests_total", code="2xx"),
            value(fe, "sitecloud_frontend_site_requests_total", site="blog"),
        )

    before = twoxx()
    for _ in range(7):
        assert cloud.get("blog")[0] == 200
    # Serving processes hand their counts over about once a second.
    wait_until(lambda: twoxx()[0] - before[0] >= 7 and twoxx()[1] - before[1] >= 7, timeout=5, what="counts")
    after = twoxx()
    assert (after[0] - before[0], after[1] - before[1], after[2] - before[2]) == (7, 7, 7)


def test_publisher_and_fileserver_count_logins_uploads_and_commits(
    cloud: LocalCloud, site: dict[str, Any]
) -> None:
    urls, ctx = _controls(cloud)
    pub0, fs0 = scrape(urls["publisher"], ctx), scrape(urls["fileserver"], ctx)
    ftp_host, ftp_port = site["ftp"]["host"], site["ftp"]["port"]
    bad = ftplib.FTP()
    bad.connect(ftp_host, ftp_port, timeout=10)
    with pytest.raises(ftplib.error_perm):
        bad.login(site["ftp"]["user"], "not the password")
    bad.close()
    ftp = ftplib.FTP()
    ftp.connect(ftp_host, ftp_port, timeout=10)
    ftp.login(site["ftp"]["user"], site["ftp"]["password"])
    page = b"<h1>metrics</h1>" * 64
    ftp.storbinary("STOR index.html", io.BytesIO(page))
    ftp.quit()
    cloud.wait_for_content("blog", "/", page)
    pub, fs = scrape(urls["publisher"], ctx), scrape(urls["fileserver"], ctx)

    def grew(a: Samples, b: Samples, name: str) -> float:
        return value(b, name) - value(a, name)

    assert grew(pub0, pub, "sitecloud_publisher_logins_failed_total") == 1
    assert grew(pub0, pub, "sitecloud_publisher_ftp_sessions_opened_total") == 2
    assert grew(pub0, pub, "sitecloud_publisher_ftp_received_bytes_total") == len(page)
    assert grew(fs0, fs, "sitecloud_fileserver_commits_total") == 1
    assert grew(fs0, fs, "sitecloud_fileserver_blobs_stored_total") == 1
    assert value(fs, "sitecloud_fileserver_stored_bytes") >= len(page)


def test_serving_processes_counts_are_summed_by_the_main_process(
    fe_pki: CloudPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = fe_pki.role_config(
        FrontendConfig,
        "frontend",
        tmp_path_factory.mktemp("frontend2"),
        processes=2,
        usage_interval=0,
        connect_timeout=1.0,
    )
    fe_pki.ca.issue_wildcard(DOMAIN).write(config.wildcard_key_file, config.wildcard_cert_file)
    with RoleProcess(config, fe_pki).running() as proc:
        ctx = fe_pki.client_ssl("management")
        assert len(proc.health()["serving_pids"]) == 2
        assert plain_get(config.http_port, "127.0.0.1", "/healthz")[0] == 503
        closed = f"localhost:{free_port()}"
        proc.push_config({"version": 1, "domain": DOMAIN, "sites": {"blog": {"workers": [closed]}}})
        # Each serving process takes the snapshot on its own: both must answer 200.
        wait_until(
            lambda: all(plain_get(config.http_port, "127.0.0.1", "/healthz")[0] == 200 for _ in range(6)),
            timeout=10,
            what="every serving process to have routes",
        )
        # The health checks above are counted too: let the serving processes hand them over first.
        time.sleep(1.5)
        before = scrape(proc.control_url, ctx)
        for _ in range(8):  # a connection each: the kernel spreads them over both processes
            assert plain_get(config.http_port, f"blog.{DOMAIN}")[0] == 502

        def summed() -> Samples | None:
            now = scrape(proc.control_url, ctx)
            grew = value(now, "sitecloud_frontend_site_requests_total", site="blog") - value(
                before, "sitecloud_frontend_site_requests_total", site="blog"
            )
            return now if grew >= 8 else None

        after = wait_until(summed, timeout=5, what="the serving processes' counts")
        assert (
            value(after, "sitecloud_frontend_site_requests_total", site="blog")
            - value(before, "sitecloud_frontend_site_requests_total", site="blog")
            == 8
        )
        assert (
            value(after, "sitecloud_frontend_requests_total", code="5xx")
            - value(before, "sitecloud_frontend_requests_total", code="5xx")
            == 8
        )


def test_a_workers_serving_processes_counts_are_summed_per_site(
    fe_pki: CloudPKI, tmp_path_factory: pytest.TempPathFactory
) -> None:
    config = fe_pki.role_config(WorkerConfig, "worker", tmp_path_factory.mktemp("worker"), processes=2)
    with RoleProcess(config, fe_pki).running() as proc:
        nowhere = f"https://localhost:{free_port()}"  # no fileserver: the site's content is pending
        proc.push_config(
            {"version": 1, "fileserver": nowhere, "sites": {"blog": {"uid": "0123456789abcdef"}}}
        )
        ctx = fe_pki.client_ssl("controller")
        wait_until(lambda: len(proc.health()["serving_pids"]) == 2, timeout=10, what="two serving processes")
        before = scrape(proc.control_url, ctx)
        head = b"GET / HTTP/1.1\r\nHost: blog\r\nX-Sitecloud-Site: blog\r\n\r\n"
        statuses = []
        for _ in range(6):  # a connection each, spread over both processes
            statuses += [a.status for a in lane_exchange(fe_pki, config.data_port, [head, head], lane=False)]
        assert len(statuses) == 12

        def grew(samples: Samples, name: str, **labels: str) -> float:
            return value(samples, name, **labels) - value(before, name, **labels)

        def summed() -> Samples | None:
            now = scrape(proc.control_url, ctx)
            return now if grew(now, "sitecloud_worker_site_requests_total", site="blog") >= 12 else None

        after = wait_until(summed, timeout=5, what="the serving processes' counts")
        assert grew(after, "sitecloud_worker_site_requests_total", site="blog") == 12
        by_class = {f"{s // 100}xx": statuses.count(s) for s in statuses}
        for code, n in by_class.items():
            assert grew(after, "sitecloud_worker_requests_total", code=code) == n
        assert grew(after, "sitecloud_worker_site_sent_bytes_total", site="blog") > 0
        assert grew(after, "sitecloud_worker_request_duration_seconds_count") == 12


def test_an_app_start_is_counted_with_its_cold_start_time(cloud: LocalCloud, site: dict[str, Any]) -> None:
    urls, ctx = _controls(cloud)
    sub = cloud.cli("subscription", "list")["subscriptions"][0]
    app = cloud.cli("site", "create", "coldapp", "--subscription", str(sub["id"]))
    ftp = ftplib.FTP()
    ftp.connect(app["ftp"]["host"], app["ftp"]["port"], timeout=10)
    ftp.login(app["ftp"]["user"], app["ftp"]["password"])
    code = b"def app(environ, start_response):\n    start_response('200 OK', [])\n    return [b'cold']\n"
    ftp.storbinary("STOR app.py", io.BytesIO(code))
    ftp.quit()
    cloud.cli("site", "set", "coldapp", "runtime=python", "entry=app:app")
    wait_until(lambda: cloud.get("coldapp")[::2] == (200, b"cold"), timeout=60, what="the app to answer")
    samples = scrape(urls["worker"], ctx)
    assert value(samples, "sitecloud_worker_app_starts_total") >= 1
    assert value(samples, "sitecloud_worker_app_cold_start_seconds_count") >= 1
    assert value(samples, "sitecloud_worker_app_cold_start_seconds_sum") > 0
    assert value(samples, "sitecloud_worker_app_cold_start_seconds_bucket", le="+Inf") >= 1
