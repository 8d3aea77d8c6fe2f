"""Files written around the page cache: every byte where it belongs, whatever the sizes."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from shared.direct import BLOCK, DirectWriter


def _written(path: Path, pieces: list[bytes]) -> DirectWriter:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        writer = DirectWriter(fd)
        for piece in pieces:
            writer.write(piece)
        writer.finish()
    finally:
        os.close(fd)
    return writer


@pytest.mark.parametrize(
    "size", [0, 1, 4095, 4096, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 4097, 5 * BLOCK + 12345]
)
def test_every_size_is_written_whole(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    # Uneven pieces, as a socket hands them over.
    pieces = [data[at : at + 262_151] for at in range(0, size, 262_151)]
    writer = _written(tmp_path / "f", pieces)
    assert (tmp_path / "f").read_bytes() == data
    assert writer.size == size
    # Under a block it is one ordinary write; past it, direct where the filesystem offers it.
    if size < BLOCK:
        assert not writer.direct


def _resident_bytes(path: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(out.stdout.strip())


def test_a_big_file_goes_around_the_page_cache_where_it_can(tmp_path: Path) -> None:
    if shutil.which("fincore") is None:
        pytest.skip("fincore (util-linux-extra) is not installed")
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        pytest.skip(f"{tmp_path}'s filesystem has no O_DIRECT")
    data = os.urandom(3 * BLOCK)
    writer = _written(tmp_path / "big", [data])
    assert writer.direct
    # Written directly, none of it is in the page cache (a buffered write leaves all of it there).
    assert _resident_bytes(tmp_path / "big") < BLOCK
    assert (tmp_path / "big").read_bytes() == data
    buffered = tmp_path / "buffered"
    buffered.write_bytes(data)
    assert _resident_bytes(buffered) >= 2 * BLOCK
    # A copy kept to be read soon is read back into the page cache behind its writes, by the disk.
    fd = os.open(tmp_path / "back", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        back = DirectWriter(fd, read_back=True)
        back.write(data)
        back.finish()
    finally:
        os.close(fd)
    assert back.direct
    deadline = time.monotonic() + 10
    while _resident_bytes(tmp_path / "back") < 2 * BLOCK and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _resident_bytes(tmp_path / "back") >= 2 * BLOCK
    # A tail that is not a whole disk block is written with O_DIRECT turned off again.
    assert _written(tmp_path / "tail", [data, b"x"]).direct is False
    assert (tmp_path / "tail").read_bytes() == data + b"x"


def test_abort_waits_for_what_was_handed_to_the_disk(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_WRONLY | os.O_CREAT, 0o600)
    writer = DirectWriter(fd)
    writer.write(os.urandom(3 * BLOCK))
    writer.abort()
    os.close(fd)  # no write is still going on against a closed descriptor
    assert os.path.getsize(tmp_path / "f") <= 3 * BLOCK
