"""The publisher as FTP clients and attackers meet it: explicit FTPS with ftplib, lftp and curl against
a real publisher and fileserver; data connections that must resume the control connection's TLS
session or be their port's only connection; lftp mirror; quota refusals the clients can read;
connection caps, the login deadline, the failed-login throttle and over-long names."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ftplib
import hashlib
import http.client
import io
import json
import os
import random
import select
import shutil
import socket
import ssl
import struct
import subprocess
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from roles.fileserver.config import FileserverConfig
from roles.publisher.config import PublisherConfig
from roles.worker.config import WorkerConfig
from shared.credentials import hash_password
from shared.net import free_port_range
from tests.support import CloudPKI, ResumingFTP_TLS, RoleProcess, call, wait_until

QUOTA = 256 * 1024
TINY_QUOTA = 16 * 1024
PER_IP = 6
PER_SITE = 4
LOGIN_TIMEOUT = 1.5
_SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture

# site -> (password, quota); each test works on sites of its own.
SITES = {
    "tls": ("tls-secret", QUOTA),
    "lftptls": ("lftptls-secret", QUOTA),
    "curltls": ("curltls-secret", QUOTA),
    "mirror": ("mirror-secret", QUOTA),
    "full": ("full-secret", TINY_QUOTA),
    "caps": ("caps-secret", QUOTA),
    "victim": ("victim-secret", QUOTA),
    "bystander": ("bystander-secret", QUOTA),
    "webdeploy": ("webdeploy-secret", QUOTA),
    "names": ("names-secret", QUOTA),
    "strict": ("strict-secret", QUOTA),
    "bigtls": ("bigtls-secret", 8 * 1024 * 1024),
    "abort": ("abort-secret", QUOTA),
    "noresume": ("noresume-secret", QUOTA),
    "hijack": ("hijack-secret", QUOTA),
    "lenient": ("lenient-secret", QUOTA),
    "ftplib": ("ftplib-secret", QUOTA),
    "raced": ("raced-secret", QUOTA),
    "racedftplib": ("racedftplib-secret", QUOTA),
    "latecomer": ("latecomer-secret", QUOTA),
    "tls12": ("tls12-secret", QUOTA),
    "gone": ("gone-secret", QUOTA),
}
SECRET = b"<?php $db_password = 'not for the neighbours';\n"


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package '{name}')")
    return path


def _free_port_range(count: int) -> tuple[int, int]:
    first = free_port_range(count)
    return first, first + count - 1


@dataclass
class Cloud:
    pki: CloudPKI
    fileserver: RoleProcess
    publisher: RoleProcess
    strict: RoleProcess  # a publisher with require_tls and ftp_tls_session_reuse "required"
    lenient: RoleProcess  # a publisher with ftp_tls_session_reuse "optional"

    @staticmethod
    def port(process: RoleProcess) -> int:
        config = process.config
        assert isinstance(config, PublisherConfig)
        return config.ftp_port

    @property
    def ftp_port(self) -> int:
        return self.port(self.publisher)

    @property
    def deploy_port(self) -> int:
        config = self.publisher.config
        assert isinstance(config, PublisherConfig)
        return config.deploy_port

    @property
    def ca_file(self) -> Path:
        return self.pki.ca_file

    def tls_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def ftp(self, site: str, password: str | None = None, *, source: str | None = None) -> ftplib.FTP:
        ftp = ftplib.FTP(timeout=10, source_address=(source, 0) if source else None)
        try:
            ftp.connect("127.0.0.1", self.ftp_port)
            ftp.login(site, password if password is not None else SITES[site][0])
        except BaseException:
            ftp.close()
            raise
        return ftp

    def ftps(self, site: str, process: RoleProcess | None = None, *, resuming: bool = True) -> ftplib.FTP_TLS:
        """A logged-in FTPS client with PROT P; ``resuming=False`` is ftplib's own, whose data
        connections do not resume the control connection's TLS session."""
        kind = ResumingFTP_TLS if resuming else ftplib.FTP_TLS
        ftp = kind(context=self.tls_context(), timeout=10)
        try:
            ftp.connect("localhost", self.port(process or self.publisher))
            ftp.login(site, SITES[site][0])
            ftp.prot_p()
        except BaseException:
            ftp.close()
            raise
        return ftp

    def manifest(self, site: str) -> dict[str, Any]:
        status, body = call(
            f"{self.fileserver.control_url}/v1/sites/{site}/manifest", self.pki.client_ssl("publisher")
        )
        assert status == 200, body
        return dict(body)

    def files(self, site: str) -> dict[str, int]:
        return {p: e["size"] for p, e in self.manifest(site)["files"].items()}

    def deploy(self, site: str, body: bytes, password: str) -> tuple[int, Any, dict[str, str]]:
        token = base64.b64encode(f"{site}:{password}".encode()).decode()
        conn = http.client.HTTPSConnection(
            "localhost", self.deploy_port, context=self.pki.client_ssl(None), timeout=20
        )
        try:
            conn.request(
                "POST",
                f"/api/deploy/{site}",
                body=body,
                headers={"Content-Type": "application/zip", "Authorization": f"Basic {token}"},
            )
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None, dict(resp.getheaders())
        finally:
            conn.close()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    root = tmp_path_factory.mktemp("ftps")
    pki = CloudPKI(root / "pki")
    fs_config = pki.role_config(FileserverConfig, "fileserver", root / "fileserver")
    limits: dict[str, Any] = {
        "ftp_auth_failed_delay": 0.05,
        "ftp_login_timeout": LOGIN_TIMEOUT,
        "ftp_max_connections_per_ip": PER_IP,
        "ftp_max_sessions_per_site": PER_SITE,
        "login_failures_per_account": 5,
        "login_failures_per_address": 40,
    }
    pub_config = pki.role_config(
        PublisherConfig, "publisher", root / "publisher", passive_ports=_free_port_range(20), **limits
    )
    strict_config = pki.role_config(
        PublisherConfig,
        "publisher",
        root / "strict",
        passive_ports=_free_port_range(10),
        require_tls=True,
        ftp_tls_session_reuse="required",
    )
    lenient_config = pki.role_config(
        PublisherConfig,
        "publisher",
        root / "lenient",
        passive_ports=_free_port_range(10),
        ftp_tls_session_reuse="optional",
    )
    fileserver = RoleProcess(fs_config, pki).start()
    publisher = RoleProcess(pub_config, pki)
    strict = RoleProcess(strict_config, pki)
    lenient = RoleProcess(lenient_config, pki)
    try:
        publisher.start(wait=False)
        strict.start(wait=False)
        lenient.start(wait=False)
        for process in (publisher, strict, lenient):
            process.wait_healthy()
        fs_sites = {name: {"uid": f"uid-{name}", "quota_bytes": quota} for name, (_, quota) in SITES.items()}
        fileserver.push_config({"version": 1, "sites": fs_sites})
        pub_sites = {
            name: {**fs_sites[name], "users": {name: hash_password(password)}}
            for name, (password, _) in SITES.items()
        }
        snapshot = {"version": 1, "fileserver": fileserver.control_url, "sites": pub_sites}
        for process in (publisher, strict, lenient):
            process.push_config(snapshot)
        yield Cloud(pki, fileserver, publisher, strict, lenient)
    finally:
        lenient.stop()
        strict.stop()
        publisher.stop()
        fileserver.stop()


def _retr(ftp: ftplib.FTP, path: str) -> bytes:
    out = io.BytesIO()
    ftp.retrbinary(f"RETR {path}", out.write)
    return out.getvalue()


def _run(args: list[str], *, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def _lftp_tls(cloud: Cloud, site: str) -> str:
    """lftp settings that insist on TLS and verify the publisher's certificate against the cloud CA."""
    return (
        "set cmd:fail-exit yes; set net:max-retries 1; set net:timeout 10; "
        f"set ftp:ssl-force true; set ftp:ssl-protect-data true; set ssl:ca-file {cloud.ca_file}; "
        "set ssl:verify-certificate yes; "
        f"open -u {site},{SITES[site][0]} -p {cloud.ftp_port} localhost; "
    )


# --- FTPS with real clients


def test_ftplib_ftps_uploads_lists_and_downloads(cloud: Cloud) -> None:
    with cloud.ftps("tls") as ftp:
        assert isinstance(ftp.sock, ssl.SSLSocket)
        ftp.mkd("docs")
        ftp.storbinary("STOR docs/page.html", io.BytesIO(b"<p>over TLS</p>"))
        # The data connection is TLS too (PROT P), and resumes the control connection's session.
        with ftp.transfercmd("RETR docs/page.html") as data:
            assert isinstance(data, ssl.SSLSocket)
            assert data.recv(100) == b"<p>over TLS</p>"
        ftp.voidresp()
        assert ftp.nlst("docs") == ["page.html"]
        facts = dict(ftp.mlsd("docs"))
        assert facts["page.html"]["size"] == "15"
        assert set(facts["page.html"]["perm"]) == set("radfw")
        assert set(dict(ftp.mlsd("/"))["docs"]["perm"]) == set("eldfmcp")
        assert _retr(ftp, "docs/page.html") == b"<p>over TLS</p>"
        # A TLS upload cut off without close_notify (what a truncating attacker makes) stores nothing.
        conn = ftp.transfercmd("STOR docs/page.html")
        conn.sendall(b"<p>cut")
        conn.close()  # Python's close() sends no close_notify; unwrap() would
        with pytest.raises(ftplib.error_temp, match=r"^426"):
            ftp.voidresp()
        assert _retr(ftp, "docs/page.html") == b"<p>over TLS</p>"
    assert cloud.files("tls") == {"docs/page.html": 15}


def test_a_big_ftps_upload_arrives_intact_and_a_cut_off_one_leaves_nothing(cloud: Cloud) -> None:
    # Past the size where the publisher sends an upload on to the fileserver while it arrives.
    big = random.randbytes(3 * 1024 * 1024 + 5)
    with cloud.ftps("bigtls") as ftp:
        ftp.storbinary("STOR big.bin", io.BytesIO(big))
        entry = cloud.manifest("bigtls")["files"]["big.bin"]
        assert entry["sha256"] == hashlib.sha256(big).hexdigest() and entry["size"] == len(big)
        assert _retr(ftp, "big.bin") == big
        # Cut off without close_notify after 2 MB: the PUT to the fileserver is dropped unfinished.
        conn = ftp.transfercmd("STOR big.bin")
        conn.sendall(random.randbytes(2 * 1024 * 1024))
        conn.close()
        with pytest.raises(ftplib.error_temp, match=r"^426"):
            ftp.voidresp()
        assert _retr(ftp, "big.bin") == big
    assert cloud.files("bigtls") == {"big.bin": len(big)}

    def staging_empty() -> bool:
        return not [p for p in cloud.fileserver.config.home.glob("**/staging/*") if p.is_file()]

    wait_until(staging_empty, what="the cut-off upload's staging file to go")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_ftps_data_connections_resume_the_control_session(cloud: Cloud, version: ssl.TLSVersion) -> None:
    context = cloud.tls_context()
    context.maximum_version = version
    with ResumingFTP_TLS(context=context, timeout=10) as ftp:
        ftp.connect("localhost", cloud.ftp_port)
        ftp.login("tls", SITES["tls"][0])
        ftp.prot_p()
        ftp.storbinary("STOR resume.txt", io.BytesIO(b"resumed"))
        ftp.voidcmd("TYPE I")
        raw = socket.create_connection(ftp.makepasv(), timeout=10)
        assert ftp.sendcmd("RETR resume.txt")[:1] == "1"
        assert isinstance(ftp.sock, ssl.SSLSocket)
        with context.wrap_socket(raw, server_hostname="localhost", session=ftp.sock.session) as data:
            assert data.version() == ("TLSv1.3" if version is ssl.TLSVersion.TLSv1_3 else "TLSv1.2")
            assert data.session_reused
            assert data.recv(100) == b"resumed"
        ftp.voidresp()
        ftp.delete("resume.txt")


def test_an_upload_over_tls_1_3_gets_no_session_ticket_its_client_could_leave_unread(cloud: Cloud) -> None:
    # A TLS 1.3 server sends session tickets after the handshake, unasked. An uploading client never
    # reads its data connection: lftp sends the file and closes, and a ticket arriving at a closed
    # socket makes the client's kernel answer with a reset that drops what it had not sent yet (one
    # upload in ten of an lftp mirror ended "426 Connection broken" and waited to be retried).
    context = cloud.tls_context()
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with ResumingFTP_TLS(context=context, timeout=10) as ftp:
        ftp.connect("localhost", cloud.ftp_port)
        ftp.login("tls", SITES["tls"][0])
        ftp.prot_p()
        ftp.voidcmd("TYPE I")
        body = os.urandom(200_000)
        raw = socket.create_connection(ftp.makepasv(), timeout=10)
        assert ftp.sendcmd("STOR ticketless.bin")[:1] == "1"
        assert isinstance(ftp.sock, ssl.SSLSocket)
        with context.wrap_socket(raw, server_hostname="localhost", session=ftp.sock.session) as data:
            assert data.version() == "TLSv1.3" and data.session_reused
            data.sendall(body[:100_000])
            time.sleep(0.3)  # time enough for the server to send anything it would
            sent, _, _ = select.select([data], [], [], 0)
            assert not sent, "the publisher sent on an upload's data connection before its end"
            data.sendall(body[100_000:])
            data.unwrap()  # close_notify, then the server's (with what it held back before it)
        ftp.voidresp()
        # A download's data connection gets the tickets before its data, and reads them in order.
        assert _retr(ftp, "ticketless.bin") == body
        ftp.delete("ticketless.bin")


def _stranger(version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    """TLS as someone else at the client's address makes it: no credentials, its own sessions."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if version is not None:
        context.maximum_version = version
    return context


def test_ftplib_data_connections_that_do_not_resume_are_refused_with_why(cloud: Cloud) -> None:
    # What an admin's ftp_tls_session_reuse "required" refuses: every data connection that does not
    # resume, ftplib's own client with them.
    with cloud.ftps("noresume", cloud.strict) as ftp:
        ftp.storbinary("STOR kept.txt", io.BytesIO(b"kept"))
    before = len(cloud.strict.log())
    with cloud.ftps("noresume", cloud.strict, resuming=False) as ftp:
        received: list[bytes] = []
        # The data connection's handshake is refused, and the command answered with why.
        with pytest.raises(ssl.SSLError, match="ALERT_ACCESS_DENIED"):
            ftp.retrbinary("RETR kept.txt", received.append)
        with pytest.raises(ftplib.error_perm) as caught:
            ftp.voidresp()
        reply = str(caught.value)
        assert reply.startswith(
            "522 Data connection refused: it did not resume this control connection's TLS"
        ), reply
        assert "session=ftp.sock.session" in reply
        assert received == []
        with pytest.raises(ssl.SSLError, match="ALERT_ACCESS_DENIED"):
            ftp.storbinary("STOR new.txt", io.BytesIO(b"never stored"))
        with pytest.raises(ftplib.error_perm, match=r"^522 Data connection refused"):
            ftp.voidresp()
        # The session goes on.
        assert ftp.size("kept.txt") == 4
    assert cloud.files("noresume") == {"kept.txt": 4}
    assert "did not resume the control connection's TLS session" in cloud.strict.log()[before:]


def test_ftplib_ftps_as_it_stands_publishes_by_default(cloud: Cloud) -> None:
    # Python's own ftplib.FTP_TLS, whose data connections never resume the control connection's TLS
    # session: its data connections are taken when each was its port's only connection.
    pages = {"index.html": b"<h1>ftplib</h1>", "css/site.css": b"body{}", "big.bin": os.urandom(200_000)}
    with cloud.ftps("ftplib", resuming=False) as ftp:
        ftp.mkd("css")
        for path, body in pages.items():
            ftp.storbinary(f"STOR {path}", io.BytesIO(body))
        assert sorted(ftp.nlst()) == ["big.bin", "css", "index.html"]
        assert [name for name, _ in ftp.mlsd("css")] == ["site.css"]
        for path, body in pages.items():
            assert _retr(ftp, path) == body
    assert cloud.files("ftplib") == {path: len(body) for path, body in pages.items()}


def _transfer_reply(ftp: ftplib.FTP, command: str) -> str:
    """The final reply to a transfer command whose data connection was made by hand (its 1xx, if any,
    read on the way)."""
    try:
        first = ftp.sendcmd(command)
    except ftplib.Error as err:
        return str(err)
    assert first[:1] == "1", first
    try:
        return ftp.voidresp()
    except ftplib.Error as err:
        return str(err)


@pytest.mark.parametrize("resuming", [False, True], ids=["ftplib", "resuming client"])
def test_two_connections_to_a_data_port_get_neither_the_transfer(cloud: Cloud, resuming: bool) -> None:
    # Someone at the client's address connects to the data port as soon as it opens. The client
    # connects too (it always does), so the port sees two connections: neither gets the transfer, and
    # the command is answered with why. A client that resumes is checked so on its session's first
    # transfer, before it has shown that it resumes.
    site = "raced" if resuming else "racedftplib"
    with cloud.ftps(site) as owner:
        owner.storbinary("STOR config.php", io.BytesIO(SECRET))
    before = len(cloud.publisher.log())
    for command, reply_code in (("RETR config.php", "425"), ("STOR config.php", "425")):
        with cloud.ftps(site, resuming=resuming) as victim:
            victim.voidcmd("TYPE I")
            port = victim.makepasv()[1]
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as stranger,
                socket.create_connection(("127.0.0.1", port), timeout=10),
            ):
                reply = _transfer_reply(victim, command)
                assert reply.startswith(f"{reply_code} Two connections reached this transfer's data port"), (
                    reply
                )
                stranger.settimeout(5)
                with contextlib.suppress(ConnectionResetError):
                    assert stranger.recv(100) == b""  # closed without a byte
            # The session goes on: a transfer of its own is taken.
            assert _retr(victim, "config.php") == SECRET
    assert cloud.files(site) == {"config.php": len(SECRET)}
    assert "two connections reached its data port" in cloud.publisher.log()[before:]


def test_a_second_connection_during_an_upload_that_did_not_resume_aborts_it(cloud: Cloud) -> None:
    with cloud.ftps("latecomer", resuming=False) as victim:
        victim.storbinary("STOR page.html", io.BytesIO(b"<p>before</p>"))
        victim.voidcmd("TYPE I")
        port = victim.makepasv()[1]
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert victim.sendcmd("STOR page.html").startswith("1")
        with victim.context.wrap_socket(raw, server_hostname="localhost") as data:
            data.sendall(b"<p>half of a")
            time.sleep(0.4)  # past the hold: the transfer is under way
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10),
                pytest.raises(ftplib.error_temp) as caught,
            ):
                victim.voidresp()
        assert str(caught.value).startswith("426 A second connection reached this transfer's data port")
        assert _retr(victim, "page.html") == b"<p>before</p>"
    assert cloud.files("latecomer") == {"page.html": 13}


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_data_port_taken_by_someone_else_at_the_address_gives_them_nothing(
    cloud: Cloud, version: ssl.TLSVersion
) -> None:
    stranger = _stranger(version)

    def steal(port: int, session: ssl.SSLSession | None = None) -> None:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            pytest.raises(ssl.SSLError, match="ALERT_ACCESS_DENIED"),
        ):
            stranger.wrap_socket(raw, server_hostname="localhost", session=session)

    with cloud.ftps("hijack") as victim:
        victim.storbinary("STOR config.php", io.BytesIO(SECRET))
        victim.voidcmd("TYPE I")
        # The stranger connects to the data port first and makes its own TLS session: refused, and the
        # victim's RETR is answered with why instead of waiting for a data connection.
        steal(victim.makepasv()[1])
        with pytest.raises(ftplib.error_perm, match=r"^522 Data connection refused"):
            victim.sendcmd("RETR config.php")
        # The same once the RETR waits for its data connection, and for an upload.
        for command in ("RETR config.php", "STOR config.php"):
            port = victim.makepasv()[1]
            assert victim.sendcmd(command).startswith("150")
            steal(port)
            with pytest.raises(ftplib.error_perm, match=r"^522 Data connection refused"):
                victim.voidresp()
        # A TLS session of the stranger's own on the publisher (AUTH TLS needs no login) does not
        # resume on the victim's data connection either.
        with ftplib.FTP_TLS(context=stranger, timeout=10) as own:
            own.connect("localhost", cloud.ftp_port)
            own.auth()
            own.voidcmd("NOOP")  # a reply read after the handshake brings TLS 1.3's tickets with it
            assert isinstance(own.sock, ssl.SSLSocket) and own.sock.session is not None
            assert own.sock.session.has_ticket
            port = victim.makepasv()[1]
            assert victim.sendcmd("RETR config.php").startswith("150")
            steal(port, own.sock.session)
            with pytest.raises(ftplib.error_perm, match=r"^522 Data connection refused"):
                victim.voidresp()
        # The victim's own transfers go on, and nothing of the stranger's was stored.
        assert _retr(victim, "config.php") == SECRET
    assert cloud.files("hijack") == {"config.php": len(SECRET)}


def test_a_data_connection_gone_during_its_handshake_leaves_no_command_waiting(cloud: Cloud) -> None:
    # Someone at the client's address connects to the data port and goes (at once, or halfway through
    # a ClientHello): the transfer it took is answered at once, and the session goes on.
    def connect_and_go(port: int, sent: bytes) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(sent)
            time.sleep(0.1)

    half_hello = b"\x16\x03\x01\x02\x00\x01"
    with cloud.ftps("gone") as ftp:
        ftp.storbinary("STOR page.html", io.BytesIO(b"<p>stays</p>"))
        ftp.voidcmd("TYPE I")
        for sent in (b"", half_hello):
            port = ftp.makepasv()[1]
            assert ftp.sendcmd("RETR page.html").startswith("150")
            connect_and_go(port, sent)
            with pytest.raises(ftplib.error_temp, match=r"^425 The data connection closed before its TLS"):
                ftp.voidresp()
            # Before the command: the command is answered so, instead of waiting for a connection (or
            # after a 1xx, on a busy machine where the publisher sees the close only after the command).
            connect_and_go(ftp.makepasv()[1], sent)
            time.sleep(0.2)
            with pytest.raises(ftplib.error_temp, match=r"^425 The data connection closed before its TLS"):
                assert ftp.sendcmd("STOR page.html").startswith("125")
                ftp.voidresp()
        # A new PASV starts afresh.
        assert _retr(ftp, "page.html") == b"<p>stays</p>"
    assert cloud.files("gone") == {"page.html": 12}


def test_with_session_reuse_optional_the_first_tls_data_connection_is_taken(cloud: Cloud) -> None:
    # What an admin's ftp_tls_session_reuse "optional" lets in: ftplib's own client, and with it
    # whoever at the client's address connects to the data port first.
    with cloud.ftps("lenient", cloud.lenient, resuming=False) as victim:
        victim.storbinary("STOR config.php", io.BytesIO(SECRET))
        assert _retr(victim, "config.php") == SECRET
        victim.voidcmd("TYPE I")
        port = victim.makepasv()[1]
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            _stranger().wrap_socket(raw, server_hostname="localhost") as taken,
        ):
            assert victim.sendcmd("RETR config.php").startswith("125")
            stolen = b""
            while chunk := taken.recv(65536):
                stolen += chunk
        assert stolen == SECRET
        victim.voidresp()


def _peer_socket_option(process: RoleProcess, conn: socket.socket, level: int, option: int) -> int:
    """A socket option of the role's own end of ``conn``, read from a duplicate of its descriptor
    (pidfd_getfd(2), Linux 5.6: allowed on a child process)."""
    assert process.proc is not None
    pid = process.proc.pid
    # The role's end: local address = conn's peer, remote address = conn's own.
    (cli_host, cli_port), (srv_host, srv_port) = conn.getsockname()[:2], conn.getpeername()[:2]

    def hexaddr(host: str, port: int) -> str:
        return f"{struct.unpack('<I', socket.inet_aton(host))[0]:08X}:{port:04X}"

    wanted = (hexaddr(srv_host, srv_port), hexaddr(cli_host, cli_port))

    def inode() -> str | None:
        for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if (fields[1], fields[2]) == wanted and fields[9] != "0":  # 0: not accepted yet
                return fields[9]
        return None

    target = f"socket:[{wait_until(inode, what='the role end of the connection')}]"
    fd = -1
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # a descriptor closed meanwhile
            if os.readlink(entry) == target:
                fd = int(entry.name)
    assert fd >= 0, f"the role holds no descriptor for {target}"
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        copy = libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0)
        if copy < 0:
            pytest.skip(f"pidfd_getfd refused: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(pidfd)
    with socket.socket(fileno=copy) as dup:
        return dup.getsockopt(level, option)


def test_control_and_data_connections_send_small_segments_at_once(cloud: Cloud) -> None:
    # Nagle's algorithm held each data connection's last small segment until the client's delayed
    # acknowledgement, 40 ms later: lftp mirroring small files over FTPS waited that per file.
    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY)
    with cloud.ftps("tls") as ftps, cloud.ftp("tls") as plain:
        for ftp in (ftps, plain):
            ftp.voidcmd("TYPE I")
            assert _peer_socket_option(cloud.publisher, ftp.sock, *nodelay)
            with ftp.transfercmd("STOR nodelay.txt") as data:
                assert isinstance(data, ssl.SSLSocket) == (ftp is ftps)
                assert _peer_socket_option(cloud.publisher, data, *nodelay)
                data.sendall(b"sent")
                if isinstance(data, ssl.SSLSocket):
                    data.unwrap()  # close_notify: the upload is complete
            assert ftp.voidresp().startswith("226")
        ftps.delete("nodelay.txt")


def test_lftp_with_forced_tls_uploads_lists_and_downloads(cloud: Cloud, tmp_path: Path) -> None:
    lftp = _tool("lftp")
    (tmp_path / "hello.txt").write_bytes(b"hello from lftp over TLS\n")
    got = tmp_path / "got"
    got.mkdir()
    script = (
        _lftp_tls(cloud, "lftptls")
        + f"put {tmp_path / 'hello.txt'} -o hello.txt; cls -1; get hello.txt -o {got}/hello.txt; bye"
    )
    result = _run([lftp, "-c", script])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hello.txt" in result.stdout
    assert (got / "hello.txt").read_bytes() == b"hello from lftp over TLS\n"
    assert cloud.files("lftptls") == {"hello.txt": 25}


def test_curl_with_ssl_reqd_uploads_lists_and_downloads(cloud: Cloud, tmp_path: Path) -> None:
    curl = _tool("curl")
    (tmp_path / "page.html").write_bytes(b"<h1>curl</h1>")
    base = f"ftp://localhost:{cloud.ftp_port}"
    common = [
        curl,
        "-sS",
        "--ssl-reqd",
        "--cacert",
        str(cloud.ca_file),
        "--user",
        f"curltls:{SITES['curltls'][0]}",
    ]
    put = _run([*common, "--ftp-create-dirs", "-T", str(tmp_path / "page.html"), f"{base}/www/page.html"])
    assert put.returncode == 0, put.stderr
    listing = _run([*common, "--list-only", f"{base}/www/"])
    assert listing.returncode == 0 and listing.stdout.split() == ["page.html"], listing.stderr
    get = _run([*common, f"{base}/www/page.html"])
    assert get.returncode == 0 and get.stdout == "<h1>curl</h1>", get.stderr
    # Without the cloud CA, curl refuses the certificate: it is really verified.
    untrusted = _run([curl, "-sS", "--ssl-reqd", "--user", "curltls:x", f"{base}/"])
    assert untrusted.returncode != 0
    assert cloud.files("curltls") == {"www/page.html": 13}


def test_lftp_and_curl_resume_the_session_over_tls_1_2_too(cloud: Cloud, tmp_path: Path) -> None:
    # TLS 1.2 resumes otherwise than TLS 1.3 (a ticket or session id in the handshake, not a PSK).
    lftp, curl = _tool("lftp"), _tool("curl")
    (tmp_path / "a.txt").write_bytes(b"lftp over TLS 1.2\n")
    (tmp_path / "b.txt").write_bytes(b"curl over TLS 1.2\n")
    script = (
        "set ssl:priority NORMAL:-VERS-TLS1.3; "
        + _lftp_tls(cloud, "tls12")
        + f"put {tmp_path / 'a.txt'} -o a.txt; get a.txt -o {tmp_path}/a.back; bye"
    )
    result = _run([lftp, "-c", script])
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "a.back").read_bytes() == b"lftp over TLS 1.2\n"
    common = [curl, "-sS", "--ssl-reqd", "--tls-max", "1.2", "--cacert", str(cloud.ca_file)]
    common += ["--user", f"tls12:{SITES['tls12'][0]}"]
    base = f"ftp://localhost:{cloud.ftp_port}"
    put = _run([*common, "-T", str(tmp_path / "b.txt"), f"{base}/b.txt"])
    assert put.returncode == 0, put.stderr
    get = _run([*common, f"{base}/b.txt"])
    assert get.returncode == 0 and get.stdout == "curl over TLS 1.2\n", get.stderr
    assert cloud.files("tls12") == {"a.txt": 18, "b.txt": 18}


def test_require_tls_refuses_user_before_auth_tls(cloud: Cloud) -> None:
    with ftplib.FTP(timeout=10) as ftp:
        ftp.connect("127.0.0.1", cloud.port(cloud.strict))
        with pytest.raises(ftplib.error_perm) as caught:
            ftp.login("strict", SITES["strict"][0])
        assert str(caught.value).startswith("530 This server requires FTPS"), caught.value
    ftps = ResumingFTP_TLS(context=cloud.tls_context(), timeout=10)
    with ftps:
        ftps.connect("localhost", cloud.port(cloud.strict))
        ftps.login("strict", SITES["strict"][0])
        # Data connections must be protected too.
        with pytest.raises(ftplib.error_perm, match=r"^521"):
            ftps.nlst()
        ftps.prot_p()
        ftps.storbinary("STOR s.txt", io.BytesIO(b"strict"))
        assert ftps.nlst() == ["s.txt"]


# --- lftp mirror and quota refusals


def test_lftp_mirror_reverse_exits_0_without_flags(cloud: Cloud, tmp_path: Path) -> None:
    lftp = _tool("lftp")
    local = tmp_path / "site"
    (local / "css").mkdir(parents=True)
    (local / "img" / "icons").mkdir(parents=True)
    (local / "index.html").write_bytes(b"<h1>mirrored</h1>")
    (local / "css" / "site.css").write_bytes(b"body{}" * 100)
    (local / "img" / "icons" / "x.bin").write_bytes(bytes(range(256)) * 40)
    (local / "run.sh").write_bytes(b"#!/bin/sh\n")
    (local / "run.sh").chmod(0o755)
    # lftp's defaults (TLS when offered, certificate checked), told only where the cloud CA is.
    script = (
        f"set cmd:fail-exit yes; set net:max-retries 1; set net:timeout 10; set ssl:ca-file {cloud.ca_file}; "
        f"open -u mirror,{SITES['mirror'][0]} -p {cloud.ftp_port} 127.0.0.1; mirror -R {local} /; bye"
    )
    result = _run([lftp, "-c", script])
    assert result.returncode == 0, result.stdout + result.stderr
    assert cloud.files("mirror") == {
        "css/site.css": 600,
        "img/icons/x.bin": 10240,
        "index.html": 17,
        "run.sh": 10,
    }
    # Mirroring again (nothing changed), in plain FTP this time, is a clean no-op.
    plain = (
        "set cmd:fail-exit yes; set net:max-retries 1; set net:timeout 10; set ftp:ssl-allow no; "
        f"open -u mirror,{SITES['mirror'][0]} -p {cloud.ftp_port} 127.0.0.1; mirror -R {local} /; bye"
    )
    again = _run([lftp, "-c", plain])
    assert again.returncode == 0, again.stdout + again.stderr


def test_over_quota_curl_and_lftp_show_552_and_stop(cloud: Cloud, tmp_path: Path) -> None:
    curl, lftp = _tool("curl"), _tool("lftp")
    big = tmp_path / "big.bin"
    big.write_bytes(random.randbytes(4 * TINY_QUOTA))
    before = cloud.manifest("full")

    started = time.monotonic()
    result = _run(
        [
            curl,
            "-sSv",
            "--user",
            f"full:{SITES['full'][0]}",
            "-T",
            str(big),
            f"ftp://127.0.0.1:{cloud.ftp_port}/big.bin",
        ],
        timeout=30,
    )
    # 70 is curl's "Exceeded storage allocation": the 552 reply, read on the control connection.
    assert result.returncode == 70, result.stderr
    assert "< 552 upload of /big.bin stopped" in result.stderr and "quota" in result.stderr, result.stderr
    assert "reset" not in result.stderr.lower(), result.stderr
    assert time.monotonic() - started < 10
    # The same over FTPS, where the refused rest arrives over TLS.
    result = _run(
        [
            curl,
            "-sSv",
            "--ssl-reqd",
            "--cacert",
            str(cloud.ca_file),
            "--user",
            f"full:{SITES['full'][0]}",
            "-T",
            str(big),
            f"ftp://localhost:{cloud.ftp_port}/big.bin",
        ],
        timeout=30,
    )
    assert result.returncode == 70 and "< 552 upload of /big.bin stopped" in result.stderr, result.stderr

    started = time.monotonic()
    script = (
        "set cmd:fail-exit yes; set net:max-retries 3; set net:timeout 5; set ftp:ssl-allow no; "
        f"open -u full,{SITES['full'][0]} -p {cloud.ftp_port} 127.0.0.1; put {big} -o big.bin; bye"
    )
    result = _run([lftp, "-c", script], timeout=60)
    assert result.returncode != 0
    assert "552" in result.stderr and "quota" in result.stderr, result.stdout + result.stderr
    assert time.monotonic() - started < 15
    assert cloud.manifest("full") == before

    # The refusal left the session usable: a file that fits still goes in.
    with cloud.ftp("full") as ftp:
        ftp.storbinary("STOR small.txt", io.BytesIO(b"fits"))
    assert cloud.files("full") == {"small.txt": 4}


# --- abuse limits


def _banner(sock: socket.socket) -> str:
    sock.settimeout(10)
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    return data.decode()


def test_connections_per_address_are_capped_and_the_server_lives(cloud: Cloud) -> None:
    idle: list[socket.socket] = []
    try:
        for _ in range(PER_IP):
            sock = socket.create_connection(("127.0.0.1", cloud.ftp_port), timeout=10)
            idle.append(sock)
            assert _banner(sock).startswith("220")
        with pytest.raises(ftplib.error_temp) as caught:
            cloud.ftp("caps")
        assert str(caught.value).startswith("421 Too many connections from your address"), caught.value
        # Another address is not held up by this one's connections.
        cloud.ftp("caps", source="127.0.0.2").quit()
    finally:
        for sock in idle:
            sock.close()

    def logs_in() -> bool:
        try:
            cloud.ftp("caps").quit()
        except ftplib.error_temp:
            return False
        return True

    deadline = time.monotonic() + 10
    while not logs_in():
        assert time.monotonic() < deadline, "the address stayed refused after its connections closed"
        time.sleep(0.1)


def test_a_sites_sessions_are_capped_from_any_addresses_and_others_log_in(cloud: Cloud) -> None:
    # One tenant's logins kept alive from many addresses held the whole connection table (and the
    # passive range with it): now a site has at most PER_SITE sessions at once.
    sessions = [cloud.ftp("caps", source=f"127.0.0.{10 + n}") for n in range(PER_SITE)]
    try:
        with pytest.raises(ftplib.error_temp) as caught:
            cloud.ftp("caps", source="127.0.0.30")
        assert str(caught.value).startswith(
            f"421 Too many FTP sessions of site caps at once (at most {PER_SITE})"
        )
        cloud.ftp("bystander", source="127.0.0.30").quit()  # another site is not held up
        sessions.pop().quit()

        def logs_in() -> bool:
            try:
                sessions.append(cloud.ftp("caps", source="127.0.0.30"))
            except ftplib.error_temp:
                return False
            return True

        wait_until(logs_in, timeout=10, what="a session's place to be free again once one quit")
    finally:
        for ftp in sessions:
            with contextlib.suppress(OSError, ftplib.Error):
                ftp.quit()


def test_a_pasv_with_every_port_of_the_range_taken_is_refused_not_sent_elsewhere(cloud: Cloud) -> None:
    # Elsewhere is a port of the kernel's, which a firewall opened for the range drops: the client
    # waited for its data connection to time out. Now it is told at once, and can try again.
    config = cloud.publisher.config
    assert isinstance(config, PublisherConfig) and config.passive_ports is not None
    low, high = config.passive_ports
    taken: list[socket.socket] = []
    ftp = cloud.ftp("bystander")
    try:
        for port in range(low, high + 1):
            sock = socket.socket()
            # (Past earlier tests' data connections in TIME_WAIT, as the publisher binds too.)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with contextlib.suppress(OSError):  # one a transfer of the publisher's own holds now
                sock.bind(("127.0.0.1", port))
                sock.listen()
            taken.append(sock)
        with pytest.raises(
            ftplib.error_temp, match=rf"^425 no data port of this server's range \({low}-{high}\)"
        ):
            ftp.makepasv()
        for sock in taken:
            sock.close()
        taken.clear()
        assert low <= ftp.makepasv()[1] <= high  # the session goes on
    finally:
        for sock in taken:
            sock.close()
        ftp.quit()


def test_connections_that_do_not_log_in_are_closed(cloud: Cloud) -> None:
    with socket.create_connection(("127.0.0.1", cloud.ftp_port), timeout=10) as sock:
        assert _banner(sock).startswith("220")
        started = time.monotonic()
        # Keeping the connection busy does not keep it open: the deadline counts from connect.
        sock.sendall(b"NOOP\r\n")
        assert _banner(sock).startswith("200")
        rest = b""
        while chunk := sock.recv(1024):
            rest += chunk
        waited = time.monotonic() - started
        assert rest.decode().startswith("421 No login within"), rest
        assert LOGIN_TIMEOUT - 0.5 <= waited <= LOGIN_TIMEOUT + 3, waited
    # A client that asks for TLS and then never completes the handshake is closed as well.
    with socket.create_connection(("127.0.0.1", cloud.ftp_port), timeout=10) as sock:
        assert _banner(sock).startswith("220")
        sock.sendall(b"AUTH TLS\r\n")
        assert _banner(sock).startswith("234")
        started = time.monotonic()
        assert sock.recv(1024) == b""
        assert time.monotonic() - started <= LOGIN_TIMEOUT + 3
    # A login well within the deadline is not affected.
    with cloud.ftp("caps") as ftp:
        time.sleep(LOGIN_TIMEOUT + 0.5)
        assert ftp.nlst() is not None


def test_abor_whose_reply_finds_the_connection_reset_logs_no_traceback(cloud: Cloud) -> None:
    # pyftpdlib closes the session inside ABOR when its reply cannot be sent; what ABOR does after
    # that must not trip over the closed session.
    before = len(cloud.publisher.log())
    for _ in range(3):
        ftp = cloud.ftp("abort")
        ftp.sendcmd("PASV")  # a data port for ABOR to close
        ftp.sock.sendall(b"ABOR\r\n")
        ftp.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        ftp.close()  # a reset, not a FIN: the reply meets it
    wait_until(lambda: cloud.publisher.health()["ftp_sessions"] == 0, what="the sessions to close")
    log = cloud.publisher.log()[before:]
    assert "ABOR failed" not in log and "Traceback" not in log, log


def test_failed_logins_are_throttled_per_account_and_address(cloud: Cloud) -> None:
    for _ in range(5):
        with pytest.raises(ftplib.error_perm, match=r"^530"):
            cloud.ftp("victim", "guess")
    with pytest.raises(ftplib.error_perm) as caught:
        cloud.ftp("victim", "guess")
    reply = str(caught.value)
    assert reply.startswith("530 Too many failed logins for victim") and "try again in" in reply, reply
    # Even the right password waits from this address...
    with pytest.raises(ftplib.error_perm, match=r"^530 Too many failed logins"):
        cloud.ftp("victim")
    # ...but the owner from another address, and another account from this one, are not delayed.
    started = time.monotonic()
    cloud.ftp("victim", source="127.0.0.2").quit()
    cloud.ftp("bystander").quit()
    assert time.monotonic() - started < 2


def test_web_deploy_failed_logins_get_429_with_retry_after(cloud: Cloud) -> None:
    body = _zip({"index.html": b"deployed"})
    for _ in range(5):
        status, _, _ = cloud.deploy("webdeploy", body, "guess")
        assert status == 401
    status, answer, headers = cloud.deploy("webdeploy", body, "guess")
    assert status == 429, answer
    assert int(headers["Retry-After"]) > 0
    assert answer["error"]["code"] == "rate_limited" and "try again in" in answer["error"]["hint"]
    status, _, _ = cloud.deploy("webdeploy", body, SITES["webdeploy"][0])
    assert status == 429
    # The same account over FTP from the same address is held up too: one throttle for both doors.
    with pytest.raises(ftplib.error_perm, match=r"^530 Too many failed logins"):
        cloud.ftp("webdeploy")


# --- names no worker could hold


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_names_over_255_bytes_or_not_utf8_are_refused_everywhere(cloud: Cloud) -> None:
    longest = "n" * 251 + ".txt"  # 255 bytes
    too_long = "n" * 252 + ".txt"  # 256 bytes
    wide = "é" * 128  # 256 bytes in UTF-8, 128 characters
    with cloud.ftp("names") as ftp:
        ftp.storbinary(f"STOR {longest}", io.BytesIO(b"ok"))
        for name in (too_long, wide, "/".join(["d" * 200] * 6)):
            with pytest.raises(ftplib.error_perm) as caught:
                ftp.storbinary(f"STOR {name}", io.BytesIO(b"x"))
            assert str(caught.value).startswith("553 "), caught.value
        with pytest.raises(ftplib.error_perm, match=r"^553 .*255 bytes"):
            ftp.mkd(too_long)
        with pytest.raises(ftplib.error_perm, match=r"^553 "):
            ftp.rename(longest, too_long)
        # Bytes that are not UTF-8 in a command.
        ftp.sock.sendall(b"MKD bad\xff\xfename\r\n")
        with pytest.raises(ftplib.error_perm, match=r"^553 .*UTF-8"):
            ftp.getresp()
    assert cloud.files("names") == {longest: 2}


def test_long_names_are_refused_at_every_door_and_the_site_still_syncs(cloud: Cloud, tmp_path: Path) -> None:
    before = cloud.manifest("names")
    status, answer, _ = cloud.deploy("names", _zip({"n" * 256: b"x"}), SITES["names"][0])
    assert status == 400 and "255 bytes" in answer["error"]["message"], answer
    # The fileserver refuses the same name from any caller, so no site can ever hold one.
    status, answer = call(
        f"{cloud.fileserver.control_url}/v1/sites/names/commit",
        cloud.pki.client_ssl("publisher"),
        method="POST",
        body={"ops": [{"op": "mkdir", "path": "d" * 256}]},
    )
    assert status == 400 and "255 bytes" in json.dumps(answer), answer
    assert cloud.manifest("names") == before

    # A worker syncs the site, before and after the refusals, and serves what came in last.
    config = cloud.pki.role_config(WorkerConfig, "worker", tmp_path / "worker", version_grace=0.3)
    worker = RoleProcess(config, cloud.pki).start()
    try:
        worker.push_config(
            {
                "version": 1,
                "fileserver": cloud.fileserver.control_url,
                "sites": {"names": {"uid": "uid-names"}},
            }
        )
        with cloud.ftp("names") as ftp:
            with pytest.raises(ftplib.error_perm, match=r"^553 "):
                ftp.storbinary(f"STOR {'x' * 256}.html", io.BytesIO(b"never"))
            ftp.storbinary("STOR after.html", io.BytesIO(b"still syncing"))

        def served() -> bool:
            conn = http.client.HTTPSConnection(
                "localhost", config.data_port, context=cloud.pki.client_ssl("frontend"), timeout=10
            )
            try:
                conn.request("GET", "/after.html", headers={"X-Sitecloud-Site": "names"})
                resp = conn.getresponse()
                return resp.status == 200 and resp.read() == b"still syncing"
            finally:
                conn.close()

        wait_until(served, timeout=15, what="the worker to serve the upload after the refused names")
    finally:
        worker.stop()
