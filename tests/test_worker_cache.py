"""The worker's content cache on disk, without processes: versions, changes in place, pruning."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from roles.worker._cache import ContentCache
from shared.contracts.content import FileMeta


def _blob(cache: ContentCache, data: bytes) -> FileMeta:
    sha = hashlib.sha256(data).hexdigest()
    fd, tmp = cache.new_blob_file(sha)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    cache.commit_blob(tmp, sha, 0)
    return FileMeta(sha256=sha, size=len(data), mtime=0)


def test_prune_keeps_a_version_changed_in_place(tmp_path: Path) -> None:
    # A zip deploy builds v2 while v1 waits out its grace; an FTP upload then lands in v2 in place.
    # The pruning of v1 that follows must leave the served directory alone.
    cache = ContentCache(tmp_path)
    old, new, upload = _blob(cache, b"old"), _blob(cache, b"new"), _blob(cache, b"upload")
    cache.build_version("blog", "c1", 1, {"index.html": old}, [])
    v2 = cache.build_version("blog", "c1", 2, {"index.html": new}, [])
    cache.apply_changes("blog", v2, 3, {"up.txt": upload}, [])

    cache.prune("blog", set())

    assert sorted(p.name for p in cache.site_dir("blog").glob("v*")) == ["v2"]
    served = Path(cache.site_dir("blog") / "current")
    assert (served / "index.html").read_bytes() == b"new"
    assert (served / "up.txt").read_bytes() == b"upload"
    # Only the blob no version links any more goes.
    assert cache.collect_blobs() == len(b"new") + len(b"upload")
    assert not cache.has_blob(old.sha256) and cache.has_blob(upload.sha256)


def test_missing_blobs_names_each_absent_blob_once(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path)
    have = _blob(cache, b"have")
    absent = FileMeta(sha256=hashlib.sha256(b"absent").hexdigest(), size=6, mtime=0)
    # Two paths with the same bytes, a deleted path (None), and a file already cached.
    missing = cache.missing_blobs([absent, have, None, absent])
    assert [m.sha256 for m in missing] == [absent.sha256]
    # A directory where a blob would be is not that blob.
    os.makedirs(cache.blob_path(absent.sha256))
    assert [m.sha256 for m in cache.missing_blobs([absent])] == [absent.sha256]


def test_blob_folders_are_spread_over_the_filesystem(tmp_path: Path) -> None:
    ContentCache(tmp_path)
    lsattr = shutil.which("lsattr")
    if lsattr is None:
        pytest.skip("lsattr (e2fsprogs) is not installed")
    shown = subprocess.run(
        [lsattr, "-d", str(tmp_path / "blobs")], capture_output=True, text=True, check=False
    )
    if shown.returncode != 0:
        pytest.skip(f"this filesystem keeps no ext2/3/4 inode flags: {shown.stderr.strip()}")
    flags = shown.stdout.split()[0]
    assert "T" in flags, flags
    # Made again (a restart): the call is a no-op, and the cache still works.
    again = ContentCache(tmp_path)
    assert again.missing_blobs([_blob(again, b"x")]) == []
