"""``python -m roles.publisher --config <home>/role.json``: FTP, web deploy (zip, Kudu zip deploy and
git push), written through the fileserver."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from aiohttp import web
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from roles.publisher._deploy import Deployer
from roles.publisher._ftp import FtpServer
from roles.publisher._git import GitDeploy
from roles.publisher._sites import Credentials, SiteTable
from roles.publisher._throttle import LoginThrottle
from roles.publisher.config import PublisherConfig
from shared.contracts.health import PublisherFigures
from shared.contracts.snapshots import PublisherSnapshot
from shared.control import ControlPlane
from shared.listeners import listener
from shared.logs import get_logger
from shared.metrics import FiguresCollector
from shared.process import role_main
from shared.states import HealthStatus
from shared.tls import client_context, public_server_context

__all__ = ["serve"]


async def serve(config: PublisherConfig, stop: asyncio.Event) -> None:
    log = get_logger(config.role, host=config.host)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        # pyftpdlib logs every command at INFO; sitecloud logs logins and uploads itself.
        logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
    sites = SiteTable()
    credentials = Credentials()
    internal_tls = client_context(config)
    # One throttle for both doors: guesses over FTP and web deploy count together.
    throttle = LoginThrottle(
        per_account=config.login_failures_per_account,
        per_address=config.login_failures_per_address,
        window=config.login_failure_window,
        max_entries=config.login_throttle_entries,
    )
    deployer = Deployer(config, sites, credentials, internal_tls, throttle)
    git = GitDeploy(config, sites, deployer)
    ftp = FtpServer(config, sites, credentials, internal_tls, throttle)

    async def apply(snapshot: PublisherSnapshot) -> None:
        sites.apply(snapshot)
        deployer.deployments.forget_sites_except(sites.names())
        await asyncio.to_thread(git.sweep)

    def health() -> PublisherFigures:
        figures = PublisherFigures(
            ftp_port=ftp.address[1],
            deploy_port=config.deploy_port,
            ftp_sessions=ftp.sessions,
            ftp_tls=config.ftp_tls,
            login_throttle_entries=throttle.entries,
            sites=len(sites),
        )
        if sites.configured and not sites.fileserver:
            # Logins work, but nothing can be read or stored until a file server runs again.
            stalled = PublisherFigures(
                status=HealthStatus.DEGRADED,
                reason="no fileserver is running: uploads and deploys are refused until one runs",
            )
            return PublisherFigures.merge(figures, stalled)
        return figures

    plane = ControlPlane(config, PublisherSnapshot, apply, health=health, routes=deployer.control_routes())

    def metrics() -> Iterator[Metric]:
        totals = ftp.totals()
        yield GaugeMetricFamily("sitecloud_publisher_ftp_sessions", "FTP sessions open.", value=ftp.sessions)
        yield CounterMetricFamily(
            "sitecloud_publisher_ftp_sessions_opened", "FTP sessions since start.", value=totals["sessions"]
        )
        yield CounterMetricFamily(
            "sitecloud_publisher_ftp_received_bytes", "Bytes uploaded over FTP.", value=totals["bytes_in"]
        )
        yield CounterMetricFamily(
            "sitecloud_publisher_ftp_sent_bytes", "Bytes downloaded over FTP.", value=totals["bytes_out"]
        )
        yield CounterMetricFamily(
            "sitecloud_publisher_ftp_cache_hits",
            "FTP downloads of big files sent from the publisher's own copy.",
            value=totals["cache_hits"],
        )
        yield GaugeMetricFamily(
            "sitecloud_publisher_ftp_cache_bytes",
            "Bytes of the publisher's own copies of big files.",
            value=totals["cache_bytes"],
        )
        yield CounterMetricFamily(
            "sitecloud_publisher_logins_failed",
            "Failed logins (FTP and web deploy).",
            value=throttle.failures,
        )
        yield CounterMetricFamily(
            "sitecloud_publisher_logins_throttled",
            "Logins refused for too many failures (FTP and web deploy).",
            value=throttle.refusals,
        )
        deploys = CounterMetricFamily("sitecloud_publisher_deploys", "Web deploys.", labels=["result"])
        deploys.add_metric(["deployed"], deployer.deploys)
        deploys.add_metric(["refused"], deployer.deploys_refused)
        yield deploys
        yield GaugeMetricFamily("sitecloud_publisher_sites", "Sites this publisher serves.", value=len(sites))

    plane.metrics.register(FiguresCollector(metrics))
    await plane.load_last_known_good()
    runner = web.AppRunner(deployer.public_app(git.routes()), access_log=None, shutdown_timeout=5)
    try:
        await plane.start()
        await runner.setup()
        tls = public_server_context(config.cert_file, config.key_file)
        deploy = listener("deploy", config.bind, config.deploy_port)
        await web.SockSite(runner, deploy, ssl_context=tls).start()
        ftp.start()
        log.info("web deploy (zip, zipdeploy, git) on %s:%s", config.bind, config.deploy_port)
        await stop.wait()
    finally:
        log.info("stopping")
        await asyncio.to_thread(ftp.stop)
        await runner.cleanup()
        await git.close()
        await plane.stop()


if __name__ == "__main__":
    role_main(PublisherConfig, serve)
