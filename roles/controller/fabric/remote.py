"""Installs and runs roles on a host over SSH: wheelhouse, venv, role home, supervision, health.

Layout on the host, under the target's root directory:

    <root>/wheelhouse/<code hash>/   the wheels the controller shipped (the host needs no internet)
    <root>/venvs/<code hash>/        a venv with sitecloud installed from them
    <root>/roles/<kind>/             the role home: role.json, tls/, state/, venv -> ../../venvs/<hash>

Each code version gets its own venv, so an upgrade installs beside the running one and switches the
role home's ``venv`` link. The role runs under systemd where systemd is PID 1 (and we log in as
root), otherwise under :mod:`roles.controller.hostagent`, started detached in its own session.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import platform
import shlex
import ssl
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

import asyncssh

from roles.controller.fabric._ssh import SshAccess, run_checked
from roles.controller.fabric._wheelhouse import Wheelhouse
from roles.controller.fabric.base import ProgressCallback, ProgressStep, RoleLauncher, RoleSpec, SshTarget
from shared.config import RoleConfig, write_role_config
from shared.errors import InvalidInput, NotFound, SitecloudError, Unavailable
from shared.internal import InternalClient
from shared.logs import get_logger
from shared.pki import IssuedCert

__all__ = ["RemoteLauncher"]

# Stop order: front ends first so visitors stop arriving, the content store last.
_STOP_ORDER = ("frontend", "management", "publisher", "worker", "fileserver")
_HEALTH_TIMEOUT = 60.0


class _Steps:
    """Reports each step as it starts and ends, and keeps how long each took."""

    def __init__(self, progress: ProgressCallback | None) -> None:
        self._progress = progress or (lambda _: None)
        self.timings: dict[str, float] = {}

    @contextlib.asynccontextmanager
    async def step(self, name: str, detail: str = "") -> AsyncIterator[None]:
        self._progress(ProgressStep(name, "started", 0.0, detail))
        started = time.monotonic()
        yield
        self.timings[name] = time.monotonic() - started
        self._progress(ProgressStep(name, "done", self.timings[name], detail))


def _q(path: PurePosixPath | str) -> str:
    return shlex.quote(str(path))


class RemoteLauncher(RoleLauncher):
    """Roles on one host reached over SSH."""

    def __init__(
        self,
        host: str,
        target: SshTarget,
        access: SshAccess,
        wheelhouse: Wheelhouse,
        *,
        client_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.target = target
        self._access = access
        self._wheelhouse = wheelhouse
        self._client_ssl = client_ssl
        self._seen: dict[str, tuple[str, str]] = {}
        self._log = get_logger("controller", host=host)

    # -- paths on the host ------------------------------------------------------------------------

    def role_home(self, kind: str) -> PurePosixPath:
        """Where a role's home goes on this host (what the caller puts in its RoleConfig)."""
        return self.target.root / "roles" / kind

    def _venv(self, digest: str) -> PurePosixPath:
        return self.target.root / "venvs" / digest

    def _wheels(self, digest: str) -> PurePosixPath:
        return self.target.root / "wheelhouse" / digest

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[asyncssh.SSHClientConnection]:
        conn = await self._access.connect(self.target)
        try:
            yield conn
        finally:
            conn.close()
            await conn.wait_closed()

    # -- install ----------------------------------------------------------------------------------

    async def install(
        self,
        config: RoleConfig,
        cert: IssuedCert,
        ca_pem: bytes,
        *,
        env: Mapping[str, str] | None = None,
        progress: ProgressCallback | None = None,
        health_timeout: float = _HEALTH_TIMEOUT,
        extra_files: Mapping[str, tuple[bytes, int]] | None = None,
    ) -> dict[str, float]:
        """Put ``config.role`` on this host and run it until its health endpoint answers.

        ``config.home`` is the role home on the host (see :meth:`role_home`). Returns the seconds each
        step took, and ``total``. Installing again (repair) replaces the files and restarts the role.
        ``extra_files`` are more files for the role home (path relative to it → bytes, mode), e.g. the
        front ends' wildcard certificate.
        """
        started = time.monotonic()
        kind, home = config.role, PurePosixPath(str(config.home))
        if not home.is_absolute():
            raise InvalidInput(f"the role home on {self.host} must be an absolute path, not {home}")
        steps = _Steps(progress)
        # The controller's own step: instant when the wheelhouse for this code is warm.
        async with steps.step("wheelhouse"):
            digest, _ = await self._wheelhouse.ensure()
        conn: asyncssh.SSHClientConnection | None = None
        try:
            async with steps.step("connect", f"{self.target.user}@{self.target.address}"):
                conn = await self._access.connect(self.target)
                systemd = await self._probe(conn)
            async with steps.step("upload", f"wheelhouse {digest}"):
                await self._upload(conn, digest)
            async with steps.step("install", f"venv {self._venv(digest)}"):
                await self._install_venv(conn, digest)
            async with steps.step("configure", str(home)):
                await self._configure(conn, config, home, cert, ca_pem, digest, systemd, extra_files or {})
            async with steps.step("start", "systemd" if systemd else "hostagent"):
                await self._start(conn, kind, home, dict(env or {}), restart=True)
        finally:
            if conn is not None:
                conn.close()
                await conn.wait_closed()
        async with steps.step("healthy", config.control_url):
            await self._wait_healthy(config, home, health_timeout)
        steps.timings["total"] = time.monotonic() - started
        self._seen[kind] = ("running", "")
        return steps.timings

    async def _probe(self, conn: asyncssh.SSHClientConnection) -> bool:
        """Check the host's Python can use our wheels; whether the role runs under systemd."""
        script = (
            "import os, platform, sys; "
            "print(sys.version_info[0], sys.version_info[1], platform.machine(), "
            "int(os.path.isdir('/run/systemd/system')))"
        )
        out = await run_checked(conn, [self.target.python, "-c", script], what="checking Python", timeout=30)
        major, minor, machine, has_systemd = out.split()
        mine = (sys.version_info[0], sys.version_info[1], platform.machine())
        if (int(major), int(minor), machine) != mine:
            raise InvalidInput(
                f"{self.host} has Python {major}.{minor} on {machine}; the controller's wheelhouse is for "
                f"Python {mine[0]}.{mine[1]} on {mine[2]}",
                hint=f"install python{mine[0]}.{mine[1]} on {self.host}",
            )
        if self.target.supervisor == "auto":
            return has_systemd == "1" and self.target.user == "root"
        return self.target.supervisor == "systemd"

    async def _upload(self, conn: asyncssh.SSHClientConnection, digest: str) -> None:
        remote = self._wheels(digest)
        async with conn.start_sftp_client() as sftp:
            if await sftp.exists(str(remote / ".complete")):
                return
            scratch = remote.parent / f".{digest}.upload"
            await run_checked(
                conn, f"rm -rf {_q(scratch)} && mkdir -p {_q(scratch)}", what="preparing upload"
            )
            files = [str(p) for p in await asyncio.to_thread(self._wheelhouse.files, digest)]
            await sftp.mput(files, str(scratch), max_requests=128)
            async with sftp.open(str(scratch / ".complete"), "w") as f:
                await f.write(digest + "\n")
        # Renamed into place only once complete, so a broken upload is never installed from.
        await run_checked(
            conn, f"rm -rf {_q(remote)} && mv {_q(scratch)} {_q(remote)}", what="finishing the upload"
        )

    async def _install_venv(self, conn: asyncssh.SSHClientConnection, digest: str) -> None:
        venv, wheels = self._venv(digest), self._wheels(digest)
        # No ensurepip (the slowest part of making a venv): the pip wheel we shipped runs from its zip.
        # No config files either: the host's pip settings must not pull anything from elsewhere.
        script = f"""set -e
umask 022
if [ ! -e {_q(venv / ".complete")} ]; then
  rm -rf {_q(venv)}
  {shlex.quote(self.target.python)} -m venv --without-pip {_q(venv)}
  pip_wheel=$(ls {_q(wheels)}/pip-*.whl | head -n 1)
  PIP_CONFIG_FILE=/dev/null {_q(venv / "bin" / "python")} "$pip_wheel/pip" install --quiet \
    --disable-pip-version-check --no-index --no-compile --find-links {_q(wheels)} sitecloud
  touch {_q(venv / ".complete")}
fi"""
        await run_checked(conn, script, what=f"installing sitecloud into {venv}", timeout=600)

    async def _configure(
        self,
        conn: asyncssh.SSHClientConnection,
        config: RoleConfig,
        home: PurePosixPath,
        cert: IssuedCert,
        ca_pem: bytes,
        digest: str,
        systemd: bool,
        extra_files: Mapping[str, tuple[bytes, int]],
    ) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            # The exact bytes write_role_config writes locally, so role.json reads the same everywhere.
            local = Path(tmp) / "role.json"
            write_role_config(config, local)
            role_json = local.read_bytes()
        tls = home / "tls"
        await run_checked(
            conn,
            f"mkdir -p {_q(tls)} {_q(home / 'state')} && chmod 700 {_q(home)} {_q(tls)} "
            f"&& ln -sfn {_q(self._venv(digest))} {_q(home / 'venv')}",
            what=f"creating {home}",
        )
        files = [
            (home / "role.json", role_json, 0o600),
            (tls / "role.key", cert.key_pem, 0o600),
            (tls / "role.pem", cert.cert_pem, 0o644),
            (tls / "ca.pem", ca_pem, 0o644),
            (home / "supervisor", b"systemd\n" if systemd else b"hostagent\n", 0o644),
        ]
        for rel, (data, mode) in extra_files.items():
            path = home / rel
            if ".." in PurePosixPath(rel).parts or not path.is_relative_to(home):
                raise InvalidInput(f"extra file {rel!r} is not inside the role home")
            files.append((path, data, mode))
        async with conn.start_sftp_client() as sftp:
            for path, data, mode in files:
                await _put_atomic(sftp, path, data, mode)

    # -- supervision ------------------------------------------------------------------------------

    def _unit(self, kind: str, home: PurePosixPath, env: dict[str, str]) -> str:
        environment = " ".join(shlex.quote(f"{k}={v}") for k, v in {**env, "PYTHONUNBUFFERED": "1"}.items())
        return f"""[Unit]
Description=sitecloud {kind}
After=network-online.target

[Service]
ExecStart={home}/venv/bin/python -m roles.{kind} --config {home}/role.json
WorkingDirectory={home}
Environment={environment}
Restart=always
RestartSec=1
KillSignal=SIGTERM
TimeoutStopSec=10

[Install]
WantedBy=multi-user.target
"""

    def _agent(self, action: str, home: PurePosixPath, env: Mapping[str, str] | None = None) -> str:
        python = home / "venv" / "bin" / "python"
        prefix = "env " + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items()) + " " if env else ""
        return (
            f"{prefix}{_q(python)} -m roles.controller.hostagent {action} --config {_q(home / 'role.json')}"
        )

    async def _supervisor(self, conn: asyncssh.SSHClientConnection, home: PurePosixPath) -> str:
        out = await run_checked(
            conn, f"cat {_q(home / 'supervisor')} 2>/dev/null || echo none", what="reading the role home"
        )
        return out.strip()

    async def _start(
        self,
        conn: asyncssh.SSHClientConnection,
        kind: str,
        home: PurePosixPath,
        env: dict[str, str],
        *,
        restart: bool,
    ) -> None:
        mode = await self._supervisor(conn, home)
        if mode == "none":
            raise NotFound(f"{kind} is not installed on {self.host}", hint="add the role to the host first")
        if mode == "systemd":
            unit = f"sitecloud-{kind}"
            async with conn.start_sftp_client() as sftp:
                await _put_atomic(
                    sftp,
                    PurePosixPath(f"/etc/systemd/system/{unit}.service"),
                    self._unit(kind, home, env).encode(),
                    0o644,
                )
            verb = "restart" if restart else "start"
            await run_checked(
                conn,
                f"systemctl daemon-reload && systemctl enable --quiet {unit} && systemctl {verb} {unit}",
                what=f"starting {unit}",
            )
        else:
            await run_checked(
                conn, self._agent("restart" if restart else "start", home, env), what=f"starting {kind}"
            )
        self._seen[kind] = ("running", "")

    async def _wait_healthy(self, config: RoleConfig, home: PurePosixPath, timeout: float) -> None:
        if self._client_ssl is None:
            return
        client = InternalClient(self._client_ssl, timeout=3)
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        try:
            while time.monotonic() < deadline:
                try:
                    await client.get_json(f"{config.control_url}/v1/health")
                    return
                except SitecloudError as err:
                    last = err
                await asyncio.sleep(0.1)
        finally:
            await client.close()
        tail = ""
        with contextlib.suppress(SitecloudError):
            async with self._session() as conn:
                tail = await run_checked(conn, f"tail -n 20 {_q(home / 'role.log')}", what="reading the log")
        self._seen[config.role] = ("failed", f"no health answer within {timeout:.0f}s")
        raise Unavailable(
            f"{config.role} on {self.host} did not answer {config.control_url}/v1/health within "
            f"{timeout:.0f}s (last error: {last})" + (f"; its log ends:\n{tail}" if tail else ""),
            hint=f"see {home}/role.log and {home}/hostagent.log on {self.host}",
        )

    async def status(self, kind: str) -> dict[str, Any]:
        """What the host's supervisor says about a role: state, reason, restarts, pids."""
        home = self.role_home(kind)
        async with self._session() as conn:
            result = await self._status(conn, kind, home)
        return result

    async def _status(
        self, conn: asyncssh.SSHClientConnection, kind: str, home: PurePosixPath
    ) -> dict[str, Any]:
        mode = await self._supervisor(conn, home)
        if mode == "none":
            result: dict[str, Any] = {"state": "stopped", "reason": "not installed", "restarts": 0}
        elif mode == "systemd":
            out = await run_checked(
                conn,
                f"systemctl show -p ActiveState,MainPID,NRestarts,Result sitecloud-{kind}",
                what="asking systemd",
            )
            props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
            active = props.get("ActiveState", "")
            state = {"active": "running", "activating": "running", "failed": "failed"}.get(active, "stopped")
            pid = int(props.get("MainPID", "0") or 0)
            result = {
                "state": state,
                "reason": "" if state != "failed" else props.get("Result", ""),
                "restarts": int(props.get("NRestarts", "0") or 0),
                "role_pid": pid or None,
            }
        else:
            result = json.loads(
                await run_checked(conn, self._agent("status", home), what="asking the hostagent")
            )
        self._seen[kind] = (str(result["state"]), str(result.get("reason", "")))
        return result

    async def start(self, spec: RoleSpec) -> None:
        """Start an installed role (or leave one that already runs alone)."""
        home = PurePosixPath(str(spec.home))
        async with self._session() as conn:
            await self._start(conn, spec.kind, home, dict(spec.env), restart=False)

    async def restart(self, spec: RoleSpec) -> None:
        """Stop the role (it drains on SIGTERM) and start it again."""
        home = PurePosixPath(str(spec.home))
        async with self._session() as conn:
            await self._start(conn, spec.kind, home, dict(spec.env), restart=True)

    async def stop(self, kind: str) -> None:
        async with self._session() as conn:
            await self._stop(conn, kind)

    async def uninstall(self, kind: str) -> None:
        """Stop the role and delete its home (venvs and wheels stay for the host's other roles)."""
        home = self.role_home(kind)
        async with self._session() as conn:
            await self._stop(conn, kind)
            await run_checked(
                conn,
                f"rm -f /etc/systemd/system/sitecloud-{kind}.service 2>/dev/null; rm -rf {_q(home)}",
                what=f"removing {home}",
            )
        self._seen.pop(kind, None)

    async def _stop(self, conn: asyncssh.SSHClientConnection, kind: str) -> None:
        home = self.role_home(kind)
        mode = await self._supervisor(conn, home)
        if mode == "systemd":
            await run_checked(conn, f"systemctl stop sitecloud-{kind}", what=f"stopping {kind}", timeout=60)
        elif mode == "hostagent":
            await run_checked(conn, self._agent("stop", home), what=f"stopping {kind}", timeout=60)
        self._seen[kind] = ("stopped", "")

    async def installed(self) -> list[str]:
        """The roles that have a home on this host."""
        async with self._session() as conn:
            return await self._installed(conn)

    async def _installed(self, conn: asyncssh.SSHClientConnection) -> list[str]:
        roles = self.target.root / "roles"
        out = await run_checked(
            conn,
            f"cd {_q(roles)} 2>/dev/null && ls -1 */supervisor 2>/dev/null || true",
            what="listing roles",
        )
        return sorted(line.split("/", 1)[0] for line in out.splitlines() if "/" in line)

    async def stop_all(self) -> None:
        async with self._session() as conn:
            kinds = await self._installed(conn)
            first = [k for k in _STOP_ORDER if k in kinds]
            for kind in [*first, *(k for k in kinds if k not in first)]:
                await self._stop(conn, kind)

    def describe(self, kind: str) -> tuple[str, str]:
        """As last seen by install, start, stop or :meth:`status` (describe cannot wait on SSH)."""
        return self._seen.get(kind, ("stopped", ""))

    async def ask_supervisor(self, kind: str) -> tuple[str, str]:
        result = await self.status(kind)
        return str(result["state"]), str(result.get("reason", ""))


async def _put_atomic(sftp: asyncssh.SFTPClient, path: PurePosixPath, data: bytes, mode: int) -> None:
    """Write a file on the host so that no reader ever sees it half-written, with ``mode`` from the start."""
    tmp = path.parent / f".{path.name}.tmp"
    attrs = asyncssh.SFTPAttrs(permissions=mode)
    async with sftp.open(str(tmp), "wb", attrs) as f:
        await f.write(data)
    await sftp.chmod(str(tmp), mode)  # the server's umask may have narrowed or kept other bits
    await sftp.posix_rename(str(tmp), str(path))
