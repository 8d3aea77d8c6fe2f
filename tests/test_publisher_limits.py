"""The publisher's limits as units: the failed-login throttle, the path names every door accepts, the
publisher's config checks and the admin's publisher settings in the controller's cloud.json."""

from __future__ import annotations

import errno
import ftplib
import io
import json
import threading
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from roles.controller.config import CloudConfig
from roles.controller.home import CloudHome
from roles.publisher._throttle import LoginThrottle
from roles.publisher.config import PublisherConfig
from roles.publisher.zipsafe import check_zip
from shared.errors import InvalidInput
from shared.net import free_port_range
from shared.paths import MAX_NAME_BYTES, MAX_PATH_BYTES, _normalise, site_relpath
from tests.support import CloudPKI, RoleProcess


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _throttle(clock: Clock, *, max_entries: int = 1000) -> LoginThrottle:
    return LoginThrottle(per_account=5, per_address=20, window=300.0, max_entries=max_entries, clock=clock)


# --- the throttle


def test_the_sixth_failure_waits_and_the_allowance_refills() -> None:
    clock = Clock()
    throttle = _throttle(clock)
    for _ in range(5):
        assert throttle.retry_after("alice", "192.0.2.1") == 0
        throttle.failed("alice", "192.0.2.1")
        clock.now += 1
    wait = throttle.retry_after("alice", "192.0.2.1")
    # One more try fits again once a fifth of the window has drained (60 s), less what already has.
    assert 50 <= wait <= 60
    clock.now += wait
    assert throttle.retry_after("alice", "192.0.2.1") == 0


def test_other_addresses_and_other_accounts_are_not_held_up() -> None:
    clock = Clock()
    throttle = _throttle(clock)
    for _ in range(5):
        throttle.failed("alice", "192.0.2.1")
    assert throttle.retry_after("alice", "192.0.2.1") > 0
    assert throttle.retry_after("alice", "198.51.100.7") == 0
    assert throttle.retry_after("bob", "192.0.2.1") == 0


def test_a_success_forgets_that_clients_failures_on_the_account() -> None:
    clock = Clock()
    throttle = _throttle(clock)
    for _ in range(4):
        throttle.failed("alice", "192.0.2.1")
    throttle.succeeded("alice", "192.0.2.1")
    for _ in range(4):
        throttle.failed("alice", "192.0.2.1")
    assert throttle.retry_after("alice", "192.0.2.1") == 0


def test_one_address_guessing_many_accounts_is_throttled() -> None:
    clock = Clock()
    throttle = _throttle(clock)
    for n in range(20):
        throttle.failed(f"user{n}", "192.0.2.1")
    assert throttle.retry_after("fresh-account", "192.0.2.1") > 0
    assert throttle.retry_after("fresh-account", "192.0.2.2") == 0


def test_an_account_under_attack_refuses_only_addresses_that_failed_on_it() -> None:
    clock = Clock()
    throttle = _throttle(clock)
    for n in range(50):  # ten times the per-address allowance, from many addresses
        throttle.failed("alice", f"10.0.{n // 250}.{n % 250}")
    throttle.failed("alice", "192.0.2.9")
    assert throttle.retry_after("alice", "192.0.2.9") > 0  # one failure here is enough now
    assert throttle.retry_after("alice", "198.51.100.7") == 0  # the owner, from a clean address


def test_ipv6_clients_are_counted_per_64_and_tables_stay_bounded() -> None:
    clock = Clock()
    throttle = _throttle(clock, max_entries=100)
    for _ in range(5):
        throttle.failed("alice", "2001:db8:1:2::1")
    assert throttle.retry_after("alice", "2001:db8:1:2:ffff::9") > 0
    for n in range(10_000):
        throttle.failed(f"user{n}", f"10.{n // 65536}.{n // 256 % 256}.{n % 256}")
    assert throttle.entries <= 300


# --- names


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/" + "a" * MAX_NAME_BYTES, "a" * MAX_NAME_BYTES),
        ("/dir/" + "é" * 127 + "/x", "dir/" + "é" * 127 + "/x"),  # 254 bytes
    ],
)
def test_names_up_to_255_bytes_are_fine(path: str, expected: str) -> None:
    assert site_relpath(path) == expected


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/" + "a" * (MAX_NAME_BYTES + 1), "at most 255 bytes"),
        ("/" + "é" * 128, "at most 255 bytes"),  # 128 characters, 256 bytes
        ("/".join(["d" * 200] * 6), f"at most {MAX_PATH_BYTES} bytes"),
        ("/bad\udcffname", "not valid UTF-8"),  # surrogateescape'd bytes
        ("/bad\ufffdname", "not valid UTF-8"),  # errors="replace"d bytes
    ],
)
def test_names_no_worker_could_hold_are_refused(path: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        site_relpath(path)


_TRICKY = st.text(alphabet=st.sampled_from(list("ab./\\:\x00\x1f\x7f \ufffd\udcffé")), max_size=12)


@settings(max_examples=3000, deadline=None, derandomize=True)
@given(
    st.one_of(
        _TRICKY,
        st.lists(
            st.sampled_from(["a", ".", "..", "", "c:", "a" * 255, "a" * 256, "é" * 128]), max_size=6
        ).map("/".join),
    ),
    st.booleans(),
)
def test_the_quick_path_check_agrees_with_the_full_walk(path: str, allow_root: bool) -> None:
    # Plain paths skip the walk over names; whatever the walk refuses or rewrites must still be.
    def outcome(check: Callable[[], str]) -> str:
        try:
            return "ok " + check()
        except InvalidInput as exc:
            return "refused " + exc.message

    assert outcome(lambda: site_relpath(path, allow_root=allow_root)) == outcome(
        lambda: _normalise(path, allow_root=allow_root)
    )


def _zip_with_raw_name(raw: bytes) -> zipfile.ZipFile:
    buf = io.BytesIO()
    placeholder = "P" * len(raw)
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(placeholder, b"x")
    data = buf.getvalue().replace(placeholder.encode(), raw)
    return zipfile.ZipFile(io.BytesIO(data))


def test_zip_member_names_must_be_utf8_and_short() -> None:
    # UTF-8 without the zip's UTF-8 flag (Info-ZIP, macOS) is read as UTF-8.
    plan = check_zip(_zip_with_raw_name("café.html".encode()), max_total_bytes=1000)
    assert [m.path for m in plan.files] == ["café.html"]
    with pytest.raises(InvalidInput, match="not valid UTF-8"):
        check_zip(_zip_with_raw_name(b"caf\xe9.html"), max_total_bytes=1000)  # Latin-1
    with pytest.raises(InvalidInput, match="255 bytes"):
        check_zip(_zip_with_raw_name(b"n" * 256), max_total_bytes=1000)


# --- config


def test_publisher_config_refuses_nonsense(tmp_path: Path) -> None:
    base = {"host": "localhost", "home": tmp_path}
    with pytest.raises(ValueError, match="require_tls needs ftp_tls"):
        PublisherConfig(**base, require_tls=True, ftp_tls=False)
    with pytest.raises(ValueError, match="login_failures_per_account"):
        PublisherConfig(**base, login_failures_per_account=0)
    with pytest.raises(ValueError, match="passive_ports"):
        PublisherConfig(**base, passive_ports=(3000, 2000))
    with pytest.raises(ValueError, match="ftp_tls_session_reuse must be one of required, checked, optional"):
        PublisherConfig(**base, ftp_tls_session_reuse="sometimes")  # type: ignore[arg-type]
    assert PublisherConfig(**base).ftp_tls_session_reuse == "checked"
    config = PublisherConfig(**base, ftp_tls_cert_file=tmp_path / "ftp.pem")
    assert config.ftp_cert_file == config.ftp_key_file == tmp_path / "ftp.pem"
    assert PublisherConfig(**base).ftp_cert_file == PublisherConfig(**base).cert_file


def test_the_admins_publisher_settings_reach_the_publishers_config(tmp_path: Path) -> None:
    home_dir = tmp_path / "cloud"
    home_dir.mkdir()
    settings = {
        "require_tls": True,
        "ftp_max_connections_per_ip": 32,
        "passive_ports": [40000, 40099],
        "ftp_tls_session_reuse": "optional",
    }
    (home_dir / "cloud.json").write_text(json.dumps({"publisher": settings}))
    home = CloudHome(CloudConfig(home=home_dir))
    home.prepare()
    written = json.loads((home.role_home("publisher") / "role.json").read_text())
    assert written["require_tls"] is True
    assert written["ftp_max_connections_per_ip"] == 32
    assert written["passive_ports"] == [40000, 40099]
    assert written["ftp_tls_session_reuse"] == "optional"
    remote = home.remote_role_config("publisher", "pub1.example.net", Path("/srv/pub"), controller_url="x")
    assert isinstance(remote, PublisherConfig) and remote.require_tls
    assert remote.ftp_tls_session_reuse == "optional"

    (home_dir / "cloud.json").write_text(json.dumps({"publisher": {"require_tsl": True}}))
    with pytest.raises(InvalidInput, match="unknown publisher settings"):
        CloudHome(CloudConfig(home=home_dir)).prepare()
    (home_dir / "cloud.json").write_text(json.dumps({"publisher": {"require_tls": True, "ftp_tls": False}}))
    with pytest.raises(InvalidInput, match="require_tls needs ftp_tls"):
        CloudHome(CloudConfig(home=home_dir)).prepare()


def test_an_ftp_server_without_tls_does_not_offer_it(tmp_path: Path) -> None:
    pki = CloudPKI(tmp_path / "pki")
    config = pki.role_config(PublisherConfig, "publisher", tmp_path / "publisher", ftp_tls=False)
    publisher = RoleProcess(config, pki).start()
    try:
        assert publisher.health()["ftp_tls"] is False
        with ftplib.FTP(timeout=10) as ftp:
            ftp.connect("127.0.0.1", config.ftp_port)
            assert "AUTH TLS" not in ftp.sendcmd("FEAT")
            with pytest.raises(ftplib.error_perm, match=r"^500"):
                ftp.sendcmd("AUTH TLS")
    finally:
        publisher.stop()


def test_a_passive_port_taken_between_bind_and_listen_is_not_a_failed_pasv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two sessions may bind the same passive port (SO_REUSEADDR) and the second listen() then fails;
    # that race is forced here for the first two ports tried, on pyftpdlib's own server.
    with warnings.catch_warnings():
        # pyftpdlib's FTPS side pulls in asyncore, deprecated since Python 3.10.
        warnings.simplefilter("ignore", DeprecationWarning)
        from pyftpdlib.authorizers import DummyAuthorizer
        from pyftpdlib.handlers import FTPHandler
        from pyftpdlib.servers import FTPServer

        from roles.publisher._ftp import _PassiveListener

    tried: list[int] = []
    listen = FTPHandler.passive_dtp.listen

    def taken_first(self: Any, num: int) -> None:
        tried.append(self.socket.getsockname()[1])
        if len(tried) <= 2:
            raise OSError(errno.EADDRINUSE, "Address already in use")
        listen(self, num)

    monkeypatch.setattr(FTPHandler.passive_dtp, "listen", taken_first)
    authorizer = DummyAuthorizer()
    authorizer.add_user("user", "secret", str(tmp_path), perm="elradfmw")
    first = free_port_range(3)
    ports = [first, first + 1, first + 2]
    handler = type(
        "Handler",
        (FTPHandler,),
        {"authorizer": authorizer, "passive_dtp": _PassiveListener, "passive_ports": ports},
    )
    server = FTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"timeout": 0.05}, daemon=True)
    thread.start()
    try:
        with ftplib.FTP(timeout=10) as ftp:
            ftp.connect("127.0.0.1", server.address[1])
            ftp.login("user", "secret")
            assert ftp.storbinary("STOR page.html", io.BytesIO(b"<p>hi</p>")).startswith("226")
            assert len(tried) == 3 and len(set(tried)) == 3 and set(tried) <= set(ports), tried
            assert (tmp_path / "page.html").read_bytes() == b"<p>hi</p>"
    finally:
        server.close_all()
        thread.join(5)
