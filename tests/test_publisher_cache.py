"""The publisher's copies of big files (roles/publisher/_cache.py): kept only whole and under the
sha256 given for them, least recently used out first, nothing left over from a previous start; and the
trees FTP sessions leave for the next session of their site."""

from __future__ import annotations

from pathlib import Path

from roles.publisher._cache import BlobCache
from roles.publisher._content import FileInfo, Tree, TreeShelf
from shared.contracts.content import FileMeta, Manifest, VersionDiff
from shared.logs import get_logger

SHA_A, SHA_B, SHA_C = "a" * 64, "b" * 64, "c" * 64


def _cache(directory: Path, max_bytes: int) -> BlobCache:
    return BlobCache(directory, max_bytes, get_logger("publisher", host="test"))


def _put(cache: BlobCache, sha: str, data: bytes) -> None:
    fill = cache.fill()
    assert fill is not None
    for at in range(0, len(data), 3):
        fill.write(data[at : at + 3])
    fill.keep(sha, len(data))


def _read(cache: BlobCache, sha: str, size: int) -> bytes | None:
    copy = cache.open(sha, size)
    if copy is None:
        return None
    with copy:
        return copy.read()


def test_a_whole_copy_is_kept_under_its_sha_and_read_back(tmp_path: Path) -> None:
    cache = _cache(tmp_path / "cache", 100)
    _put(cache, SHA_A, b"0123456789")
    assert _read(cache, SHA_A, 10) == b"0123456789"
    # Asked with another size (not that blob after all), or another sha: no copy.
    assert cache.open(SHA_A, 11) is None
    assert cache.open(SHA_B, 10) is None
    assert cache.total_bytes == 10 and cache.hits == 1
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [SHA_A]


def test_a_short_or_dropped_copy_is_not_kept_and_leaves_no_file(tmp_path: Path) -> None:
    cache = _cache(tmp_path / "cache", 100)
    fill = cache.fill()
    assert fill is not None
    fill.write(b"only part")
    fill.keep(SHA_A, 20)  # the blob has 20 bytes: this copy missed some
    dropped = cache.fill()
    assert dropped is not None
    dropped.write(b"cut off")
    dropped.drop()
    assert cache.open(SHA_A, 20) is None and cache.open(SHA_A, 9) is None
    assert list((tmp_path / "cache").iterdir()) == []
    assert cache.total_bytes == 0


def test_the_least_recently_used_copies_go_past_the_size(tmp_path: Path) -> None:
    cache = _cache(tmp_path / "cache", 25)
    _put(cache, SHA_A, b"a" * 10)
    _put(cache, SHA_B, b"b" * 10)
    assert _read(cache, SHA_A, 10) == b"a" * 10  # A is now the newer use
    _put(cache, SHA_C, b"c" * 10)  # 30 bytes: B goes
    assert cache.open(SHA_B, 10) is None
    assert _read(cache, SHA_A, 10) == b"a" * 10 and _read(cache, SHA_C, 10) == b"c" * 10
    assert cache.total_bytes == 20
    # A copy bigger than the whole cache is not kept, and pushes nothing out.
    _put(cache, SHA_B, b"b" * 26)
    assert cache.open(SHA_B, 26) is None and cache.total_bytes == 20
    # A copy open for a download stays readable when it is pushed out meanwhile.
    reading = cache.open(SHA_A, 10)
    assert reading is not None
    with reading:
        _put(cache, SHA_B, b"b" * 20)
        assert cache.open(SHA_A, 10) is None
        assert reading.read() == b"a" * 10
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [SHA_B]


def test_a_start_empties_the_cache_and_size_zero_keeps_nothing(tmp_path: Path) -> None:
    cache = _cache(tmp_path / "cache", 100)
    _put(cache, SHA_A, b"0123456789")
    # A copy renamed just before a crash may not be on disk whole: the next start trusts none.
    again = _cache(tmp_path / "cache", 100)
    assert again.open(SHA_A, 10) is None
    assert list((tmp_path / "cache").iterdir()) == []
    off = _cache(tmp_path / "off", 0)
    assert off.fill() is None and not (tmp_path / "off").exists()


def _tree(version: int, *names: str) -> Tree:
    return Tree(version, len(names), {n: FileInfo(1, 0.0, SHA_A) for n in names}, {""}, 0.0)


def test_the_shelf_keeps_each_sites_newest_tree_and_hands_out_copies() -> None:
    shelf = TreeShelf(max_files=3)
    assert shelf.take("s") is None
    shelf.leave("s", _tree(2, "a", "b"))
    shelf.leave("s", _tree(1, "a"))  # a session that ended later with an older tree
    got = shelf.take("s")
    assert got is not None and got.version == 2 and set(got.files) == {"a", "b"}
    got.files["c"] = FileInfo(1, 0.0, SHA_B)  # the taker's own copy
    again = shelf.take("s")
    assert again is not None and set(again.files) == {"a", "b"}
    # Past the bound (files in all sites), the least recently used site's tree goes.
    shelf.leave("t", _tree(1, "x", "y"))
    assert shelf.take("s") is None
    kept = shelf.take("t")
    assert kept is not None and set(kept.files) == {"x", "y"}


def _diff(version: int, files: dict[str, FileMeta | None], dirs: dict[str, bool]) -> VersionDiff:
    return VersionDiff(
        site="s", since=version - 1, version=version, total_bytes=0, whole=False, files=files, dirs=dirs
    )


def test_a_trees_listing_follows_the_changes_it_is_brought_up_to() -> None:
    tree = Tree.from_manifest(
        Manifest(site="s", version=1, total_bytes=1, files={"d/a": FileMeta(sha256=SHA_A, size=1)})
    )
    assert tree.children("") == ["d"] and tree.children("d") == ["a"]
    # Names only added (a mirror's MKD, another session's uploads): the listing has them at once.
    meta = FileMeta(sha256=SHA_B, size=2)
    tree.apply_changes(_diff(2, {"d/b": meta, "n/m/c": meta, "d/a": meta}, {"e": True, "n": True}))
    assert tree.children("") == ["d", "e", "n"]
    assert tree.children("d") == ["a", "b"]
    assert tree.children("n") == ["m"] and tree.children("n/m") == ["c"] and tree.children("e") == []
    assert tree.is_dir("n/m") and tree.files["d/a"].sha256 == SHA_B
    # A removal, and a file where a directory was: the listing is right too.
    tree.apply_changes(_diff(3, {"d/b": None, "e": meta}, {}))
    assert tree.children("d") == ["a"] and tree.children("") == ["d", "e", "n"]
    assert tree.is_file("e") and not tree.is_dir("e")
    tree.apply_changes(_diff(4, {"n/m/c": None, "n/m": None}, {}))  # a gone directory maps to None
    assert tree.children("n") == [] and not tree.is_dir("n/m") and tree.version == 4
