"""A whole cloud started through `sitecloud up`'s own code path, on free ports, for end-to-end tests."""

from __future__ import annotations

import contextlib
import ftplib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from bench.harness.clients import SiteConnection, https_get
from roles.worker.apps._isolation import reap_orphans
from shared.net import free_port, free_port_range
from tests.forked_cli import run_cli
from tests.support import wait_until

__all__ = ["LocalCloud", "SiteConnection", "basic_tenant", "https_get", "site_ftp"]

# Every test cloud builds role-host wheelhouses here (once per code version, kept across runs).
TEST_WHEELHOUSE = Path("/tmp/sitecloud-test-wheelhouse")


class LocalCloud:
    def __init__(
        self,
        home: Path,
        *,
        db_url: str = "",
        extra_args: tuple[str, ...] = (),
        settings: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self.home = home
        self.db_url = db_url
        # More `sitecloud up` options, e.g. ("--local-roles", "management").
        self.extra_args = extra_args
        # The admin's role settings in HOME/cloud.json, by role: shorter waits than the product's, where
        # a test waits for one.
        self.settings = dict(settings or {})
        self.ports = {
            name: free_port() for name in ("http_port", "https_port", "ftp_port", "api_port", "deploy_port")
        }
        low = free_port_range(21)
        self.passive = (low, low + 20)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = home.parent / f"{home.name}-up.log"

    @property
    def domain(self) -> str:
        return "sites.localhost"

    @property
    def ca_file(self) -> Path:
        return self.home / "ca" / "ca.pem"

    def _up_argv(self, *, json_output: bool = True) -> list[str]:
        argv = [sys.executable, "-m", "roles.management.cli", "up", "--home", str(self.home)]
        argv += ["--json"] if json_output else []
        for name, port in self.ports.items():
            argv += [f"--{name.replace('_', '-')}", str(port)]
        argv += ["--passive-ports", f"{self.passive[0]}-{self.passive[1]}"]
        if self.db_url:
            argv += ["--db", self.db_url]
        return argv + list(self.extra_args)

    def _write_settings(self) -> None:
        if not self.settings:
            return
        state_file = self.home / "cloud.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        self.home.mkdir(parents=True, exist_ok=True)
        state_file.write_text(json.dumps({**state, **self.settings}))

    def start(self, timeout: float = 60.0) -> dict[str, Any]:
        self._write_settings()
        argv = self._up_argv()
        endpoints = self.home / "endpoints.json"
        endpoints.unlink(missing_ok=True)
        log = self.log_path.open("ab")
        env = {"SITECLOUD_WHEELHOUSE": str(TEST_WHEELHOUSE), **os.environ}
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"sitecloud up exited with {self.proc.returncode}:\n{self.log()}")
            return endpoints.exists()

        try:
            wait_until(ready, timeout=timeout, interval=0.1, what="sitecloud up to be ready")
        except AssertionError as err:
            message = f"{err}\n{self.log()}\n{self.role_logs()}"
            # A cloud that never came up leaves nothing running for later tests to trip on.
            self.kill_everything()
            raise AssertionError(message) from None
        return dict(json.loads(endpoints.read_text()))

    def up_refused(self, *, json_output: bool, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        """Run another `sitecloud up` on this home that is expected to be refused at once; one that
        runs on instead is stopped (with whatever it started) and fails the test."""
        env = {"SITECLOUD_WHEELHOUSE": str(TEST_WHEELHOUSE), **os.environ}
        proc = subprocess.Popen(
            self._up_argv(json_output=json_output),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            stdout, stderr = proc.communicate(timeout=30)
            if self.proc is None:  # a home of its own: nothing of it may outlive the test
                self.kill_everything()
            raise AssertionError(f"`sitecloud up` was not refused within {timeout}s:\n{stderr}") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def role_logs(self) -> str:
        out = []
        for path in sorted((self.home / "logs").glob("*.log")):
            out.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(out)

    def _log_tail(self, name: str, size: int = 6000) -> str:
        try:
            return (self.home / "logs" / name).read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def role_pids(self) -> dict[str, int]:
        pids = {}
        for pidfile in (self.home / "roles").glob("*/role.pid"):
            pids[pidfile.parent.name] = int(pidfile.read_text())
        return pids

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, as Ctrl-C would: the controller stops every role, then exits."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"sitecloud up did not stop within {timeout}s:\n{self.log()}") from None

    def kill_controller(self) -> None:
        """The controller dies; the roles it started stay up."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def kill_everything(self) -> None:
        """Teardown: a clean stop if the controller is still there, then nothing of this cloud left."""
        if self.proc is not None and self.proc.poll() is None:
            # A stop that overran has killed it already; the sweep below finishes the job.
            with contextlib.suppress(AssertionError):
                self.stop()
        for pid in self.role_pids().values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        # Site apps run in sessions of their own: a worker that was killed leaves them behind.
        reap_orphans(self.home / "roles" / "worker" / "apps")

    def cli(self, *args: str, token: str | None = None, check: bool = True, timeout: float = 60) -> Any:
        """Run `sitecloud --home HOME ... --json` and return its parsed JSON output."""
        env = {**os.environ}
        if token:
            env["SITECLOUD_TOKEN"] = token
        proc = run_cli(["--home", str(self.home), *args, "--json"], env=env, timeout=timeout)
        if check and proc.returncode != 0:
            # An internal error's cause is in management's log, which goes with the cloud's home.
            logged = self._log_tail("management.log") if b"internal_error" in proc.stdout else ""
            raise AssertionError(
                f"sitecloud {' '.join(args)} failed ({proc.returncode}): {proc.stdout!r} {proc.stderr!r}"
                + (f"\n--- management.log ---\n{logged}" if logged else "")
            )
        out = proc.stdout.decode().strip()
        return json.loads(out) if out else None

    def cli_text(self, *args: str, timeout: float = 60) -> str:
        """Run `sitecloud --home HOME ...` as a person would (no --json) and return what it printed."""
        proc = run_cli(["--home", str(self.home), *args], env=os.environ, timeout=timeout)
        proc.check_returncode()
        return proc.stdout.decode()

    def get(self, site: str, path: str = "/", **kw: Any) -> tuple[int, dict[str, str], bytes]:
        return https_get(self.ports["https_port"], f"{site}.{self.domain}", path, ca_file=self.ca_file, **kw)

    def wait_for_content(self, site: str, path: str, expected: bytes, timeout: float = 15.0) -> None:
        def served() -> bool:
            status, _, body = self.get(site, path)
            return status == 200 and body == expected

        try:
            wait_until(served, timeout=timeout, what=f"{site}{path} to serve new content")
        except AssertionError:
            status, _, body = self.get(site, path)
            raise AssertionError(
                f"after {timeout}s {site}{path} answers {status} {body[:200]!r}\n{self.role_logs()}"
            ) from None


def running_cloud(
    tmp_path_factory: pytest.TempPathFactory,
    *,
    settings: Mapping[str, Mapping[str, Any]] | None = None,
    home: Path | None = None,
) -> Iterator[LocalCloud]:
    """A module's cloud, as `sitecloud up` starts it with its defaults (but the role ``settings``
    given), at ``home`` (else a new one), and nothing of it left after."""
    cloud = LocalCloud(home or tmp_path_factory.mktemp("cloud") / "home", settings=settings)
    cloud.start()
    try:
        yield cloud
    finally:
        cloud.kill_everything()


def basic_tenant(cloud: LocalCloud) -> dict[str, Any]:
    """Tenant contoso on plan basic (3 sites, 5 MB), with its token and subscription id."""
    cloud.cli("plan", "create", "basic", "--max-sites", "3", "--storage-mb", "5")
    tenant = cloud.cli("tenant", "create", "contoso")
    sub = cloud.cli("subscription", "create", "--tenant", "contoso", "--plan", "basic")
    return {**tenant, "subscription": sub["id"]}


def site_ftp(site: dict[str, Any]) -> ftplib.FTP:
    """A logged-in plain FTP session with a site, from the answer that created it."""
    ftp = ftplib.FTP()
    try:
        ftp.connect(site["ftp"]["host"], site["ftp"]["port"], timeout=10)
        ftp.login(site["ftp"]["user"], site["ftp"]["password"])
    except BaseException:
        ftp.close()
        raise
    return ftp
