"""Port choice for first runs and tests (shared/net.py)."""

from __future__ import annotations

import json
import subprocess
import sys

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
