"""FTPS's TLS contexts: one per control connection, so that its data connections can prove they are its
own by resuming its TLS session (as FileZilla Server, vsftpd's ``require_ssl_reuse`` and ProFTPD ask).

After PASV the server takes the first data connection from the control connection's address, and many
clients share an address (NAT, a VPN exit, CI runners): whoever behind it connects first would read the
download or write the upload. Only the client that holds the control connection's TLS session can
resume it. Each control connection gets a context of its own, with its own ticket keys and session
cache, so no session issued on another connection resumes there; and a data connection that does not
resume is refused at its ClientHello, before it gets a byte of the transfer or a session to resume.

Some clients never resume (Python's ``ftplib.FTP_TLS``, Java's, Cyberduck's). Under ``checked`` (the
default) their data connections are let in on other grounds, while the client has not shown that it
resumes: the publisher's passive listener holds each such connection until it is sure no second one came
from the address (``roles/publisher/_ftp.py``, ``_PassiveListener``). Once a session's client has resumed,
its later data connections must resume too, so a stranger cannot take them by not resuming.
"""

from __future__ import annotations

import contextlib
import os
import socket
import weakref
from pathlib import Path
from typing import Any

from cryptography import x509
from OpenSSL import SSL, crypto

# pyOpenSSL wraps neither SSL_session_reused nor a server-name callback that may answer with an alert
# of its choosing without printing a traceback (its own one reports exceptions through sys.excepthook).
from OpenSSL._util import ffi, lib

from roles.publisher.config import TlsSessionReuse

__all__ = ["DataConnection", "FtpsContexts", "SessionContext", "session_reused"]

# RFC 8446 section 6.2: "a valid certificate or PSK was received, but ... the sender decided not to
# proceed with negotiation".
_ACCESS_DENIED = 49
# A session lives as long as its control connection may, up to a TLS 1.3 ticket's longest lifetime
# (RFC 8446 section 4.6.1: 7 days); OpenSSL's default, 2 hours, would refuse a long session's transfers.
_SESSION_SECONDS = 7 * 24 * 3600
# RFC 8446 section 5.1/5.2: a record's header is 5 bytes, its body at most 2^14 + 256 bytes.
_RECORD_HEADER = 5
_RECORD_MAX_BODY = 2**14 + 256


def session_reused(conn: SSL.Connection) -> bool:
    """Whether a connection's handshake resumed a session (so far: false before its ClientHello)."""
    return bool(lib.SSL_session_reused(conn._ssl))


class SessionContext(SSL.Context):
    """The TLS context of one FTPS control connection and its data connections.

    The first ClientHello it sees is the control connection's (``AUTH TLS`` made the context for it);
    any other is a data connection's, allowed if it resumes a session of this context, or else as
    ``reuse`` says."""

    def __init__(
        self, chain: tuple[x509.Certificate, ...], key: crypto.PKey, *, reuse: TlsSessionReuse
    ) -> None:
        super().__init__(SSL.TLS_SERVER_METHOD)
        self.set_min_proto_version(SSL.TLS1_2_VERSION)
        self.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE)
        self.use_certificate(chain[0])
        for cert in chain[1:]:
            self.add_extra_chain_cert(cert)
        self.use_privatekey(key)
        self.set_session_id(b"sitecloud-ftps")
        self.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        self.set_timeout(_SESSION_SECONDS)
        self.reuse = reuse
        # Whether a data connection of this session resumed: its client can, so all must from then on.
        self.client_resumes = False
        # Whether a data connection was refused since the last take_refusal(): its handshake then fails.
        self._refused = False
        self._control: Any = None  # the control connection's SSL *
        # A weak reference: the callback lives on this object, which a strong one would make a cycle.
        ref = weakref.ref(self)

        def on_client_hello(ssl: Any, alert: Any, arg: Any) -> int:
            context = ref()
            if context is not None and context._allows(ssl):
                return int(lib.SSL_TLSEXT_ERR_NOACK)  # as if there were no callback
            alert[0] = _ACCESS_DENIED
            return int(lib.SSL_TLSEXT_ERR_ALERT_FATAL)

        # Called for every ClientHello, once the session to resume (if any) is known; an exception in it
        # refuses the connection rather than letting it through.
        self._on_client_hello = ffi.callback(
            "int (*)(SSL *, int *, void *)", on_client_hello, error=lib.SSL_TLSEXT_ERR_ALERT_FATAL
        )
        lib.SSL_CTX_set_tlsext_servername_callback(self._context, self._on_client_hello)

    def _allows(self, ssl: Any) -> bool:
        if self._control is None or ssl == self._control:
            self._control = ssl
            return True
        if lib.SSL_session_reused(ssl):
            self.client_resumes = True
            return True
        if self.reuse == "required" or (self.reuse == "checked" and self.client_resumes):
            self._refused = True
            return False
        return True

    @property
    def checks_data_connections(self) -> bool:
        """Whether a data connection that will not resume may come, to be taken only if it is alone."""
        return self.reuse == "checked" and not self.client_resumes

    def start_data_handshake(self) -> None:
        """A data connection's handshake begins: what refused an earlier one is not its refusal."""
        self._refused = False

    def take_refusal(self) -> bool:
        """Whether the data connection whose handshake just failed was refused for not resuming."""
        refused, self._refused = self._refused, False
        return refused


class FtpsContexts:
    """The certificate chain and key, read once at start; a fresh context for each control connection."""

    def __init__(self, cert_file: Path, key_file: Path, *, reuse: TlsSessionReuse) -> None:
        self._chain = tuple(x509.load_pem_x509_certificates(cert_file.read_bytes()))
        self._key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_file.read_bytes())
        self.reuse = reuse
        # Whether a data connection of this session resumed: its client can, so all must from then on.
        self.client_resumes = False
        self.new().check_privatekey()  # a key that does not match the certificate fails the start

    def new(self) -> SessionContext:
        return SessionContext(self._chain, self._key, reuse=self.reuse)


class DataConnection(SSL.Connection):
    """A data connection's TLS, whose TLS 1.3 session tickets wait for the connection's first write.

    An OpenSSL server sends TLS 1.3 session tickets as soon as a handshake ends (RFC 8446 section
    4.6.1), and a client that only uploads never reads them: lftp sends the file and closes, a ticket
    then reaches a closed socket, and the client's kernel answers with a reset that drops what it had
    not sent yet (the upload ends "426 Connection broken"). pyOpenSSL cannot set SSL_set_num_tickets, so
    the handshake runs on memory BIOs, fed one whole record at a time from the socket (never a byte past
    the client's Finished); what the server writes as it ends is held back until the connection's first
    write (a download's data, or the close_notify after an upload's end), and the connection is on its
    socket from then on. (A read that answers a KeyUpdate asking for one back would write ahead of held
    tickets, which the client could not then decrypt: no FTP client asks for one.)"""

    def __init__(self, context: SSL.Context, sock: socket.socket) -> None:
        super().__init__(context, sock)
        self._raw = sock
        # The SSL object owns both BIOs from here, and frees them when SSL_set_fd replaces them.
        self._incoming = lib.BIO_new(lib.BIO_s_mem())
        self._outgoing = lib.BIO_new(lib.BIO_s_mem())
        lib.SSL_set_bio(self._ssl, self._incoming, self._outgoing)
        self._feeding = True
        self._record = bytearray()
        self._unsent = b""  # for the socket, before anything else
        self._held = b""  # the tickets, for the socket before the connection's first write

    def do_handshake(self) -> None:
        self._send_unsent()
        if not self._feeding:
            super().do_handshake()
            return
        while True:
            try:
                super().do_handshake()
            except SSL.WantReadError:
                self._queue_outgoing()
                self._send_unsent()
                if not self._read_record():
                    raise
                continue
            except SSL.Error:
                self._queue_outgoing()  # an alert, as a refusal, tells the client why
                with contextlib.suppress(SSL.Error):
                    self._send_unsent()
                raise
            break
        last = self._drain_outgoing()
        self._feeding = False
        lib.SSL_set_fd(self._ssl, self._raw.fileno())
        if self.get_protocol_version_name() == "TLSv1.3":
            self._held = last  # after the client's Finished a TLS 1.3 server writes only tickets
        else:
            self._unsent += last  # TLS 1.2 ends with the server's own Finished, which the client awaits
            self._send_unsent()

    def send(self, buf: Any, flags: int = 0) -> int:
        self._release_held()
        return super().send(buf, flags)

    write = send

    def sendall(self, buf: Any, flags: int = 0) -> int:
        self._release_held()
        return super().sendall(buf, flags)

    def shutdown(self) -> bool:
        self._release_held()
        return super().shutdown()

    def _release_held(self) -> None:
        self._unsent, self._held = self._unsent + self._held, b""
        self._send_unsent()

    def _drain_outgoing(self) -> bytes:
        out = bytearray()
        buffer = ffi.new("char[]", 16384)
        while (count := lib.BIO_read(self._outgoing, buffer, 16384)) > 0:
            out += ffi.buffer(buffer, count)
        return bytes(out)

    def _queue_outgoing(self) -> None:
        self._unsent += self._drain_outgoing()

    def _send_unsent(self) -> None:
        """Write what waits for the socket; SSL.WantWriteError while some of it still waits."""
        while self._unsent:
            try:
                sent = self._raw.send(self._unsent)
            except (BlockingIOError, InterruptedError):
                raise SSL.WantWriteError() from None
            except OSError as err:
                raise SSL.SysCallError(err.errno, os.strerror(err.errno or 0)) from err
            self._unsent = self._unsent[sent:]

    def _read_record(self) -> bool:
        """Move the socket's next whole TLS record into the handshake; False until all of it has come."""
        record = self._record
        while True:
            if len(record) < _RECORD_HEADER:
                need = _RECORD_HEADER - len(record)
            else:
                length = int.from_bytes(record[3:5], "big")
                # A longer one is left for OpenSSL to refuse by its header.
                need = 0 if length > _RECORD_MAX_BODY else _RECORD_HEADER + length - len(record)
            if need == 0:
                break
            try:
                chunk = self._raw.recv(need)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as err:
                raise SSL.SysCallError(err.errno, os.strerror(err.errno or 0)) from err
            if not chunk:
                raise SSL.SysCallError(-1, "Unexpected EOF")
            record += chunk
        lib.BIO_write(self._incoming, bytes(record), len(record))
        record.clear()
        return True
