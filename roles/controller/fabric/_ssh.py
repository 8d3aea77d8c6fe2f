"""SSH access to role hosts: the controller's own key, host keys pinned on first contact, timeouts.

The controller's key lives in ``<cloud home>/controller/ssh/id_ed25519`` (0600). The first time the
controller reaches a host it records the host key in ``<cloud home>/controller/ssh/known_hosts``
(OpenSSH format); from then on a host offering another key is refused, since that is what a machine in
the middle looks like. Re-pinning is deliberate: :meth:`SshAccess.forget` (after a host was rebuilt).
"""

from __future__ import annotations

import asyncio
import os
import shlex
from pathlib import Path

import asyncssh

from roles.controller.fabric.base import SshTarget
from shared.errors import Forbidden, SitecloudError, Unauthorized, Unavailable
from shared.files import atomic_write_bytes

__all__ = ["SshAccess", "run_checked"]

_CONNECT_TIMEOUT = 10.0
_LOGIN_TIMEOUT = 15.0


def _pattern(host: str, port: int) -> str:
    """The host field of a known_hosts line, as OpenSSH writes it."""
    return host if port == 22 else f"[{host}]:{port}"


def _key_text(key: asyncssh.SSHKey) -> str:
    """``<algorithm> <base64>``: the part of a public key line that identifies the key."""
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


class _PinningClient(asyncssh.SSHClient):
    """Sees the host key asyncssh could not match against the pin, and decides about it."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self.offered: asyncssh.SSHKey | None = None

    def validate_host_public_key(self, host: str, addr: str, port: int, key: asyncssh.SSHKey) -> bool:
        # Only called for a key that is not the pinned one: refuse it if there is a pin, else take it
        # (first contact); the caller pins it once the login succeeded.
        self.offered = key
        return not self.pinned


class SshAccess:
    """The controller's SSH identity and pinned host keys, and connections made with them."""

    def __init__(self, ssh_dir: Path, *, connect_timeout: float = _CONNECT_TIMEOUT) -> None:
        self.ssh_dir = ssh_dir
        self.key_file = ssh_dir / "id_ed25519"
        self.public_key_file = ssh_dir / "id_ed25519.pub"
        self.known_hosts_file = ssh_dir / "known_hosts"
        self.connect_timeout = connect_timeout
        self._pin_lock = asyncio.Lock()

    @classmethod
    def for_cloud(cls, cloud_home: Path) -> SshAccess:
        return cls(cloud_home / "controller" / "ssh")

    # -- the controller's key ---------------------------------------------------------------------

    def ensure_key(self) -> str:
        """The controller's public key line; the key pair is made (0600) the first time."""
        self.ssh_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.ssh_dir, 0o700)
        if not self.key_file.exists():
            key = asyncssh.generate_private_key("ssh-ed25519", comment="sitecloud-controller")
            atomic_write_bytes(self.key_file, key.export_private_key("openssh"), mode=0o600)
            atomic_write_bytes(self.public_key_file, key.export_public_key("openssh"), mode=0o644)
        elif not self.public_key_file.exists():
            key = asyncssh.read_private_key(self.key_file)
            atomic_write_bytes(self.public_key_file, key.export_public_key("openssh"), mode=0o644)
        return self.public_key_file.read_text().strip()

    # -- pinned host keys -------------------------------------------------------------------------

    def _lines(self) -> list[str]:
        try:
            return self.known_hosts_file.read_text().splitlines()
        except FileNotFoundError:
            return []

    def pinned(self, host: str, port: int = 22) -> str | None:
        """The pinned ``<algorithm> <base64>`` of a host, if it has one."""
        pattern = _pattern(host, port)
        for line in self._lines():
            fields = line.split()
            if len(fields) >= 3 and pattern in fields[0].split(","):
                return f"{fields[1]} {fields[2]}"
        return None

    def _rewrite(self, host: str, port: int, key_text: str | None) -> None:
        pattern = _pattern(host, port)
        kept = [ln for ln in self._lines() if not (ln.split() and pattern in ln.split()[0].split(","))]
        if key_text is not None:
            kept.append(f"{pattern} {key_text}")
        self.ssh_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.known_hosts_file, "".join(f"{ln}\n" for ln in kept).encode(), mode=0o600)

    async def pin(self, host: str, key_text: str, port: int = 22) -> None:
        """Pin a host key the caller knows for certain (a fabric that made the host's key itself)."""
        async with self._pin_lock:
            self._rewrite(host, port, key_text)

    async def forget(self, host: str, port: int = 22) -> None:
        """Drop a host's pin, so the next connection pins whatever key it offers then."""
        async with self._pin_lock:
            self._rewrite(host, port, None)

    # -- connections ------------------------------------------------------------------------------

    async def connect(self, target: SshTarget) -> asyncssh.SSHClientConnection:
        """A logged-in connection to ``target``, or a SitecloudError that says what to do about it."""
        key_file = target.key_file or self.key_file
        if target.key_file is None:
            self.ensure_key()
        pinned_text = self.pinned(target.address, target.port)
        trusted = [asyncssh.import_public_key(pinned_text)] if pinned_text else []
        client = _PinningClient(pinned=bool(pinned_text))
        where = f"{target.user}@{target.address}:{target.port}"
        try:
            conn = await asyncssh.connect(
                target.address,
                target.port,
                username=target.user,
                client_keys=[str(key_file)],
                known_hosts=(trusted, [], []),
                client_factory=lambda: client,
                # Nothing from the environment: no ~/.ssh/config, no agent, no password prompts.
                config=[],
                agent_path=None,
                password=None,
                preferred_auth="publickey",
                connect_timeout=self.connect_timeout,
                login_timeout=_LOGIN_TIMEOUT,
                keepalive_interval=15,
            )
        except asyncssh.HostKeyNotVerifiable as exc:
            if client.pinned and client.offered is not None:
                raise Forbidden(
                    f"the SSH host key of {target.address} changed: it offers "
                    f"{client.offered.get_fingerprint()}, but {self.known_hosts_file} pins "
                    f"{asyncssh.import_public_key(pinned_text or '').get_fingerprint()}",
                    hint=(
                        f"if {target.address} was rebuilt on purpose, delete its line from "
                        f"{self.known_hosts_file} and connect again to pin the new key; "
                        "otherwise something may be intercepting the connection"
                    ),
                ) from exc
            raise Unavailable(f"cannot verify the SSH host key of {where}: {exc.reason}") from exc
        except asyncssh.PermissionDenied as exc:
            raise Unauthorized(
                f"{where} refused the controller's SSH key",
                hint=f"add the line in {self.public_key_file} to ~{target.user}/.ssh/authorized_keys there",
            ) from exc
        except (OSError, TimeoutError, asyncssh.Error) as exc:
            raise Unavailable(
                f"cannot reach {where} over SSH: {exc or type(exc).__name__}",
                hint=f"check that {target.address} resolves from the controller and sshd runs there",
            ) from exc
        if not client.pinned and client.offered is not None:
            async with self._pin_lock:
                # Another connection may have pinned it meanwhile; pin only if still unpinned.
                if self.pinned(target.address, target.port) is None:
                    self._rewrite(target.address, target.port, _key_text(client.offered))
        return conn


async def run_checked(
    conn: asyncssh.SSHClientConnection, argv: list[str] | str, *, what: str, timeout: float = 300.0
) -> str:
    """Run a command on the host; its stdout, or a SitecloudError with the tail of its stderr."""
    command = argv if isinstance(argv, str) else shlex.join(argv)
    try:
        result = await conn.run(command, check=False, timeout=timeout)
    except asyncssh.TimeoutError as exc:
        raise SitecloudError(f"{what} took longer than {timeout:.0f}s") from exc
    except (OSError, asyncssh.Error) as exc:
        raise Unavailable(f"{what}: the SSH connection failed: {exc}") from exc
    if result.exit_status != 0:
        err = str(result.stderr or "").strip() or str(result.stdout or "").strip()
        tail = "\n".join(err.splitlines()[-15:])
        raise SitecloudError(f"{what} failed (exit {result.exit_status}): {tail}")
    return str(result.stdout or "")
