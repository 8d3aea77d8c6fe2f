"""A role's output file stays within its bound while the role keeps writing to it (copytruncate)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from shared.logfile import keep_bounded


def test_a_log_past_its_bound_moves_to_dot_1_and_the_writer_goes_on_at_its_new_start(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    # A role as its supervisor starts it: stdout on the file, opened for appending, held for its life.
    with log.open("ab") as out:
        writer = subprocess.Popen(
            [
                sys.executable,
                "-u",
                "-c",
                "import sys\nfor line in sys.stdin: print(line.strip(), flush=True)",
            ],
            stdin=subprocess.PIPE,
            stdout=out,
            text=True,
        )
    assert writer.stdin is not None
    try:
        for n in range(200):
            writer.stdin.write(f"line {n:04d} {'x' * 90}\n")
        writer.stdin.flush()
        _settle(log, 200)
        assert not keep_bounded(log, max_bytes=1 << 20)  # under its bound: left alone
        assert keep_bounded(log, max_bytes=10_000)
        older = (tmp_path / "worker.log.1").read_text().splitlines()
        assert len(older) == 200 and older[0].startswith("line 0000") and log.stat().st_size == 0
        writer.stdin.write("after the cut\n")
        writer.stdin.flush()
        _settle(log, 1)
        # Written at the file's new end (O_APPEND): no hole of the old size before it.
        assert log.read_bytes() == b"after the cut\n"
    finally:
        writer.stdin.close()
        writer.wait(timeout=10)


def _settle(log: Path, lines: int) -> None:
    for _ in range(200):
        if log.read_bytes().count(b"\n") >= lines:
            return
        time.sleep(0.01)
    raise AssertionError(f"{log} did not get {lines} lines")
