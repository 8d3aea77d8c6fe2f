"""The FTP server: pyftpdlib, one thread per session, the site's content on the fileserver as its disk.

pyftpdlib keeps its settings in class attributes; :class:`FtpServer` makes fresh subclasses of the
handler for each server instance instead of changing pyftpdlib's own classes. Its hooks are where
sitecloud steps in: the authorizer checks the pushed credentials, the filesystem is the site's manifest,
and the data channel commits an upload only when the client sent all of it.
"""

from __future__ import annotations

import socket
import ssl
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from pyftpdlib.exceptions import AuthenticationFailed, _RetryError
from pyftpdlib.handlers import DTPHandler, FTPHandler
from pyftpdlib.ioloop import _ERRNOS_RETRY, IOLoop
from pyftpdlib.log import logger as pyftpdlib_logger
from pyftpdlib.servers import ThreadedFTPServer

from roles.publisher._content import SiteContent, Upload
from roles.publisher._fileserver import FileserverClient
from roles.publisher._sites import Credentials, SiteTable
from roles.publisher._vfs import SiteFilesystem
from roles.publisher.config import PublisherConfig
from shared.errors import SitecloudError
from shared.listeners import listener
from shared.logs import ContextLogger, get_logger

__all__ = ["FtpServer", "ftp_reply"]

# Everything a session may do: list, cd, read, append, delete, rename, mkdir, write (no chmod/MFMT).
_PERMS = "elradfmw"
_AUTH_FAILED = "authentication failed"


def ftp_reply(err: SitecloudError) -> str:
    """An error as one FTP reply line (CR/LF in a message would let it forge further replies)."""
    text = " ".join(str(err).split())
    return f"{err.ftp_code} {text}"


@dataclass
class _Context:
    """What every session of one server shares."""

    sites: SiteTable
    credentials: Credentials
    ssl_context: ssl.SSLContext
    log: ContextLogger
    sessions: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Authorizer:
    """pyftpdlib's authorizer interface over the pushed snapshot: user = site, root = the site."""

    def __init__(self, context: _Context) -> None:
        self._context = context

    def validate_authentication(self, username: str, password: str, handler: Any) -> None:
        site = self._context.sites.site_of_user(username)
        # An unknown user and a wrong password get the same answer.
        if site is None or not self._context.credentials.check(site, username, password):
            raise AuthenticationFailed(_AUTH_FAILED)

    def get_home_dir(self, username: str) -> str:
        return "/"

    def has_user(self, username: str) -> bool:
        return self._context.sites.site_of_user(username) is not None

    def has_perm(self, username: str, perm: str, path: str | None = None) -> bool:
        return perm in _PERMS

    def get_perms(self, username: str) -> str:
        return _PERMS

    def get_msg_login(self, username: str) -> str:
        return f"Logged in to site {username}."

    def get_msg_quit(self, username: str) -> str:
        return "Goodbye."

    def impersonate_user(self, username: str, password: str) -> None:
        pass

    def terminate_impersonation(self, username: str) -> None:
        pass


class _DataChannel(DTPHandler):  # type: ignore[misc]  # pyftpdlib has no type hints
    """Commits a finished upload before the 226 reply; anything short of a clean end commits nothing."""

    # Set by pyftpdlib's DTPHandler; declared for the type checker.
    file_obj: Any
    receive: bool
    transfer_finished: bool
    _resp: tuple[Any, ...]
    _closed: bool

    def __init__(self, sock: Any, cmd_channel: Any) -> None:
        self._broken = False
        super().__init__(sock, cmd_channel)
        if self._closed:
            # The client reset the data connection before it was set up; pyftpdlib would then leave
            # the queued transfer without any reply, and the client waiting for one.
            self._abandon_queued_transfer(cmd_channel)

    @staticmethod
    def _abandon_queued_transfer(session: Any) -> None:
        queued_in, queued_out = session._in_dtp_queue, session._out_dtp_queue
        if queued_in is None and queued_out is None:
            return
        session._in_dtp_queue = session._out_dtp_queue = None
        file = queued_in[0] if queued_in is not None else queued_out[2]
        if file is not None:
            file.close()
        session.respond("426 Data connection broken; transfer aborted, nothing was stored.")

    def recv(self, buffer_size: int) -> bytes:
        # pyftpdlib treats a reset like a clean end of stream, which would store a cut-off file.
        try:
            data: bytes = self.socket.recv(buffer_size)
        except OSError as err:
            if err.errno in _ERRNOS_RETRY:
                raise _RetryError from err
            self._broken = True
            self.handle_close()
            return b""
        if not data:
            self.handle_close()
        return data

    def handle_close(self) -> None:
        if self._broken and self.receive and not self._closed:
            self._resp = (
                "426 Connection broken; transfer aborted, nothing was stored.",
                pyftpdlib_logger.info,
            )
            self.close()
            return
        super().handle_close()

    def handle_error(self) -> None:
        err = sys.exc_info()[1]
        if isinstance(err, SitecloudError):
            self._resp = (ftp_reply(err), pyftpdlib_logger.info)
            self.close()
            return
        super().handle_error()

    def close(self) -> None:
        upload = self.file_obj
        if (
            not self._closed
            and isinstance(upload, Upload)
            and not upload.closed
            and upload.committed is None
            and self.receive
            and self.transfer_finished
            and self._resp
            and self._resp[0].startswith("226")
        ):
            try:
                upload.commit()
            except SitecloudError as err:
                self._resp = (ftp_reply(err), pyftpdlib_logger.info)
                self.transfer_finished = False
            except Exception:
                upload.content.log.exception("storing /%s failed", upload.rel)
                self._resp = (
                    "451 The upload could not be stored; nothing was changed.",
                    pyftpdlib_logger.info,
                )
                self.transfer_finished = False
        super().close()


class _Session(FTPHandler):  # type: ignore[misc]  # pyftpdlib has no type hints
    """One FTP control connection. Subclassed per server with ``context`` and the server's settings."""

    context: _Context
    # Set by pyftpdlib's FTPHandler; declared for the type checker.
    _in_dtp_queue: Any

    def __init__(self, conn: Any, server: Any, ioloop: Any = None) -> None:
        self.site_content: SiteContent | None = None
        self._counted = False
        super().__init__(conn, server, ioloop=ioloop)
        if not self._closed:
            with self.context.lock:
                self.context.sessions += 1
                self._counted = True

    # --- login

    def handle_auth_success(self, home: str, password: str, msg_login: str) -> None:
        site = self.context.sites.site_of_user(self.username)
        if site is None:  # the site went away between the password check and here
            self.handle_auth_failed(_AUTH_FAILED, password)
            return
        self._drop_content()
        log = self.context.log.bind(site=site.name, client=f"{self.remote_ip}:{self.remote_port}")
        client = FileserverClient(self.context.sites.fileserver, self.context.ssl_context)
        self.site_content = SiteContent(site, client, log)
        super().handle_auth_success(home, password, msg_login)

    def on_login(self, username: str) -> None:
        if self.site_content is not None:
            self.site_content.log.info("FTP login as %s", username)

    def on_login_failed(self, username: str, password: str) -> None:
        self.context.log.bind(client=f"{self.remote_ip}:{self.remote_port}").warning(
            "FTP login failed for user %r", username
        )

    def flush_account(self) -> None:
        super().flush_account()
        self._drop_content()

    # --- commands

    def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
        content = self.site_content
        if content is not None and self.authenticated:
            current = self.context.sites.site(content.site.name)
            if current is None or current.uid != content.site.uid:
                self.respond("421 This site no longer exists; closing the session.")
                self.close_when_done()
                return
            content.site = current  # quota changes apply to the next upload
            content.invalidate()
        super().pre_process_command(line, cmd, arg)

    def process_command(self, cmd: str, *args: Any, **kwargs: Any) -> None:
        try:
            super().process_command(cmd, *args, **kwargs)
        except SitecloudError as err:
            reply = ftp_reply(err)
            self.respond(reply)
            self.log_cmd(cmd, args[0] if args else "", err.ftp_code, reply[4:])
        except Exception:
            self.context.log.exception("FTP command %s failed", cmd)
            self.respond("451 Internal error; the command was not completed.")

    def ftp_ABOR(self, line: str) -> None:
        super().ftp_ABOR(line)
        # An upload queued for a data connection that never came: drop its spool now.
        queued = self._in_dtp_queue
        if queued is not None and self.data_channel is None:
            self._in_dtp_queue = None
            queued[0].close()

    # --- teardown

    def _drop_content(self) -> None:
        if self.site_content is not None:
            self.site_content.close()
            self.site_content = None

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._drop_content()
            if self._counted:
                self._counted = False
                with self.context.lock:
                    self.context.sessions -= 1


class _Server(ThreadedFTPServer):  # type: ignore[misc]  # pyftpdlib has no type hints
    # pyftpdlib keeps the stop flag and lock as class attributes shared by every server; own them.
    def __init__(self, sock: socket.socket, handler: type[_Session], ioloop: Any) -> None:
        self._lock = threading.Lock()
        self._exit = threading.Event()
        super().__init__(sock, handler, ioloop=ioloop)


class FtpServer:
    """Binds the FTP port at construction; serves from a thread of its own until :meth:`stop`."""

    def __init__(
        self,
        config: PublisherConfig,
        sites: SiteTable,
        credentials: Credentials,
        ssl_context: ssl.SSLContext,
    ) -> None:
        self._log = get_logger(config.role, host=config.host)
        self._context = _Context(sites, credentials, ssl_context, self._log)
        passive = config.passive_ports
        settings: dict[str, Any] = {
            "context": self._context,
            "authorizer": _Authorizer(self._context),
            "abstracted_fs": SiteFilesystem,
            "dtp_handler": _DataChannel,
            "banner": "sitecloud publisher ready.",
            # Passive data ports are bound per transfer and closed after it: nothing long-lived to hold
            # across a restart as the control port is (shared/listeners.py), so they stay open to a squatter.
            "passive_ports": list(range(passive[0], passive[1] + 1)) if passive else None,
            "masquerade_address": config.masquerade_address,
            "auth_failed_timeout": config.ftp_auth_failed_delay,
            "timeout": config.ftp_idle_timeout,
            "use_sendfile": True,
        }
        handler = type("SitecloudFTPSession", (_Session,), settings)
        self._server = _Server(listener("ftp", config.bind, config.ftp_port), handler, IOLoop())
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ftp-acceptor", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.address
        return str(host), int(port)

    @property
    def sessions(self) -> int:
        return self._context.sessions

    def start(self) -> None:
        self._thread.start()
        self._log.info("FTP on %s:%s", *self.address)

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                # One poll at a time, so the stop flag is seen within the poll timeout.
                self._server.serve_forever(timeout=0.2, blocking=False, handle_exit=False)
        except Exception:
            self._log.exception("the FTP acceptor failed")
        finally:
            # Tells every session thread to leave its loop, joins them, closes their sockets.
            self._server.close_all()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        else:
            self._server.close_all()
