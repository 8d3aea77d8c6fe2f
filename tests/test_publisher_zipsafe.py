"""The web deploy zip trust boundary: roles.publisher.zipsafe, on archives built here byte by byte."""

from __future__ import annotations

import io
import stat
import struct
import warnings
import zipfile

import pytest

from roles.publisher.zipsafe import check_zip, copy_member, open_zip
from shared.errors import BadRequest, InvalidInput, QuotaExceeded, SitecloudError, TooManyEntries

MB = 1024 * 1024


def _zip(*members: tuple[str | zipfile.ZipInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on the duplicate names some tests want
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in members:
                zf.writestr(name, data)
    return buf.getvalue()


def _open(data: bytes) -> zipfile.ZipFile:
    return open_zip(io.BytesIO(data))


def _refused(data: bytes, *, max_total_bytes: int = MB) -> SitecloudError:
    with pytest.raises(SitecloudError) as caught, _open(data) as zf:
        check_zip(zf, max_total_bytes=max_total_bytes)
    return caught.value


def _rename(data: bytes, old: bytes, new: bytes) -> bytes:
    """Swap a member name for another of the same length, in the local header and the directory."""
    assert len(old) == len(new) and data.count(old) == 2
    return data.replace(old, new)


def test_a_plain_site_is_planned_file_by_file() -> None:
    data = _zip(
        ("index.html", b"<h1>hi</h1>"),
        ("css/", b""),
        ("css/site.css", b"body{}"),
        ("img/", b""),
        ("docs/api/", b""),
        ("./robots.txt", b"User-agent: *"),
    )
    with _open(data) as zf:
        plan = check_zip(zf, max_total_bytes=MB)
        assert [m.path for m in plan.files] == ["css/site.css", "index.html", "robots.txt"]
        # css is implied by its file; img and docs/api are only named by directory entries.
        assert plan.empty_dirs == ("docs/api", "img")
        assert plan.total_bytes == 11 + 6 + 13
        out = io.BytesIO()
        assert copy_member(zf, plan.files[1], out) == 11
        assert out.getvalue() == b"<h1>hi</h1>"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/etc/passwd", "absolute path"),
        ("../evil.php", "climbs out"),
        ("a/../../evil.php", "climbs out"),
        ("a/b/..", "climbs out"),
        ("a\\..\\evil.php", "backslash"),
        ("C:/evil.php", "names a drive"),
        ("c:evil.php", "names a drive"),
        ("bell\x07.txt", "control character"),
        ("new\nline.txt", "control character"),
    ],
)
def test_names_that_leave_the_site_or_could_be_read_two_ways_are_refused(name: str, message: str) -> None:
    err = _refused(_zip(("ok.txt", b"ok"), (name, b"x")))
    assert isinstance(err, InvalidInput)
    assert message in err.message


def _made_on(system: int, name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = system
    return info


def test_backslashes_of_a_zip_made_on_windows_part_folders_and_are_checked_as_such() -> None:
    # Windows PowerShell's Compress-Archive writes "css\site.css"; on Unix a backslash is a name's own.
    data = _zip((_made_on(0, "index.html"), b"<h1>hi</h1>"), (_made_on(0, "css\\site.css"), b"body{}"))
    with _open(data) as zf:
        assert [m.path for m in check_zip(zf, max_total_bytes=MB).files] == ["css/site.css", "index.html"]
    for name, message in (
        ("a\\..\\evil.php", "climbs out"),
        ("\\etc\\passwd", "absolute path"),
        ("C:\\evil.php", "names a drive"),
    ):
        err = _refused(_zip((_made_on(0, "ok.txt"), b"ok"), (_made_on(0, name), b"x")))
        assert isinstance(err, InvalidInput) and message in err.message, (name, err.message)
    err = _refused(_zip((_made_on(3, "css\\site.css"), b"body{}")))
    assert isinstance(err, InvalidInput) and "backslash" in err.message


def test_macos_finder_metadata_is_left_out() -> None:
    # What Finder's "Compress" makes of a folder: AppleDouble copies under __MACOSX/ and .DS_Store.
    data = _zip(
        ("mysite/", b""),
        ("mysite/index.html", b"<h1>hi</h1>"),
        ("mysite/.DS_Store", b"\0\0\0\1Bud1"),
        ("__MACOSX/", b""),
        ("__MACOSX/mysite/", b""),
        ("__MACOSX/mysite/._index.html", b"\0\5\26\7"),
    )
    with _open(data) as zf:
        plan = check_zip(zf, max_total_bytes=MB)
    assert [m.path for m in plan.files] == ["mysite/index.html"] and plan.empty_dirs == ()
    # Still checked as every member is.
    err = _refused(_zip(("index.html", b"x"), ("__MACOSX/../../evil.php", b"x")))
    assert isinstance(err, InvalidInput) and "climbs out" in err.message


def test_a_nul_byte_in_a_name_is_refused_not_truncated() -> None:
    # zipfile would read "evil.php\0.jpg" as "evil.php": the check sees the name as stored.
    data = _rename(_zip(("evil.phpX.jpg", b"<?php")), b"evil.phpX.jpg", b"evil.php\x00.jpg")
    err = _refused(data)
    assert isinstance(err, InvalidInput) and "control character" in err.message


def test_symlinks_and_special_files_are_refused() -> None:
    link = zipfile.ZipInfo("link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    err = _refused(_zip((link, b"/etc/passwd")))
    assert isinstance(err, InvalidInput) and "symbolic link" in err.message

    fifo = zipfile.ZipInfo("pipe")
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    assert "not a regular file" in _refused(_zip((fifo, b""))).message


def test_duplicates_are_refused_also_after_normalising() -> None:
    assert "twice" in _refused(_zip(("a.txt", b"1"), ("a.txt", b"2"))).message
    assert "twice" in _refused(_zip(("a/b.txt", b"1"), ("a//b.txt", b"2"))).message
    assert "twice" in _refused(_zip(("x/", b""), ("./x/", b""))).message
    both = _refused(_zip(("a", b"file"), ("a/b.txt", b"under a")))
    assert "both as a file and as a directory" in both.message


def test_encrypted_members_are_refused() -> None:
    # zipfile cannot write encrypted members: set the "encrypted" flag bit in both headers.
    data = bytearray(_zip(("secret.txt", b"not really encrypted")))
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.index(signature) + offset
        struct.pack_into("<H", data, at, struct.unpack_from("<H", data, at)[0] | 0x1)
    err = _refused(bytes(data))
    assert isinstance(err, InvalidInput) and "encrypted" in err.message


def test_the_declared_total_must_fit_the_quota() -> None:
    # 3 MB of zeros deflate to a few KB: the declared sizes count, not the zip's own size.
    data = _zip(("a.bin", bytes(2 * MB)), ("b.bin", bytes(MB)))
    assert len(data) < 64 * 1024
    err = _refused(data, max_total_bytes=2 * MB)
    assert isinstance(err, QuotaExceeded) and "quota" in err.message
    with _open(data) as zf:
        assert check_zip(zf, max_total_bytes=3 * MB).total_bytes == 3 * MB


def test_a_member_that_inflates_past_its_declared_size_stops_there() -> None:
    data = bytearray(_zip(("bomb.bin", bytes(MB))))
    # Make the central directory claim 100 bytes; the data still inflates to 1 MB.
    at = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, at + 24, 100)
    with _open(bytes(data)) as zf:
        plan = check_zip(zf, max_total_bytes=1000)
        assert plan.total_bytes == 100
        out = io.BytesIO()
        with pytest.raises(SitecloudError):
            copy_member(zf, plan.files[0], out)
        assert len(out.getvalue()) <= 100


def test_a_corrupt_member_is_a_bad_request() -> None:
    data = bytearray(_zip(("a.txt", b"hello world " * 100)))
    data[40:60] = bytes(20)  # inside the deflated data of the only member
    with _open(bytes(data)) as zf:
        plan = check_zip(zf, max_total_bytes=MB)
        with pytest.raises(BadRequest):
            copy_member(zf, plan.files[0], io.BytesIO())


def test_not_a_zip() -> None:
    for junk in (b"", b"hello, this is not a zip", b"PK\x03\x04" + bytes(100)):
        with pytest.raises(BadRequest) as caught:
            open_zip(io.BytesIO(junk))
        assert caught.value.message == "not a zip file"


def test_too_many_members() -> None:
    data = _zip(*((f"f{i}.txt", b"") for i in range(11)))
    with _open(data) as zf, pytest.raises(InvalidInput, match="members"):
        check_zip(zf, max_total_bytes=MB, max_members=10)


def test_the_folders_a_zips_paths_imply_count_as_the_sites_entries() -> None:
    # Six members, but eleven files and folders once unpacked: what the fileserver would refuse.
    data = _zip(*((f"d{i}/sub/f{i}.txt", b"") for i in range(5)), ("top.txt", b""))
    with _open(data) as zf:
        assert len(check_zip(zf, max_total_bytes=MB, max_members=16).files) == 6
        with pytest.raises(TooManyEntries, match="makes 16 files and folders; a site may hold at most 15"):
            check_zip(zf, max_total_bytes=MB, max_members=15)
