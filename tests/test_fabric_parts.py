"""The fabric's small trust boundaries: the managed /etc/hosts block, pinned SSH host keys, code hash."""

from __future__ import annotations

import shutil
from pathlib import Path

import asyncssh
import pytest

from roles.controller.config import CloudConfig
from roles.controller.fabric._etchosts import BEGIN, END, read_block, render, update_hosts_file
from roles.controller.fabric._ssh import SshAccess
from roles.controller.fabric._wheelhouse import code_hash
from roles.controller.home import CloudHome
from roles.worker.config import WorkerConfig
from shared.errors import InvalidInput

SYSTEM = "127.0.0.1 localhost\n# a comment the admin wrote\n::1 ip6-localhost\n"


def test_hosts_block_is_added_replaced_and_removed_leaving_the_rest(tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text(SYSTEM)
    update_hosts_file(hosts, add={"web1": "10.213.0.3", "fe1": "10.213.0.2"})
    text = hosts.read_text()
    assert text.startswith(SYSTEM) and BEGIN in text and END in text
    assert text.index("fe1") < text.index("web1")  # ordered by address
    assert read_block(text) == {"fe1": "10.213.0.2", "web1": "10.213.0.3"}
    update_hosts_file(hosts, add={"web1": "10.213.0.9"}, remove={"fe1"})
    assert read_block(hosts.read_text()) == {"web1": "10.213.0.9"}
    update_hosts_file(hosts, remove={"web1"})
    assert hosts.read_text() == SYSTEM  # no empty block left behind
    assert oct(hosts.stat().st_mode & 0o777) == "0o644"


def test_hosts_block_refuses_names_and_addresses_that_are_not(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput):
        render(SYSTEM, {"evil host\n1.2.3.4 bank.example": "10.213.0.2"})
    with pytest.raises(ValueError):
        render(SYSTEM, {"web1": "10.213.0.2 other"})


async def test_host_keys_pin_and_forget(tmp_path: Path) -> None:
    access = SshAccess(tmp_path / "ssh")
    line = access.ensure_key()
    assert line.startswith("ssh-ed25519 ") and access.ensure_key() == line  # made once
    assert oct(access.key_file.stat().st_mode & 0o777) == "0o600"
    assert oct(access.ssh_dir.stat().st_mode & 0o777) == "0o700"

    key = " ".join(asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()[:2])
    other = " ".join(asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()[:2])
    await access.pin("web1", key)
    await access.pin("web1", other, port=2222)
    assert access.pinned("web1") == key and access.pinned("web1", 2222) == other
    assert access.pinned("web10") is None
    assert "[web1]:2222 " in access.known_hosts_file.read_text()
    await access.forget("web1")
    assert access.pinned("web1") is None and access.pinned("web1", 2222) == other
    assert oct(access.known_hosts_file.stat().st_mode & 0o777) == "0o600"


def test_code_hash_follows_the_source(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    (root / "roles" / "x").mkdir(parents=True)
    (root / "shared").mkdir()
    (root / "pyproject.toml").write_text("[project]\nname = 'sitecloud'\n")
    (root / "roles" / "x" / "a.py").write_text("A = 1\n")
    first = code_hash(root)
    (root / "roles" / "x" / "__pycache__").mkdir()
    (root / "roles" / "x" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\0")
    assert code_hash(root) == first  # caches do not count
    (root / "roles" / "x" / "a.py").write_text("A = 2\n")
    assert code_hash(root) != first
    shutil.rmtree(root / "roles" / "x" / "__pycache__")


def test_a_worker_added_with_a_size_runs_at_that_size(tmp_path: Path) -> None:
    (tmp_path / "cloud").mkdir()
    home = CloudHome(CloudConfig(home=tmp_path / "cloud"))
    sized = home.remote_role_config(
        "worker", "w7.example.net", Path("/srv/w"), controller_url="x", size="large"
    )
    plain = home.remote_role_config("worker", "w8.example.net", Path("/srv/w"), controller_url="x")
    assert isinstance(sized, WorkerConfig) and sized.size == "large"
    assert isinstance(plain, WorkerConfig) and plain.size == "small"
