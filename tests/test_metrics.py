"""Prometheus metrics and the front end's /healthz, scraped from real role processes with real clients.

A front end of its own (a PKI, no cloud) shows /healthz before and after its first snapshot, the plain
metrics port and the folding of per-site series; one ``sitecloud up`` cloud shows every role's /metrics
over mTLS and counters that rise by exactly the requests sent.
"""

from __future__ import annotations

import http.client
import ssl
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from roles.frontend.config import FrontendConfig
from shared.net import free_port
from tests.support import CloudPKI, RoleProcess, call

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
