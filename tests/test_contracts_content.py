"""The fileserver's messages as types, without processes: what producers write parses back the same,
bad messages are refused naming each bad field, and fields a newer role adds are ignored."""

from __future__ import annotations

import json
from typing import Any

import pytest

from roles.fileserver._manifest import FileEntry, Tree
from shared.contracts import Contract
from shared.contracts.answers import parse_answer
from shared.contracts.content import (
    BLOB_BATCH_MAX,
    BlobBatchStored,
    BlobFetch,
    ChangeFeedPage,
    CommitAnswer,
    CommitRequest,
    DeployResult,
    FileMeta,
    Manifest,
    PathOp,
    PutOp,
    RenameOp,
    RollbackRequest,
    SiteContentInfo,
    SiteVersions,
    VersionDiff,
    VersionList,
    encode_blob_batch,
    encode_commit,
    encode_diff,
    encode_manifest,
    over_quota,
    storage_room,
)
from shared.errors import InvalidInput, Unavailable

SHA_A, SHA_B = "a" * 64, "b" * 64


def _refusal(kind: type[Any], data: object) -> str:
    with pytest.raises(InvalidInput) as caught:
        kind.parse(data)
    return caught.value.message


def test_a_manifest_the_fileserver_writes_parses_back_to_the_same_files() -> None:
    tree = Tree()
    tree.put("index.html", FileEntry(SHA_A, 10, 1700000000.5))
    tree.put("img/logo.png", FileEntry(SHA_B, 2048, 1700000001.0))
    tree.mkdir("empty")
    raw = tree.manifest("blog", 3)

    manifest = Manifest.parse_json(raw).for_site("blog")
    assert manifest.version == 3 and manifest.total_bytes == 2058
    assert manifest.files == {
        "img/logo.png": FileMeta(sha256=SHA_B, size=2048, mtime=1700000001.0),
        "index.html": FileMeta(sha256=SHA_A, size=10, mtime=1700000000.5),
    }
    assert manifest.dirs == ["empty", "img"]
    # The encoder and the model describe one shape: the model writes what the encoder wrote.
    assert manifest.to_json() == json.loads(raw)
    empty = Manifest.parse_json(encode_manifest("shop", 0, 0, [], []))
    assert empty.to_json() == {"site": "shop", "version": 0, "total_bytes": 0, "files": {}, "dirs": []}


def test_a_diff_round_trips_with_gone_files_and_new_directories() -> None:
    raw = encode_diff(
        "blog",
        since=2,
        version=4,
        total_bytes=10,
        whole=False,
        files=[("old.html", None), ("new.html", FileMeta(sha256=SHA_A, size=10, mtime=5.0))],
        dirs=["assets"],
    )
    diff = VersionDiff.parse_json(raw).for_site("blog")
    assert diff.files == {"old.html": None, "new.html": FileMeta(sha256=SHA_A, size=10, mtime=5.0)}
    assert diff.new_dirs == ["assets"] and not diff.whole
    assert diff.to_json() == json.loads(raw)


def test_the_encoders_write_any_name_and_time_as_json_would() -> None:
    odd = [
        ('say "hi"/caf\u00e9 \u2603.html', FileMeta(sha256=SHA_A, size=3, mtime=0.1 + 0.2)),
        ("plain.html", FileMeta(sha256=SHA_B, size=0, mtime=1e-7)),
        ("big.bin", FileMeta(sha256=SHA_B, size=2**40, mtime=-1.5)),
    ]
    raw = encode_manifest("blog", 1, 3, odd, ["e \u00e9"])
    files = {path: {"sha256": e.sha256, "size": e.size, "mtime": e.mtime} for path, e in odd}
    assert json.loads(raw) == {
        "site": "blog",
        "version": 1,
        "total_bytes": 3,
        "files": files,
        "dirs": ["e \u00e9"],
    }
    assert Manifest.parse_json(raw).files == dict(odd)
    gone = [*odd, ("old.html", None)]
    diff = encode_diff("blog", since=1, version=2, total_bytes=3, whole=False, files=gone, dirs=["e"])
    assert json.loads(diff)["files"] == {**files, "old.html": None}
    assert VersionDiff.parse_json(diff).files == dict(gone)


def test_a_deploy_commit_and_a_batch_answer_round_trip() -> None:
    raw = encode_commit(
        [("index.html", SHA_A, 1700000000.5), ("img/logo.png", SHA_B, None)],
        ops=[PathOp(op="mkdir", path="empty")],
        replace=True,
    )
    commit = CommitRequest.parse_json(raw)
    assert commit.ops == [
        PathOp(op="mkdir", path="empty"),
        PutOp(path="index.html", sha256=SHA_A, mtime=1700000000.5),
        PutOp(path="img/logo.png", sha256=SHA_B),
    ]
    assert commit.replace and commit.source == "deploy"
    assert commit.to_json() == json.loads(raw)
    # What the encoder writes is still checked where it arrives.
    assert "climbs out of the site root" in _refusal(
        CommitRequest, json.loads(encode_commit([("../x", SHA_A, None)], replace=True))
    )
    assert json.loads(encode_commit([], replace=False, source="ftp")) == {
        "ops": [],
        "replace": False,
        "source": "ftp",
    }
    assert json.loads(encode_blob_batch([])) == {"blobs": []}
    batch = BlobBatchStored.parse_json(encode_blob_batch([(SHA_A, 1), (SHA_B, 2)]))
    assert [(b.sha256, b.size) for b in batch.blobs] == [(SHA_A, 1), (SHA_B, 2)]


def test_manifest_paths_are_checked_by_the_one_path_boundary() -> None:
    good = {"sha256": SHA_A, "size": 1, "mtime": 1.0}
    base: dict[str, Any] = {"site": "blog", "version": 1, "total_bytes": 1}
    message = _refusal(Manifest, {**base, "files": {"../etc/passwd": good}})
    assert "files.../etc/passwd" in message and "climbs out of the site root" in message
    # Normalised like every path a user gives: leading slashes and "." go.
    assert list(Manifest.parse({**base, "files": {"/a/./b.html": good}}).files) == ["a/b.html"]
    assert "a path inside the site is required" in _refusal(Manifest, {**base, "files": {"/": good}})
    assert "dirs.0" in _refusal(Manifest, {**base, "files": {}, "dirs": ["a\x00b"]})


def test_each_bad_field_is_named() -> None:
    message = _refusal(
        Manifest,
        {
            "site": "Not A Site",
            "version": -1,
            "total_bytes": "big",
            "files": {"a.html": {"sha256": "xyz", "size": -5}},
        },
    )
    for where in ("site:", "version:", "total_bytes:", "files.a.html.sha256:", "files.a.html.size:"):
        assert where in message, message
    assert message.startswith("Manifest: ")
    with pytest.raises(InvalidInput, match="manifest is for site 'shop', not 'blog'"):
        Manifest.parse({"site": "shop", "version": 0, "total_bytes": 0, "files": {}}).for_site("blog")


def test_unknown_fields_are_ignored_for_rolling_upgrades() -> None:
    data = {
        "site": "blog",
        "version": 1,
        "total_bytes": 1,
        "files": {"a": {"sha256": SHA_A, "size": 1, "mtime": 2, "mode": 420}},
        "signed_by": "a newer fileserver",
    }
    manifest = Manifest.parse(data)
    assert manifest.files["a"] == FileMeta(sha256=SHA_A, size=1, mtime=2.0)
    assert "signed_by" not in manifest.to_json()
    # A file's time may be missing (0: unknown); JSON integers are numbers too.
    assert FileMeta.parse({"sha256": SHA_A, "size": 1}).mtime == 0.0


def test_commit_ops_round_trip_with_the_wire_names() -> None:
    wire = {
        "ops": [
            {"op": "put", "path": "a.html", "sha256": SHA_A, "mtime": 5.0},
            {"op": "put", "path": "b.html", "sha256": SHA_B, "mtime": None},
            {"op": "mkdir", "path": "d"},
            {"op": "delete", "path": "old.html"},
            {"op": "rmdir", "path": "gone"},
            {"op": "rename", "from": "x.html", "to": "y/x.html"},
        ],
        "replace": True,
        "source": "ftp",
    }
    request = CommitRequest.parse(wire)
    assert request.ops[-1] == RenameOp(src="x.html", dst="y/x.html")
    assert request.to_json() == wire
    built = CommitRequest(
        ops=[PutOp(path="a.html", sha256=SHA_A, mtime=5.0), PathOp(op="mkdir", path="d")]
    ).to_json()
    assert built == {
        "ops": [
            {"op": "put", "path": "a.html", "sha256": SHA_A, "mtime": 5.0},
            {"op": "mkdir", "path": "d"},
        ],
        "replace": False,
        "source": "deploy",
    }


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"ops": [{"op": "chmod", "path": "x"}]}, "ops.0: Input tag 'chmod'"),
        ({"ops": [{"op": "put", "path": "x"}]}, "ops.0.put.sha256: Field required"),
        ({"ops": [{"op": "rename", "from": "a"}]}, "ops.0.rename.to: Field required"),
        ({"ops": [{"op": "delete", "path": "../x"}]}, "climbs out of the site root"),
        ({"ops": "all"}, "ops: Input should be a valid list"),
        ({"ops": [], "replace": "yes"}, "replace: Input should be a valid boolean"),
        ({"ops": [], "source": "svn"}, "source: Input should be 'ftp', 'deploy' or 'git'"),
        ([], "Input should be a valid dictionary"),
    ],
)
def test_bad_commits_are_refused_with_what_is_wrong(body: object, expected: str) -> None:
    assert expected in _refusal(CommitRequest, body)


def test_small_answers_round_trip() -> None:
    cases: list[tuple[type[Contract], dict[str, Any]]] = [
        (CommitAnswer, {"version": 3, "total_bytes": 30}),
        (SiteContentInfo, {"site": "blog", "version": 3, "total_bytes": 30, "quota_bytes": 1024}),
        (BlobBatchStored, {"blobs": [{"sha256": SHA_A, "size": 1}, {"sha256": SHA_B, "size": 2}]}),
        (SiteVersions, {"seq": 9, "sites": {"blog": 3, "shop": 0}}),
        (ChangeFeedPage, {"seq": 9, "changes": [{"seq": 9, "site": "blog", "version": 3}], "reset": False}),
        (
            VersionList,
            {"versions": [{"version": 1, "time": 5.5, "source": "ftp", "files": 2, "total_bytes": 30}]},
        ),
        (
            VersionList,
            {
                "versions": [{"version": 1, "time": 5.5, "source": "ftp", "files": 2, "total_bytes": 30}],
                "current": 1,
            },
        ),
        (RollbackRequest, {"version": 2}),
        (RollbackRequest, {"version": 2, "if_newest": 3}),
    ]
    for kind, wire in cases:
        assert kind.parse(wire).to_json() == wire, kind
    assert RollbackRequest.parse({}).version is None
    assert "version: Input should be a valid integer" in _refusal(RollbackRequest, {"version": True})


def test_one_site_name_a_reader_would_refuse_does_not_refuse_the_whole_feed() -> None:
    page = ChangeFeedPage.parse(
        {"seq": 2, "reset": False, "changes": [{"seq": 1, "site": "Odd_Name", "version": 1}]}
    )
    assert page.changes[0]["site"] == "Odd_Name"
    assert "changes.0.version" in _refusal(
        ChangeFeedPage, {"seq": 2, "reset": False, "changes": [{"seq": 1, "site": "a", "version": -1}]}
    )


def test_a_blob_fetch_is_bounded() -> None:
    assert BlobFetch.parse({"sha256": [SHA_A]}).sha256 == [SHA_A]
    assert "at most 10000 items" in _refusal(BlobFetch, {"sha256": [SHA_A] * (BLOB_BATCH_MAX + 1)})
    assert "sha256.0: String should match pattern" in _refusal(BlobFetch, {"sha256": ["ABC"]})


def test_an_answer_that_does_not_parse_is_the_peer_s_fault() -> None:
    with pytest.raises(Unavailable) as caught:
        parse_answer(CommitAnswer, {"version": "three"}, peer="the fileserver")
    assert caught.value.message.startswith("the fileserver gave an unexpected answer: CommitAnswer: ")
    assert parse_answer(CommitAnswer, {"version": 3, "total_bytes": 0}, peer="x").version == 3


def test_the_storage_quota_rule_both_writers_apply() -> None:
    assert not over_quota(100, 100, 40)
    assert over_quota(100, 101, 40)
    # Over quota after a move to a smaller plan: shrinking is let through, growing is not.
    assert not over_quota(100, 150, 200) and over_quota(100, 201, 200)
    assert storage_room(100, 60) == 40
    assert storage_room(100, 60, replaced=30) == 70
    assert storage_room(100, 150) == 0


def test_a_deploy_answer_round_trips_with_its_wire_names() -> None:
    wire = {"site": "blog", "version": 4, "files": 12, "bytes": 3400}
    answer = DeployResult.parse(wire)
    assert (answer.site, answer.version, answer.files, answer.total_bytes) == ("blog", 4, 12, 3400)
    assert answer.to_json() == wire
    # As the publisher builds it.
    built = DeployResult(site="blog", version=4, files=12, total_bytes=3400)
    assert built.to_json() == wire and DeployResult.parse(json.loads(json.dumps(built.to_json()))) == built


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ({"site": "blog", "files": 1, "bytes": 1}, "version: Field required"),
        ({"site": "blog", "version": 1, "files": -1, "bytes": 1}, "files: Input should be greater than"),
        ({"site": "blog", "version": 1, "files": 1, "bytes": "1"}, "bytes: Input should be a valid integer"),
        ({"site": "../etc", "version": 1, "files": 1, "bytes": 1}, "site: "),
    ],
)
def test_a_bad_deploy_answer_is_refused(wire: dict[str, Any], expected: str) -> None:
    assert expected in _refusal(DeployResult, wire)
    # Read by management, it is the publisher's fault, not the deployer's.
    with pytest.raises(Unavailable, match="the publisher gave an unexpected answer: DeployResult: "):
        parse_answer(DeployResult, wire, peer="the publisher")
