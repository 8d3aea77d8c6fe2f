"""The FTP server: pyftpdlib, one thread per session, the site's content on the fileserver as its disk.

pyftpdlib keeps its settings in class attributes; :class:`FtpServer` makes fresh subclasses of the
handler for each server instance instead of changing pyftpdlib's own classes. Its hooks are where
sitecloud steps in: the authorizer checks the pushed credentials, the filesystem is the site's manifest,
and the data channel commits an upload only when the client sent all of it.

Explicit FTPS (RFC 4217: ``AUTH TLS``, ``PBSZ``, ``PROT P``) is pyftpdlib's ``TLS_FTPHandler`` with a
certificate from the cloud CA, a TLS context per session, and data connections that must resume the
control connection's TLS session (:mod:`roles.publisher._ftps`). Abuse limits: connections per client
address, a deadline from connect to login, and failed logins throttled per account and address
(:mod:`roles.publisher._throttle`).
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import random
import re
import socket
import ssl
import struct
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL
from pyftpdlib.exceptions import AuthenticationFailed, FilesystemError, _RetryError
from pyftpdlib.handlers import DTPHandler, FTPHandler, TLS_DTPHandler, TLS_FTPHandler
from pyftpdlib.ioloop import _ERRNOS_RETRY, IOLoop
from pyftpdlib.log import logger as pyftpdlib_logger
from pyftpdlib.servers import ThreadedFTPServer

from roles.publisher._cache import BlobCache
from roles.publisher._content import CachedDownload, SiteContent, StreamedDownload, TreeShelf, Upload
from roles.publisher._fileserver import FileserverClient, PutLanePool
from roles.publisher._ftps import DataConnection, FtpsContexts, SessionContext, session_reused
from roles.publisher._sites import Credentials, SiteInfo, SiteTable, suspended_error
from roles.publisher._throttle import LoginThrottle
from roles.publisher._vfs import SiteFilesystem
from roles.publisher.config import PublisherConfig
from shared.errors import SitecloudError, StorageUnavailable, Unavailable
from shared.listeners import listener
from shared.logs import ContextLogger, get_logger
from shared.states import SiteState
from shared.tls import client_context

__all__ = ["FtpServer", "ftp_reply"]

# Everything a session may do: list, cd, read, append, delete, rename, mkdir, write, and SITE CHMOD
# (accepted and ignored: clients such as lftp mirror set modes after each upload; a site's files have
# none). Not MFMT: modification times are the server's.
_PERMS = "elradfmwM"
_AUTH_FAILED = "authentication failed"
# After a refused upload the rest of the file is read and dropped, so the client gets the reply on the
# control connection instead of a reset data connection; past these bounds the data connection is cut.
_DRAIN_BYTES = 256 * 1024 * 1024
_DRAIN_SECONDS = 60.0
# How often a logged-in session looks whether the snapshot in force still allows it.
_SNAPSHOT_WATCH_SECONDS = 1.0
_PROTO_CMDS = {cmd: spec for cmd, spec in TLS_FTPHandler.proto_cmds.items() if cmd != "MFMT"}
_DATA_PORT_CMDS = frozenset({"PASV", "EPSV", "PORT", "EPRT"})
_TRANSFER_CMDS = frozenset({"RETR", "STOR", "STOU", "APPE", "LIST", "NLST", "MLSD"})
# ls options a client puts before a LIST or NLST path ("LIST -la /static", as lftp's `ls -la /` and
# many scripts send): ignored, as vsftpd ignores them, rather than taken for part of the path.
_LS_OPTIONS = re.compile(r"(?:-[A-Za-z]+(?:\s+|$))+")


def _without_ls_options(arg: str) -> str:
    found = _LS_OPTIONS.match(arg)
    return arg[found.end() :] if found else arg


# 522: what vsftpd and pyftpdlib answer when a data connection's TLS negotiation fails.
_NOT_RESUMED = (
    "522 Data connection refused: it did not resume this control connection's TLS session. Use a "
    "client that reuses the session on data connections (lftp, curl, FileZilla; Python's "
    "ftplib.FTP_TLS needs session=ftp.sock.session on the data socket), or someone else at your "
    "address connected first."
)
_HANDSHAKE_FAILED = "522 The data connection's TLS handshake failed; nothing was transferred."
_TWO_CONNECTIONS = (
    "425 Two connections reached this transfer's data port from your address, so neither was taken and "
    "nothing was transferred: someone else at your address may be after your transfers. Try again; a "
    "client that resumes the TLS session on data connections (lftp, curl, FileZilla) is safe from this."
)
_LATE_CONNECTION = (
    "426 A second connection reached this transfer's data port from your address; transfer aborted, "
    "nothing was stored."
)
# The largest restart offset taken (REST): past any file a site may hold (2**53: 8 PiB).
_REST_MOST = 2**53
# How long a data connection that may not resume the TLS session is held, for a second one to show: a
# few round trips of the control connection (the client connects as soon as it reads the 227), within
# these bounds; then until the transfer's command has come (a client that connects before it sends the
# command, as ftplib does, has its connection in the backlog by then), or at most _HOLD_LONGEST.
_HOLD_SHORTEST = 0.003
_HOLD_LONGEST = 0.25
_HANDSHAKE_CUT = "425 The data connection closed before its TLS handshake completed; nothing was transferred."


_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_FTPLIB_LOG = logging.getLogger("pyftpdlib")  # pyftpdlib's own logger, typed


def _short_repr(obj: Any, full: Any) -> str:
    """pyftpdlib formats ``repr(self)`` into its debug lines before the logger drops them (on every
    close, several times per uploaded file); the full one, which asks the socket for its details, only
    when those lines are kept."""
    if _FTPLIB_LOG.isEnabledFor(logging.DEBUG):
        return str(full())
    return f"<{type(obj).__name__} at {id(obj):#x}>"


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
    throttle: LoginThrottle
    login_timeout: float
    require_tls: bool
    cache: BlobCache
    lanes: PutLanePool
    trees: TreeShelf = field(default_factory=TreeShelf)
    max_sessions_per_site: int = 0
    sessions: int = 0
    # Logged-in sessions by site (under the lock), for ``max_sessions_per_site``.
    site_sessions: collections.Counter[str] = field(default_factory=collections.Counter)
    # Running totals for metrics (under the lock: sessions run in threads of their own).
    sessions_total: int = 0
    bytes_received: int = 0
    bytes_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Authorizer:
    """pyftpdlib's authorizer interface over the pushed snapshot: user = site, root = the site."""

    def __init__(self, context: _Context) -> None:
        self._context = context

    def validate_authentication(self, username: str, password: str, handler: _Session) -> None:
        sites = self._context.sites
        site = sites.site_of_user(username)
        suspended = sites.suspended_site(None, username) if site is None else None
        known = site or suspended
        # An unknown user and a wrong password get the same answer.
        if known is None or not self._context.credentials.check(known, username, password):
            raise AuthenticationFailed(_AUTH_FAILED)
        if suspended is not None:
            # Only someone who knows the password learns why (a 530, counted as a failed login).
            self._context.log.bind(site=suspended.name).warning(
                "FTP login refused for user %r: the site's subscription is suspended", username
            )
            raise AuthenticationFailed(str(suspended_error(suspended.name)))
        # The session lives as long as this entry does: the hash it checked the password against.
        handler.login_site = site

    def get_home_dir(self, username: str) -> str:
        return "/"

    def has_user(self, username: str) -> bool:
        return self._context.sites.site_of_user(username) is not None

    def has_perm(self, username: str, perm: str, path: str | None = None) -> bool:
        return perm in _PERMS

    def get_perms(self, username: str) -> str:
        # What MLSD/MLST show as the "perm" fact (RFC 3659 letters; "M" is pyftpdlib's own).
        return _PERMS.replace("M", "")

    def get_msg_login(self, username: str) -> str:
        site = self._context.sites.site_of_user(username)
        if site is not None and site.state is SiteState.STOPPED:
            return f"Logged in to site {username}: stopped, it serves what you publish once started."
        return f"Logged in to site {username}."

    def get_msg_quit(self, username: str) -> str:
        return "Goodbye."

    def impersonate_user(self, username: str, password: str) -> None:
        pass

    def terminate_impersonation(self, username: str) -> None:
        pass


class _DrainExceeded(Exception):
    pass


class _Drain:
    """Where the rest of a refused upload goes: counted and dropped."""

    def __init__(self, name: str) -> None:
        self.name = name  # the virtual path, for pyftpdlib's transfer log
        self.closed = False
        self._bytes = 0

    def write(self, data: bytes) -> int:
        self._bytes += len(data)
        if self._bytes > _DRAIN_BYTES:
            raise _DrainExceeded
        return len(data)

    def close(self) -> None:
        self.closed = True


class _DataChannel(DTPHandler):  # type: ignore[misc]  # pyftpdlib has no type hints
    """Commits a finished upload before the 226 reply; anything short of a clean end commits nothing.

    A refused upload (over quota, say) is drained: the rest of the client's data is read and dropped,
    and the refusal is the reply to the STOR once the client has closed the data connection. Closing at
    once would reset the connection under a client that is still sending, and most clients (curl, lftp)
    then report the reset, or retry, instead of reading the reply.
    """

    # Bigger reads and sends than pyftpdlib's 64 KB: fewer trips through the loop for a big file (a
    # streamed download's chunks then go out without being sliced).
    ac_in_buffer_size = 256 * 1024
    ac_out_buffer_size = StreamedDownload.chunk
    # Set by pyftpdlib's DTPHandler; declared for the type checker.
    file_obj: Any
    receive: bool
    transfer_finished: bool
    socket: Any
    ioloop: Any
    _resp: tuple[Any, ...]
    _closed: bool
    cmd_channel: Any
    tot_bytes_received: int
    tot_bytes_sent: int

    def __repr__(self) -> str:
        return _short_repr(self, super().__repr__)

    # The passive listener that watches the data port while this transfers, closed with it.
    port_watch: Any = None

    def __init__(self, sock: Any, cmd_channel: Any) -> None:
        self._broken = False
        self._read_end = False  # a read saw the client's clean end of the upload
        self._refusal: str | None = None
        self._drain_timer: Any = None
        # pyftpdlib turns Nagle off on the control connection only. On a data connection Nagle may
        # hold a last small segment (a small file's tail, TLS's close_notify) until the client has
        # acknowledged the one before, which clients delay by up to 40 ms. Set on the plain socket,
        # so it holds for the TLS handshake and all that follows.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(sock, cmd_channel)
        if self._closed:
            # The client reset the data connection before it was set up; pyftpdlib would then leave
            # the queued transfer without any reply, and the client waiting for one.
            self.abandon_queued_transfer(cmd_channel)

    @staticmethod
    def abandon_queued_transfer(
        session: Any, reply: str = "426 Data connection broken; transfer aborted, nothing was stored."
    ) -> bool:
        """Answer ``reply`` to a transfer command waiting for its data connection, if one waits."""
        queued_in, queued_out = session._in_dtp_queue, session._out_dtp_queue
        if queued_in is None and queued_out is None:
            return False
        session._in_dtp_queue = session._out_dtp_queue = None
        file = queued_in[0] if queued_in is not None else queued_out[2]
        if file is not None:
            file.close()
        session.respond(reply)
        return True

    def recv(self, buffer_size: int) -> bytes:
        # pyftpdlib treats a reset like a clean end of stream, which would store a cut-off file; this
        # reads plain and TLS sockets alike, so it tells the two apart for both.
        try:
            data: bytes = self.socket.recv(buffer_size)
        except SSL.WantReadError as err:
            self._ssl_want_read = True
            raise _RetryError from err
        except SSL.WantWriteError as err:
            self._ssl_want_write = True
            raise _RetryError from err
        except SSL.ZeroReturnError:
            data = b""  # the client's TLS close_notify: a clean end
            self._read_end = True
        except SSL.SysCallError:
            # A reset, or a TCP close without TLS close_notify: only the latter tells a cut-off upload
            # from a complete one, and lftp, curl, FileZilla and ftplib all send it.
            self._broken = True
            data = b""
        except OSError as err:
            if err.errno in _ERRNOS_RETRY:
                raise _RetryError from err
            self._broken = True
            data = b""
        else:
            # A plain connection's FIN (on TLS the record layer says so first, as ZeroReturnError).
            self._read_end = not data
            if data:
                # Acknowledged at once: a client without TCP_NODELAY (ftplib) holds its TLS
                # close_notify after a small file's record until the record is acknowledged, which
                # the kernel delays by 40 ms on a connection the server never writes to.
                with contextlib.suppress(OSError):
                    self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        if not data:
            self.handle_close()
        return data

    def _reset_pending(self) -> bool:
        """Whether the socket holds an error no read has reported. pyftpdlib's loop closes a channel
        on an error event that carries no read flag without reading it, and a reset then would look
        like the upload's clean end. Once a read has seen the clean end, a reset after it (lftp resets
        a TLS data connection once it has sent close_notify) cuts nothing off."""
        # A pyOpenSSL connection hands getsockopt to its TCP socket (it has no get_socket()).
        try:
            return bool(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
        except OSError:
            return False

    def _start_draining(self, reply: str) -> None:
        self._refusal = reply
        self._resp = (reply, pyftpdlib_logger.info)
        upload = self.file_obj
        self.file_obj = _Drain(upload.name if upload is not None else "")
        if upload is not None:
            upload.close()  # the spool's disk space is free at once
        self._drain_timer = self.ioloop.call_later(
            _DRAIN_SECONDS, self._stop_draining, _errback=self.handle_error
        )

    def _stop_draining(self) -> None:
        """The client sends on past the bounds: cut it off (it may then see a reset)."""
        if not self._closed:
            self.close()

    def handle_close(self) -> None:
        if (
            self.receive
            and not self._broken
            and not self._read_end
            and not self._closed
            and self._reset_pending()
        ):
            self._broken = True
        if self._refusal is not None and not self._closed:
            self._resp = (self._refusal, pyftpdlib_logger.info)
            self.transfer_finished = False
            self.close()
            return
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
        if isinstance(err, _DrainExceeded):
            self._stop_draining()
            return
        if isinstance(err, SitecloudError):
            if self.receive and self._refusal is None and not self._closed:
                self._start_draining(ftp_reply(err))
                return
            self._resp = (ftp_reply(err), pyftpdlib_logger.info)
            self.close()
            return
        super().handle_error()

    def abort(self, reply: str) -> None:
        """Cut the transfer off with ``reply`` to its command; an upload stores nothing."""
        self._resp = (reply, pyftpdlib_logger.info)
        self.transfer_finished = False
        self.close()

    def resumed_session(self) -> bool:
        """Whether this connection resumed its control connection's TLS session."""
        return False

    def close(self) -> None:
        watch, self.port_watch = self.port_watch, None
        if watch is not None:
            watch.close()
        if not self._closed:
            context = self.cmd_channel.context
            with context.lock:
                context.bytes_received += self.tot_bytes_received
                context.bytes_sent += self.tot_bytes_sent
        if self._drain_timer is not None and not self._drain_timer.cancelled:
            self._drain_timer.cancel()
        upload = self.file_obj if isinstance(self.file_obj, Upload) else None
        commit_due = (
            upload is not None
            and not self._closed
            and self._refusal is None
            and not upload.closed
            and upload.committed is None
            and self.receive
            and self.transfer_finished
            and bool(self._resp)
            and self._resp[0].startswith("226")
        )
        # A snapshot applied while the bytes came in may have ended the login that sent them.
        ended = self.cmd_channel.ended_by_snapshot() if commit_due else None
        if ended is not None:
            self._resp = (f"426 {ended}; nothing was stored.", pyftpdlib_logger.info)
            self.transfer_finished = False
        elif commit_due and upload is not None:
            try:
                upload.commit()
            except SitecloudError as err:
                if isinstance(err, StorageUnavailable):
                    upload.content.log.warning(
                        "storing /%s: %s (%s)", upload.rel, err, err.__cause__ or err.hint
                    )
                self._resp = (ftp_reply(err), pyftpdlib_logger.info)
                self.transfer_finished = False
            except Exception:
                upload.content.log.exception("storing /%s failed", upload.rel)
                self._resp = (
                    "451 The upload could not be stored; nothing was changed.",
                    pyftpdlib_logger.info,
                )
                self.transfer_finished = False
        session = self.cmd_channel
        super().close()
        if ended is not None:
            session.end_session(ended)


class _NoDataPort(Unavailable):
    ftp_code = 425  # "Can't open data connection": the session goes on


def _round_trip_seconds(sock: Any) -> float:
    """The least round-trip time the kernel has seen on a TCP connection (``struct tcp_info``'s
    ``tcpi_min_rtt``, microseconds at byte 148). Not the smoothed one: on a control connection that
    one carries the client's delayed acknowledgements (40 ms on loopback)."""
    try:
        info: bytes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 152)
    except OSError:
        return 0.0
    if len(info) < 152:
        return 0.0
    (min_rtt,) = struct.unpack_from("=I", info, 148)
    return float(min_rtt) / 1e6


class _PassiveListener(FTPHandler.passive_dtp):  # type: ignore[misc]  # pyftpdlib has no type hints
    """pyftpdlib's listener for a passive data connection, with a port choice that survives sessions in
    other threads: SO_REUSEADDR lets two of them bind the same port until one listens, and then the
    other's listen() fails. That one tries the range's other ports (the kernel's choice last) instead of
    failing the PASV.

    For an FTPS session whose data connections may not resume its TLS session (``checked``), the first
    connection from the client's address is held until no second one can still be the client's: the
    client always connects, so a second connection means someone else at its address raced for the
    port, and both are refused. Past the hold the port stays open for the transfer's length, and a late
    second connection aborts a transfer whose connection did not resume."""

    socket: Any
    cmd_channel: Any
    _closed: bool

    def __init__(self, cmd_channel: Any, extmode: bool = False) -> None:
        self._held: Any = None  # the first connection, while a second one may still come
        self._short_hold_over = False
        self._long_hold_over = False
        self._watched: Any = None  # the data channel given the held connection, while it transfers
        super().__init__(cmd_channel, extmode)

    def handle_accepted(self, sock: Any, addr: Any) -> None:
        session = self.cmd_channel
        if not session.connected or addr[0] != session.remote_ip:
            super().handle_accepted(sock, addr)  # pyftpdlib's: closed, or refused as foreign
            return
        if self._watched is not None:
            sock.close()
            self._late_connection()
            return
        if self._held is not None:
            sock.close()
            self._refuse_both()
            return
        checks = getattr(session, "checks_data_connections", None)  # pyftpdlib's own sessions have none
        if checks is None or not checks():
            super().handle_accepted(sock, addr)
            return
        self._held = sock
        hold = min(max(3 * _round_trip_seconds(session.socket), _HOLD_SHORTEST), _HOLD_LONGEST)
        self.call_later(hold, self._end_short_hold, _errback=self.handle_error)
        self.call_later(_HOLD_LONGEST, self._end_long_hold, _errback=self.handle_error)

    def _end_short_hold(self) -> None:
        self._short_hold_over = True
        self.release_held()

    def _end_long_hold(self) -> None:
        self._long_hold_over = True
        self.release_held()

    def release_held(self) -> None:
        """Hand the held connection over once its hold is over and the transfer's command came (or
        the longest hold passed); called by the hold's timers and when a transfer command comes."""
        if self._held is None or self._closed or not self._short_hold_over:
            return
        session = self.cmd_channel
        if not session.transfer_waits() and not self._long_hold_over:
            return
        while True:  # connections the loop has not taken yet count too
            try:
                pair = self.socket.accept()
            except OSError:
                break
            other, addr = pair
            other.close()
            if addr[0] == session.remote_ip:
                self._refuse_both()
                return
        sock, self._held = self._held, None
        # pyftpdlib closes its listener at the first connection; this one watches the port on while
        # the connection transfers, and the channel closes it.
        session._dtp_acceptor = None
        channel = session.dtp_handler(sock, session)
        if not channel.connected:
            self.close()
            return
        session.data_channel = channel
        channel.port_watch = self
        self._watched = channel
        session._on_dtp_connection()

    def _refuse_both(self) -> None:
        session = self.cmd_channel
        held, self._held = self._held, None
        if held is not None:
            held.close()
        self.close()
        if session._dtp_acceptor is self:
            session._dtp_acceptor = None
        session.warn_data_race("two connections reached its data port from the client's address")
        if not _DataChannel.abandon_queued_transfer(session, _TWO_CONNECTIONS):
            session.data_failure = _TWO_CONNECTIONS

    def _late_connection(self) -> None:
        channel, self._watched = self._watched, None
        self.close()
        if channel is None or channel._closed or channel.resumed_session():
            return  # a connection that resumed the session is the client's own
        self.cmd_channel.warn_data_race("a second connection reached its data port during the transfer")
        channel.abort(_LATE_CONNECTION)

    def handle_timeout(self) -> None:
        if self._watched is None:
            super().handle_timeout()

    def close(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.close()
        self._watched = None
        super().close()

    def __repr__(self) -> str:
        return _short_repr(self, super().__repr__)

    def listen(self, num: int) -> None:
        ports: list[int] | None = None
        while True:
            try:
                super().listen(num)
                break
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise
            host, taken = self.socket.getsockname()[:2]
            if ports is None:
                # Only once the first port is taken: shuffling a range of 16,000 ports (49152-65534, a
                # common choice) on every PASV cost 3.4 ms each.
                ports = [p for p in (self.cmd_channel.passive_ports or ()) if p != taken]
                random.shuffle(ports)
            self._rebind(host, ports)
        allowed = self.cmd_channel.passive_ports
        if allowed and not allowed[0] <= self.socket.getsockname()[1] <= allowed[-1]:
            # Every port of the range is taken, and pyftpdlib (as this class, last) fell back on one
            # of the kernel's: a firewall opened for the range would drop it. Refused instead.
            self.close()
            raise _NoDataPort(
                f"no data port of this server's range ({allowed[0]}-{allowed[-1]}) is free now",
                hint="try again in a moment",
            )

    def _rebind(self, host: str, ports: list[int]) -> None:
        family = self.socket.family
        while True:
            self.del_channel()
            self.socket.close()
            self.create_socket(family, socket.SOCK_STREAM)
            self.set_reuse_addr()
            try:
                self.bind((host, ports.pop() if ports else 0))
                return
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    raise


class _QuickAckHandshake:
    """A TLS handshake (pyftpdlib's ``SSLConnectionMixin``) whose client's flight is acknowledged at
    once. A client that writes its ChangeCipherSpec and Finished apart without TCP_NODELAY (lftp with
    GnuTLS) holds the Finished back until the first is acknowledged, and a server that has just
    answered has the kernel delay that acknowledgement by 40 ms: each FTPS data connection of lftp
    waited that long. (On a pyOpenSSL connection ``setsockopt`` reaches the TCP socket under it.)"""

    socket: Any
    _closed: bool
    _ssl_accepting: bool
    _ssl_want_read: bool

    def _do_ssl_handshake(self) -> None:
        super()._do_ssl_handshake()  # type: ignore[misc]  # the mixin's, next in line
        if self._ssl_accepting and self._ssl_want_read and not self._closed:
            # Linux leaves quick-ack mode again by itself: set each time the client is to send.
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


class _TlsDataChannel(_QuickAckHandshake, _DataChannel, TLS_DTPHandler):  # type: ignore[misc]
    """The data channel of an FTPS session: TLS after ``PROT P``, resuming the control session."""

    _initialized: bool  # pyftpdlib's: a transfer command has been given this channel

    def secure_connection(self, ssl_context: SessionContext) -> None:
        # pyftpdlib's SSLConnectionMixin.secure_connection, with a DataConnection for its connection.
        ssl_context.start_data_handshake()
        self._ssl_requested = True
        try:
            self.socket = DataConnection(ssl_context, self.socket)
        except OSError:
            self.close()  # the client connected and went at once
            return
        except ValueError:
            if self.socket.fileno() == -1:
                return  # the same, found by pyOpenSSL
            raise
        self.socket.set_accept_state()
        self._ssl_accepting = True

    def resumed_session(self) -> bool:
        conn = self.socket
        return isinstance(conn, SSL.Connection) and session_reused(conn)

    def handle_failed_ssl_handshake(self) -> None:
        if not self._refused_for_not_resuming():
            # pyftpdlib would answer at once, even when no command waits for the answer.
            self._answer_transfer(_HANDSHAKE_FAILED)
            self.close()

    def handle_error(self) -> None:
        # A download's first bytes are written as soon as its command gives them, and OpenSSL then runs
        # the handshake inside that write: a refusal comes out here instead.
        if isinstance(sys.exc_info()[1], SSL.Error) and self._refused_for_not_resuming():
            return
        super().handle_error()

    def _refused_for_not_resuming(self) -> bool:
        """If the handshake that just failed was refused for not resuming the control connection's TLS
        session: answer so, and close. Nothing was sent on the connection, nor read from it."""
        session = self.cmd_channel
        if not session.ssl_context.take_refusal():
            return False
        peer = "?"
        with contextlib.suppress(OSError):
            peer = "{}:{}".format(*self.socket.getpeername()[:2])
        content = session.site_content
        (content.log if content is not None else session.context.log).warning(
            "FTPS data connection from %s refused: it did not resume the control connection's TLS session",
            peer,
        )
        self._answer_transfer(_NOT_RESUMED)
        self.close()
        return True

    def _answer_transfer(self, reply: str) -> None:
        """Make ``reply`` the answer to this connection's transfer, which will not happen: to its command
        once closed, or, before the command came, to the one to come (pyftpdlib takes one data
        connection per PASV, so that command would wait for a connection that does not come)."""
        if self._initialized:
            self._resp = (reply, pyftpdlib_logger.info)
            self.transfer_finished = False  # an upload stores nothing
        elif self.cmd_channel.data_failure is None:
            self.cmd_channel.data_failure = reply

    def close(self) -> None:
        if not self._closed and self._ssl_accepting and not self._resp and not self.cmd_channel._closed:
            # Gone during the handshake without an answer (whoever connected went away, or the
            # connection was cut): pyftpdlib would leave the transfer's command waiting.
            self._answer_transfer(_HANDSHAKE_CUT)
        super().close()

    def modify_ioloop_events(self, events: int, logdebug: bool = False) -> None:
        if self._ssl_accepting and self._ssl_want_read:
            # pyftpdlib keeps a download's interest in writing while the handshake waits to read; the
            # socket is always writable, so the loop retried the handshake thousands of times a second.
            events = self.ioloop.READ
        super().modify_ioloop_events(events, logdebug)


class _Session(FTPHandler):  # type: ignore[misc]  # pyftpdlib has no type hints
    """One FTP control connection. Subclassed per server with ``context`` and the server's settings."""

    context: _Context
    proto_cmds = _PROTO_CMDS
    # What TLS_FTPHandler sets; a plain session never has TLS.
    _ssl_established = False
    _prot = False
    # Set by pyftpdlib's FTPHandler; declared for the type checker.
    _in_dtp_queue: Any
    _out_dtp_queue: Any
    _dtp_acceptor: Any
    _closed: bool
    ioloop: Any
    server: Any
    authenticated: bool
    username: str
    remote_ip: str

    def __init__(self, conn: Any, server: Any, ioloop: Any = None) -> None:
        self.site_content: SiteContent | None = None
        # The snapshot's entry the password was checked against (set by the authorizer).
        self.login_site: SiteInfo | None = None
        self._counted = False
        # The site this session counts against while logged in (``max_sessions_per_site``).
        self._site_counted: str | None = None
        self._login_deadline: Any = None
        self._snapshot_watch: Any = None
        self._ending = False
        super().__init__(conn, server, ioloop=ioloop)
        if not self._closed:
            with self.context.lock:
                self.context.sessions += 1
                self.context.sessions_total += 1
                self._counted = True

    # --- connection limits

    def handle(self) -> None:
        super().handle()
        # A deadline, not an idle timer: a client sending NOOPs must not hold a slot forever. Like
        # pyftpdlib's own idle timer it runs on the acceptor's scheduler (handle() runs there).
        if not self._closed and self.context.login_timeout > 0:
            self._login_deadline = self.ioloop.call_later(
                self.context.login_timeout, self._login_timed_out, _errback=self.handle_error
            )

    def _login_timed_out(self) -> None:
        if getattr(self, "_ssl_accepting", False):
            self.close()  # stuck in the TLS handshake: no way to send a reply
            return
        if not self.authenticated and not self._closed:
            self.context.log.bind(client=f"{self.remote_ip}:{self.remote_port}").info(
                "FTP connection closed: no login within %ss", self.context.login_timeout
            )
            self.respond(f"421 No login within {self.context.login_timeout:g} seconds; closing.")
            self.close_when_done()

    def handle_max_cons(self) -> None:
        self.context.log.warning("FTP connection refused: %s connections open", self.server.max_cons)
        super().handle_max_cons()

    def handle_max_cons_per_ip(self) -> None:
        limit = self.server.max_cons_per_ip
        self.context.log.bind(client=self.remote_ip).warning(
            "FTP connection refused: %s connections open from this address", limit
        )
        self.respond(
            f"421 Too many connections from your address (at most {limit}); close some and try again."
        )
        self.close_when_done()

    def log(self, msg: str, logfun: Any = pyftpdlib_logger.info) -> None:
        # pyftpdlib builds the line (its prefix from the session's attributes) before the logger looks
        # at its level: for every reply (at DEBUG) and transfer (at INFO), mostly for nothing.
        level = _LOG_LEVELS.get(getattr(logfun, "__name__", ""))
        owner = getattr(logfun, "__self__", None)
        if level is None or owner is not _FTPLIB_LOG or _FTPLIB_LOG.isEnabledFor(level):
            super().log(msg, logfun)

    # --- login

    def process_command(self, cmd: str, *args: Any, **kwargs: Any) -> None:
        if self.context.require_tls and not self._ssl_established and cmd in ("USER", "PASS"):
            self.respond(
                "530 This server requires FTPS: send AUTH TLS before USER "
                "(explicit FTP over TLS; in lftp set ftp:ssl-force true)."
            )
            return
        if self.context.require_tls and not self._prot and cmd in ("PASV", "EPSV", "PORT", "EPRT"):
            self.respond("521 This server requires protected data connections: send PBSZ 0 and PROT P.")
            return
        try:
            super().process_command(cmd, *args, **kwargs)
        except SitecloudError as err:
            reply = ftp_reply(err)
            self.respond(reply)
            self.log_cmd(cmd, args[0] if args else "", err.ftp_code, reply[4:])
            if isinstance(err, StorageUnavailable):
                # The client is told to retry later; the admin is told why.
                self.context.log.warning("FTP %s: %s (%s)", cmd, err, err.__cause__ or err.hint)
        except Exception:
            self.context.log.exception("FTP command %s failed", cmd)
            self.respond("451 Internal error; the command was not completed.")

    def ftp_PASS(self, line: str) -> None:
        if not self.authenticated and self.username:
            wait = self.context.throttle.retry_after(self.username, self.remote_ip)
            if wait:
                self.context.log.bind(client=f"{self.remote_ip}:{self.remote_port}").warning(
                    "FTP login throttled for user %r (retry in %ss)", self.username, wait
                )
                # 530, not 421: clients take 421 for a passing fault and retry at once (curl even
                # reports a timeout), where this one says to wait.
                self.respond(
                    f"530 Too many failed logins for {self.username} from your address; "
                    f"try again in {wait} seconds."
                )
                self.close_when_done()
                return
        super().ftp_PASS(line)

    def handle_auth_failed(self, msg: str, password: str) -> None:
        if self.username:
            self.context.throttle.failed(self.username, self.remote_ip)
        super().handle_auth_failed(msg, password)

    def handle_auth_success(self, home: str, password: str, msg_login: str) -> None:
        site = self.login_site
        if site is None or self.ended_by_snapshot() is not None:
            # The snapshot changed between the password check and here.
            self.login_site = None
            self.handle_auth_failed(_AUTH_FAILED, password)
            return
        if not self._count_site_session(site.name):
            limit = self.context.max_sessions_per_site
            self.context.log.bind(site=site.name, client=self.remote_ip).warning(
                "FTP login refused: %s sessions of this site open", limit
            )
            self.respond(
                f"421 Too many FTP sessions of site {site.name} at once (at most {limit}); "
                "close some and try again."
            )
            self.login_site = None
            self.close_when_done()
            return
        self.context.throttle.succeeded(self.username, self.remote_ip)
        self._cancel_login_deadline()
        self._drop_content()
        log = self.context.log.bind(site=site.name, client=f"{self.remote_ip}:{self.remote_port}")
        client = FileserverClient(
            self.context.sites.fileserver, self.context.ssl_context, lanes=self.context.lanes
        )
        self.site_content = SiteContent(site, client, log, self.context.cache, self.context.trees)
        self._cancel_snapshot_watch()
        # An idle session, or one in a long transfer, sends no command to be checked at: look each
        # second (the session's loop wakes that often anyway) whether a new snapshot ended it.
        self._snapshot_watch = self.ioloop.call_every(
            _SNAPSHOT_WATCH_SECONDS, self._watch_snapshot, _errback=self.handle_error
        )
        super().handle_auth_success(home, password, msg_login)

    def on_login(self, username: str) -> None:
        if self.site_content is not None:
            self.site_content.log.info("FTP login as %s", username)

    def on_login_failed(self, username: str, password: str) -> None:
        self.context.log.bind(client=f"{self.remote_ip}:{self.remote_port}").warning(
            "FTP login failed for user %r", username
        )

    def _count_site_session(self, site: str) -> bool:
        context = self.context
        with context.lock:
            self._uncount_site_session_locked()
            limit = context.max_sessions_per_site
            if limit and context.site_sessions[site] >= limit:
                return False
            context.site_sessions[site] += 1
            self._site_counted = site
            return True

    def _uncount_site_session_locked(self) -> None:
        site, self._site_counted = self._site_counted, None
        if site is not None:
            counts = self.context.site_sessions
            counts[site] -= 1
            if counts[site] <= 0:
                del counts[site]

    def flush_account(self) -> None:
        with self.context.lock:
            self._uncount_site_session_locked()
        super().flush_account()
        self._cancel_snapshot_watch()
        self.login_site = None
        self._drop_content()

    # --- the snapshot in force

    def ended_by_snapshot(self) -> str | None:
        """Why the snapshot in force no longer allows this login (``None`` while it does): a session
        lasts only while its user is on the same site's content with the password hash it logged in
        with, so a password reset, a removed user and a deleted or suspended site all end it."""
        login = self.login_site
        if login is None:
            return None
        current = self.context.sites.site_of_user(self.username)
        if current is None:
            if self.context.sites.suspended_site(None, self.username) is not None:
                return "The subscription of this site was suspended"
            if self.context.sites.site(login.name) is None:
                return "This site no longer exists"
            return "This login no longer exists"
        if current.content_id != login.content_id:
            return "This slot was swapped: log in again"
        if current.users.get(self.username) != login.users.get(self.username):
            return "The password was changed: log in with the new one"
        return None

    def _watch_snapshot(self) -> None:
        if self._closed or not self.authenticated:
            return
        reason = self.ended_by_snapshot()
        if reason is not None:
            self.end_session(reason)

    def end_session(self, reason: str) -> None:
        """Close a session the snapshot ended; a transfer under way is cut off first, and an upload
        stores nothing (RFC 959: 421 may answer any command when the server closes the connection)."""
        if self._closed or self._ending:
            return
        self._ending = True
        self._cancel_snapshot_watch()
        content = self.site_content
        (content.log if content is not None else self.context.log).info("FTP session ended: %s", reason)
        channel = self.data_channel
        if channel is not None and not channel._closed:
            channel.abort(f"426 {reason}; transfer aborted, nothing was stored.")
        self.respond(f"421 {reason}; closing the session.")
        self.close_when_done()

    # --- data connections

    def checks_data_connections(self) -> bool:
        """Whether the next data connection is held until it is sure to be the only one (FTPS only)."""
        return False

    def transfer_waits(self) -> bool:
        """Whether a transfer command waits for its data connection."""
        return self._in_dtp_queue is not None or self._out_dtp_queue is not None

    def warn_data_race(self, what: str) -> None:
        content = self.site_content
        (content.log if content is not None else self.context.log).warning(
            "FTPS transfer refused: %s (%s), whose data connection need not resume the TLS session",
            what,
            self.remote_ip,
        )

    # --- commands

    def pre_process_command(self, line: str, cmd: str, arg: str) -> None:
        content = self.site_content
        if content is not None and self.authenticated:
            reason = self.ended_by_snapshot()
            if reason is not None:
                self.end_session(reason)
                return
            # Still the same login: the site's entry as the snapshot has it now.
            current = self.context.sites.site_of_user(self.username)
            if current is not None:
                content.site = current  # quota changes apply to the next upload
            fileserver = self.context.sites.fileserver
            if fileserver != content.client.base_url and self.data_channel is None:
                # The file server moved, stopped or is back: this command goes where it is now (never
                # while a transfer holds a connection of the old client).
                content.client.close()
                content.client = FileserverClient(
                    fileserver, self.context.ssl_context, lanes=self.context.lanes
                )
            content.invalidate()
        if cmd in ("LIST", "NLST"):
            arg = _without_ls_options(arg)
        super().pre_process_command(line, cmd, arg)

    def push_dtp_data(
        self, data: Any, isproducer: bool = False, file: Any = None, cmd: str | None = None
    ) -> None:
        if isproducer and isinstance(file, StreamedDownload | CachedDownload):
            data.buffer_size = file.chunk  # the producer asks for whole chunks
        super().push_dtp_data(data, isproducer=isproducer, file=file, cmd=cmd)

    def ftp_SIZE(self, path: str) -> None:
        # pyftpdlib refuses SIZE under TYPE A, where the exact answer (RFC 3659 section 4: the
        # octets a transfer in the current TYPE would send, LF sent as CRLF) needs the whole file
        # read. Many clients ask SIZE before they switch to TYPE I; like
        # vsftpd, answer the stored size in either TYPE (what clients use it for: progress, resume).
        try:
            size = self.fs.getsize(path)
        except FilesystemError:
            self.respond(f"550 {self.fs.fs2ftp(path)} is not retrievable.")
            return
        self.respond(f"213 {size}")

    def ftp_REST(self, line: str) -> None:
        # An offset no file can reach is refused now, not at the transfer it would fail (pyftpdlib
        # takes any integer, 30 digits long or more).
        if line.strip().isdigit() and int(line) > _REST_MOST:
            self.respond(f"501 A restart offset is at most {_REST_MOST} bytes.")
            return
        super().ftp_REST(line)

    def ftp_ABOR(self, line: str) -> None:
        super().ftp_ABOR(line)
        if self._closed:
            return  # a reply that met a reset closed the session, and its queued upload with it
        # An upload queued for a data connection that never came: drop its spool now.
        queued = self._in_dtp_queue
        if queued is not None and self.data_channel is None:
            self._in_dtp_queue = None
            queued[0].close()

    # --- teardown

    def _cancel_login_deadline(self) -> None:
        if self._login_deadline is not None and not self._login_deadline.cancelled:
            self._login_deadline.cancel()
        self._login_deadline = None

    def _cancel_snapshot_watch(self) -> None:
        if self._snapshot_watch is not None and not self._snapshot_watch.cancelled:
            self._snapshot_watch.cancel()
        self._snapshot_watch = None

    def _drop_content(self) -> None:
        if self.site_content is not None:
            self.site_content.close()
            self.site_content = None

    def close(self) -> None:
        try:
            self._cancel_login_deadline()
            self._cancel_snapshot_watch()
            super().close()
        finally:
            self._drop_content()
            with self.context.lock:
                self._uncount_site_session_locked()
                if self._counted:
                    self._counted = False
                    self.context.sessions -= 1


class _TlsSession(_QuickAckHandshake, _Session, TLS_FTPHandler):  # type: ignore[misc]
    """A session that may turn to TLS with ``AUTH TLS`` (RFC 4217), in a TLS context of its own."""

    ftps: FtpsContexts
    ssl_context: SessionContext | None

    def __init__(self, conn: Any, server: Any, ioloop: Any = None) -> None:
        # The answer to the next transfer command, when its data connection failed before it came.
        self.data_failure: str | None = None
        super().__init__(conn, server, ioloop=ioloop)

    @classmethod
    def get_ssl_context(cls) -> None:
        # pyftpdlib's one context for all sessions: each makes its own at AUTH TLS instead.
        return None

    def ftp_AUTH(self, line: str) -> None:
        if not isinstance(self.socket, SSL.Connection):
            self.ssl_context = self.ftps.new()
        super().ftp_AUTH(line)

    def process_command(self, cmd: str, *args: Any, **kwargs: Any) -> None:
        if cmd in _DATA_PORT_CMDS:
            super().process_command(cmd, *args, **kwargs)
            # After the command, which closes a data connection still in its handshake: a new one to come.
            self.data_failure = None
            return
        if cmd in _TRANSFER_CMDS and self.data_failure is not None:
            reply, self.data_failure = self.data_failure, None
            self.respond(reply)
            self.log_cmd(cmd, args[0] if args else "", int(reply[:3]), reply[4:])
            return
        super().process_command(cmd, *args, **kwargs)
        listener = self._dtp_acceptor
        if cmd in _TRANSFER_CMDS and isinstance(listener, _PassiveListener):
            listener.release_held()  # a held data connection waited for its command

    def checks_data_connections(self) -> bool:
        context = self.ssl_context
        return bool(self._prot) and context is not None and context.checks_data_connections


class _Server(ThreadedFTPServer):  # type: ignore[misc]  # pyftpdlib has no type hints
    # pyftpdlib keeps the stop flag, the lock and the limits as class attributes shared by every
    # server; own them.
    def __init__(
        self,
        sock: socket.socket,
        handler: type[_Session],
        ioloop: Any,
        *,
        max_cons: int,
        max_cons_per_ip: int,
    ) -> None:
        self._lock = threading.Lock()
        self._exit = threading.Event()
        self.max_cons = max_cons
        self.max_cons_per_ip = max_cons_per_ip
        super().__init__(sock, handler, ioloop=ioloop)


class FtpServer:
    """Binds the FTP port at construction; serves from a thread of its own until :meth:`stop`."""

    def __init__(
        self,
        config: PublisherConfig,
        sites: SiteTable,
        credentials: Credentials,
        ssl_context: ssl.SSLContext,
        throttle: LoginThrottle,
    ) -> None:
        self._log = get_logger(config.role, host=config.host)
        self._context = _Context(
            sites,
            credentials,
            ssl_context,
            self._log,
            throttle=throttle,
            login_timeout=config.ftp_login_timeout,
            require_tls=config.require_tls,
            max_sessions_per_site=config.ftp_max_sessions_per_site,
            cache=BlobCache(config.home / "ftp-cache", config.ftp_cache_bytes, self._log),
            # A context of its own: it offers the put lane's ALPN.
            lanes=PutLanePool(client_context(config)),
        )
        passive = config.passive_ports
        settings: dict[str, Any] = {
            "context": self._context,
            "authorizer": _Authorizer(self._context),
            "abstracted_fs": SiteFilesystem,
            "dtp_handler": _DataChannel,
            "passive_dtp": _PassiveListener,
            "banner": "sitecloud publisher ready.",
            # Passive data ports are bound per transfer and closed after it: nothing long-lived to hold
            # across a restart as the control port is (shared/listeners.py), so they stay open to a squatter.
            "passive_ports": list(range(passive[0], passive[1] + 1)) if passive else None,
            "masquerade_address": config.masquerade_address,
            "auth_failed_timeout": config.ftp_auth_failed_delay,
            "timeout": config.ftp_idle_timeout,
            "use_sendfile": True,
        }
        base: type[_Session] = _Session
        if config.ftp_tls:
            base = _TlsSession
            settings["dtp_handler"] = _TlsDataChannel
            settings["ftps"] = FtpsContexts(
                config.ftp_cert_file,
                config.ftp_key_file,
                reuse=config.ftp_tls_session_reuse,
            )
        else:
            settings["proto_cmds"] = {
                cmd: spec for cmd, spec in _PROTO_CMDS.items() if cmd not in ("AUTH", "PBSZ", "PROT")
            }
        handler = type("SitecloudFTPSession", (base,), settings)
        limits = {
            "max_cons": config.ftp_max_connections,
            "max_cons_per_ip": config.ftp_max_connections_per_ip,
        }
        self._server = _Server(listener("ftp", config.bind, config.ftp_port), handler, IOLoop(), **limits)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ftp-acceptor", daemon=True)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.address
        return str(host), int(port)

    @property
    def sessions(self) -> int:
        return self._context.sessions

    def totals(self) -> dict[str, int]:
        """Running totals since start: sessions, bytes of transfers (in: uploads; out: downloads) and
        downloads sent from the publisher's own copies; and the bytes those copies hold now."""
        c = self._context
        with c.lock:
            totals = {"sessions": c.sessions_total, "bytes_in": c.bytes_received, "bytes_out": c.bytes_sent}
        totals["cache_hits"], totals["cache_bytes"] = c.cache.hits, c.cache.total_bytes
        return totals

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
            self._context.lanes.close()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        else:
            self._server.close_all()
