"""The worker's content cache on disk, without processes: versions, changes in place, pruning."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from roles.worker._cache import ContentCache
from roles.worker._packs import VersionFiles
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
    cache.build_version("blog", "c1", 1, {"index.html": old}, [], packed=True)
    v2 = cache.build_version("blog", "c1", 2, {"index.html": new}, [], packed=True)
    cache.apply_changes("blog", v2, 3, {"up.txt": upload}, [])

    cache.prune("blog", set())

    assert sorted(p.name for p in cache.site_dir("blog").glob("v*") if p.is_dir()) == ["v2"]
    served = Path(cache.site_dir("blog") / "current")
    assert (served / "index.html").read_bytes() == b"new"
    assert (served / "up.txt").read_bytes() == b"upload"
    # Only the blob no version links any more goes.
    assert cache.collect_blobs() == len(b"new") + len(b"upload")
    assert not cache.has_blob(old.sha256) and cache.has_blob(upload.sha256)


def test_an_app_sites_files_share_no_inode_with_another_site(tmp_path: Path) -> None:
    # An app can stat its own files: a shared inode would tell it whether another tenant holds the
    # same bytes (the link count) and since when (the mtime of the first copy).
    cache = ContentCache(tmp_path)
    big = _blob(cache, b"x" * 300_000)
    cache.build_version("victim", "c1", 1, {"export.csv": big}, [], packed=True)
    mine = FileMeta(sha256=big.sha256, size=big.size, mtime=1_700_000_000)
    v1 = cache.build_version("attacker", "c2", 1, {"guess.csv": mine}, [])
    v2 = cache.apply_changes("attacker", v1, 2, {"again.csv": mine}, [])
    for name in ("guess.csv", "again.csv"):
        st = os.stat(Path(v2.root) / name)
        assert (st.st_nlink, st.st_mtime) == (1, 1_700_000_000)
        assert (Path(v2.root) / name).read_bytes() == b"x" * 300_000
    # A site no app sees still shares the blob's bytes on disk.
    assert os.stat(cache.site_dir("victim") / "current" / "export.csv").st_nlink == 2


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


def _packed(cache: ContentCache, blobs: list[bytes]) -> list[FileMeta]:
    cache.write_pack([(hashlib.sha256(b).hexdigest(), b) for b in blobs])
    return [FileMeta(sha256=hashlib.sha256(b).hexdigest(), size=len(b), mtime=1_700_000_000) for b in blobs]


def test_packed_versions_change_in_place_rebuild_as_files_and_are_collected(tmp_path: Path) -> None:
    cache = ContentCache(tmp_path)
    home, page, gone = _packed(cache, [b"home", b"page", b"gone"])
    v1 = cache.build_version(
        "blog", "c1", 1, {"index.html": home, "a/p.html": page, "a/g.html": gone}, [], packed=True
    )
    assert v1.files.packed and sorted(p.name for p in Path(v1.root).rglob("*")) == ["a"]
    hit = v1.files.get("a/p.html")
    assert hit is not None and hit.size == 4 and hit.mtime == 1_700_000_000
    with open(hit.pack, "rb") as f:
        assert os.pread(f.fileno(), hit.size, hit.offset) == b"page"

    # File by file: the changes are listed beside the index; a folder deleted takes its files along.
    (edited,) = _packed(cache, [b"page, edited"])
    v2 = cache.apply_changes("blog", v1, 2, {"a/p.html": edited, "a": None, "new.html": home}, [])
    assert v2.root == v1.root and v1.files.get("a/p.html") == hit  # (the old view is unchanged)
    assert v2.files.get("a/g.html") is None and v2.files.get("new.html") is not None
    assert v2.files.changed == 4  # a and a/g.html gone; a/p.html and new.html new
    # A restart reads the index and its changes again.
    again = ContentCache(tmp_path).load_current("blog")
    assert again is not None and again.files.get("new.html") == v2.files.get("new.html")

    # A full build (a deploy) starts a new index; the old directory, index and changes are pruned.
    v3 = cache.build_version("blog", "c1", 3, {"index.html": edited}, [], packed=True)
    cache.prune("blog", set())
    on_disk = sorted(p.name for p in cache.site_dir("blog").iterdir() if p.name.startswith("v"))
    assert on_disk == ["v3", "v3.files"]
    assert v3.files.changed == 0 and v3.files.get("index.html") is not None

    # The same version built again with all its files (its site now runs an app): beside the one
    # served, which stays whole until ``current`` flips.
    v3_files = cache.build_version("blog", "c1", 3, {"index.html": edited}, [], packed=False)
    assert Path(v3_files.root).name.startswith("v3-") and not v3_files.files.packed
    assert (Path(v3_files.root) / "index.html").read_bytes() == b"page, edited"
    assert cache.load_current("blog") == v3_files
    cache.prune("blog", set())
    on_disk = [p.name for p in cache.site_dir("blog").iterdir() if p.name.startswith("v")]
    assert on_disk == [Path(v3_files.root).name]
    # No index names a pack now: every pack goes.
    cache.collect_blobs()
    assert not list((tmp_path / "packs").iterdir())


def test_many_changes_in_place_are_folded_into_a_new_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A site published file by file for months: each change rewrote the list of all changes since the
    # index was built. Past a bound they are folded into a new index, and the list starts again.
    monkeypatch.setattr("roles.worker._cache.FOLD_CHANGES_AT", 3)
    cache = ContentCache(tmp_path)
    home, page, one, two, three = _packed(cache, [b"home", b"page", b"one", b"two", b"three"])
    v1 = cache.build_version("blog", "c1", 1, {"index.html": home, "a/p.html": page}, [], packed=True)
    changes = Path(v1.root + ".changes")
    v2 = cache.apply_changes("blog", v1, 2, {"one.html": one, "a/p.html": None}, [])
    assert changes.exists() and v2.files.changed == 2
    # A serving process takes the index it read over to the next number, then reads the changes: the
    # fold lands in between.
    served = VersionFiles(v2.root)
    served.inherit(v2.files)
    v3 = cache.apply_changes("blog", v2, 3, {"two.html": two, "three.html": three}, [])
    assert not changes.exists() and v3.files.changed == 0
    for view in (v3.files, served, ContentCache(tmp_path).load_current("blog").files):  # type: ignore[union-attr]
        assert view.get("a/p.html") is None  # (gone in the changes, gone in the fold)
        found = {rel: view.get(rel) for rel in ("index.html", "one.html", "two.html", "three.html")}
        assert all(hit is not None for hit in found.values()), found
        three_hit = found["three.html"]
        assert three_hit is not None
        with open(three_hit.pack, "rb") as f:
            assert os.pread(f.fileno(), three_hit.size, three_hit.offset) == b"three"
    # The packs the folded index names are kept by collection.
    cache.prune("blog", set())
    cache.collect_blobs()
    assert ContentCache(tmp_path).load_current("blog").files.get("one.html") is not None  # type: ignore[union-attr]


def test_an_index_written_again_at_the_same_path_is_read_again(tmp_path: Path) -> None:
    # A serving process hands what it read of a version's index on to the version's next number when
    # only changes were made in place; a directory built again at the same path has a new index.
    cache = ContentCache(tmp_path)
    first, second = _packed(cache, [b"first", b"second!"])
    v1 = cache.build_version("x", "c1", 1, {"a.html": first}, [], packed=True)
    cache.build_version("x", "c1", 2, {"a.html": first}, [], packed=True)
    again = cache.build_version("x", "c1", 1, {"a.html": second}, [], packed=True)
    assert again.root == v1.root
    seen = VersionFiles(v1.root)
    seen.inherit(v1.files)
    hit = seen.get("a.html")
    assert hit is not None and hit.size == len(b"second!")
