"""Port choice for first runs and tests, and what per-client limits count by (shared/net.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from shared.net import client_key

CHOOSE = "import json; from shared.net import free_port; print(json.dumps([free_port() for _ in range(300)]))"


def test_two_processes_never_choose_the_same_port() -> None:
    # A test picks a cloud's public ports and `sitecloud up` then picks its roles' control ports, each
    # before anything is bound: the claims on disk keep the two apart.
    procs = [
        subprocess.Popen([sys.executable, "-c", CHOOSE], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    chosen = [set(json.loads(p.communicate(timeout=60)[0])) for p in procs]
    assert all(len(c) == 300 for c in chosen)
    assert not chosen[0] & chosen[1]


def test_clients_are_counted_per_ipv4_address_and_per_ipv6_64() -> None:
    assert client_key("192.0.2.1") == "192.0.2.1"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") == "2001:db8:1:3::/64"
    assert client_key("::ffff:192.0.2.1") == "192.0.2.1"
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key("unknown") == "unknown"
