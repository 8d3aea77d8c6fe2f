from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from roles.worker._layout import apps_root_home
from tests.support import CloudPKI

# Modules whose clouds are network-namespace hosts: they share one bridge, subnet and /etc/hosts
# block, so two test processes (`make test` runs two, a module in each) take turns with them. Their
# veths come and go on this machine's own network, which Chromium takes for a network change that
# aborts a page load (ERR_NETWORK_CHANGED): the browser's modules share a turn among themselves.
_NETNS_FABRIC_MODULES = frozenset(
    {"test_e2e_fabric", "test_e2e_mixed", "test_e2e_multihost_publisher", "test_fabric_netns"}
)
_BROWSER_MODULES = frozenset({"test_portal", "test_portal_cloud"})
_HOST_NETWORK_LOCK = Path("/run/lock/sitecloud-tests-host-network")


@pytest.fixture(scope="module", autouse=True)
def host_network_turn(request: pytest.FixtureRequest) -> Iterator[None]:
    module = request.module.__name__.rpartition(".")[2]
    if module not in _NETNS_FABRIC_MODULES | _BROWSER_MODULES:
        yield
        return
    _HOST_NETWORK_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with _HOST_NETWORK_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if module in _NETNS_FABRIC_MODULES else fcntl.LOCK_SH)
        yield


@pytest.fixture
def pki(tmp_path: Path) -> CloudPKI:
    return CloudPKI(tmp_path / "pki")


@pytest.fixture(scope="module")
def traversable_home() -> Iterator[Path]:
    """A cloud home whose ancestors other uids can pass through, as a site's app (its own uid) must.

    pytest's own temp dirs are 0700 root, which would lock the apps out.
    """
    root = Path(tempfile.mkdtemp(prefix="sitecloud-cloud-"))
    os.chmod(root, 0o711)
    yield root / "home"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def no_worker_apps_dirs_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A worker whose home is under a closed directory (pytest's 0700 temp, as root) keeps its content
    in /var/lib/sitecloud/apps-<hash> (roles/worker/_layout.py): remove those this session's made.

    Only those whose home is in this session's temp dir or gone: other sessions on the machine may be
    running clouds of their own right now."""
    session_tmp = str(tmp_path_factory.getbasetemp()) + "/"
    base = Path("/var/lib/sitecloud")
    existed = base.is_dir()
    before = set(base.iterdir()) if existed else set()
    yield
    if not base.is_dir():
        return
    for made in set(base.glob("apps-*")) - before:
        home = apps_root_home(made)
        if home is None:
            continue
        if home.startswith(tempfile.gettempdir() + "/") and (
            home.startswith(session_tmp) or not os.path.exists(home)
        ):
            shutil.rmtree(made, ignore_errors=True)
    if not existed:
        with contextlib.suppress(OSError):
            base.rmdir()


def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """A test must not leave threads running or file descriptors open (pyftpdlib's discipline)."""
    threads_before = set(threading.enumerate())
    fds_before = _open_fds()
    yield
    deadline = time.monotonic() + 3
    while True:
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        # Module-scoped fixtures may keep a few descriptors across tests; only growth counts.
        fds = _open_fds() - fds_before
        if (not threads and len(fds) <= 4) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not threads, f"test leaked threads: {threads}"
    assert len(fds) <= 4, f"test leaked file descriptors: {sorted(fds)}"
