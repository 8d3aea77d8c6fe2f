"""Process set-up every role shares (shared/process.py)."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest


def test_a_role_takes_the_hard_open_files_limit() -> None:
    """A front end holds a descriptor per visitor: a soft limit of 1,024 would cap it at a thousand."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip(f"the hard open-files limit here ({hard}) leaves nothing to raise to")
    code = (
        "import resource\n"
        "from shared.process import _raise_open_files_limit\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, (256, {hard}))\n"
        "_raise_open_files_limit()\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(out) == hard
