"""A throwaway PostgreSQL server for tests: its own cluster in a temp dir, on a free port."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from shared.net import free_port

__all__ = ["postgres_server"]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield a ``postgresql://`` URL to a fresh database; skip when PostgreSQL is not installed."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip(
            "PostgreSQL server binaries not installed (Debian package postgresql; .ci/run installs it)"
        )
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        pytest.skip("needs runuser to run PostgreSQL as an unprivileged user")
    # Its own dir under /tmp: pytest's tmp dirs are 0700 root, which the postgres user cannot enter.
    tmp = Path(tempfile.mkdtemp(prefix="sitecloud-pg-"))
    data, sockdir = tmp / "pgdata", tmp / "pgsock"
    sockdir.mkdir()
    port = free_port()

    def as_postgres(*argv: str) -> list[str]:
        # initdb refuses to run as root; the Debian package creates the postgres user.
        return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else list(argv)

    if os.geteuid() == 0:
        shutil.chown(tmp, "postgres")
        shutil.chown(sockdir, "postgres")
    subprocess.run(
        as_postgres(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"),
        check=True,
        capture_output=True,
    )
    log = tmp / "pg.log"
    subprocess.run(
        as_postgres(
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(log),
            "-w",
            "-o",
            f"-p {port} -k {sockdir} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        ),
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            as_postgres(
                str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "sitecloud"
            ),
            check=True,
            capture_output=True,
        )
        yield f"postgresql://postgres@127.0.0.1:{port}/sitecloud"
    finally:
        subprocess.run(
            as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"),
            capture_output=True,
        )
        shutil.rmtree(tmp, ignore_errors=True)
