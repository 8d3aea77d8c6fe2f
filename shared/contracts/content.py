"""What crosses between the fileserver and its clients: the worker (manifests, diffs, the change feed,
batches of blobs), the publisher (commits, uploads) and management (version lists, rollbacks, the
versions a backup pins).

Paths are checked by :data:`~shared.contracts.fields.SitePath` on the way in, so a consumer never sees
one that climbs out of a site. The two big messages, a manifest and a diff of a site of 20,000 files,
are written by :func:`encode_manifest` and :func:`encode_diff`: building a model per file on the
producer costs about ten times the plain JSON encoding of the same shape, and the fileserver checked
every path when it was written. So are a deploy's commit (:func:`encode_commit`, its paths checked by
the zip's trust boundary; the fileserver checks them again) and the answer to a batch of blobs
(:func:`encode_blob_batch`). The round-trip tests hold the encoders and the models to one shape.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from json.encoder import encode_basestring_ascii as _string
from typing import Annotated, Any, Literal, Protocol

from pydantic import ConfigDict, Field
from typing_extensions import TypedDict

from shared.contracts._base import Contract
from shared.contracts.fields import ByteCount, Sha256, SiteName, SitePath, VersionNumber
from shared.errors import InvalidInput

__all__ = [
    "BLOB_BATCH_MAX",
    "COMMIT_OPS_MAX",
    "SITE_ENTRIES_MAX",
    "BlobBatchStored",
    "BlobFetch",
    "BlobStored",
    "ChangeEvent",
    "ChangeFeedPage",
    "CommitAnswer",
    "CommitOp",
    "CommitRequest",
    "CommitSource",
    "DeployResult",
    "FileMeta",
    "FileStored",
    "Manifest",
    "PathOp",
    "PutOp",
    "RenameOp",
    "RollbackAnswer",
    "RollbackRequest",
    "SiteContentInfo",
    "SiteVersions",
    "VersionDiff",
    "VersionEntry",
    "VersionList",
    "encode_blob_batch",
    "encode_commit",
    "encode_diff",
    "encode_manifest",
    "over_quota",
    "storage_room",
]

# Blobs in one batch upload or fetch (a worker fetching a site's many small files).
BLOB_BATCH_MAX = 10_000
# Ops in one commit: a deploy of a big site is one commit.
COMMIT_OPS_MAX = 200_000
# Files and folders one site may hold, however they came (a zip deploy, a git push, FTP): each is an
# inode on every worker that serves it, and a site's own zip (at most as many members) deploys again.
SITE_ENTRIES_MAX = 100_000


class _FileFacts(Protocol):
    """What a file of a version is: the fileserver's tree entries and :class:`FileMeta` both are."""

    @property
    def sha256(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def mtime(self) -> float: ...


# --- a version's files


class FileMeta(Contract):
    """One file of a version: its blob, its size and its modification time (seconds since the epoch)."""

    sha256: Sha256
    size: ByteCount
    mtime: float = 0.0


class Manifest(Contract):
    """``GET /v1/sites/{site}/manifest[?version=N]``: every file and directory of one version."""

    site: SiteName
    version: VersionNumber
    total_bytes: ByteCount
    files: dict[SitePath, FileMeta]
    dirs: list[SitePath] = []

    def for_site(self, site: str) -> Manifest:
        """This manifest, if it is the one of ``site`` (a worker asked for that site's)."""
        if self.site != site:
            raise InvalidInput(f"manifest is for site {self.site!r}, not {site!r}")
        return self


class VersionDiff(Contract):
    """``GET /v1/sites/{site}/diff?since=N[&version=M][&limit=L]``: the paths that differ between two
    versions.

    A file maps to what it became, or None when it is gone (a gone directory too); ``dirs`` holds the
    directories that are new. ``whole`` says a deploy or rollback came in between: the site flipped
    whole, so a worker builds the version anew instead of changing its copy file by file. With
    ``limit``, a whole difference or one of more than L paths comes as ``whole`` without its paths.
    """

    site: SiteName
    since: VersionNumber
    version: VersionNumber
    total_bytes: ByteCount
    whole: bool
    files: dict[SitePath, FileMeta | None]
    dirs: dict[SitePath, bool]

    def for_site(self, site: str) -> VersionDiff:
        if self.site != site:
            raise InvalidInput(f"changes are for site {self.site!r}, not {site!r}")
        return self

    @property
    def new_dirs(self) -> list[str]:
        return [path for path, made in self.dirs.items() if made]


def _path_of(item: tuple[str, object]) -> str:
    return item[0]


def _file_json(entry: _FileFacts) -> str:
    """A file's JSON object, formatted directly: a dict per file for ``json.dumps`` cost three times more."""
    return f'{{"sha256":{_string(entry.sha256)},"size":{int(entry.size)},"mtime":{_number(entry.mtime)}}}'


def _number(value: float | None) -> str:
    """A float as ``json.dumps`` writes it."""
    if value is None:
        return "null"
    return repr(float(value)) if math.isfinite(value) else json.dumps(value)


def _files_json(files: Iterable[tuple[str, _FileFacts | None]]) -> str:
    return ",".join(
        [f"{_string(path)}:{'null' if entry is None else _file_json(entry)}" for path, entry in files]
    )


def encode_manifest(
    site: str,
    version: int,
    total_bytes: int,
    files: Iterable[tuple[str, _FileFacts]],
    dirs: Iterable[str],
) -> bytes:
    """A :class:`Manifest` as JSON, written without a model per file (see the module's docstring)."""
    head = json.dumps({"site": site, "version": version, "total_bytes": total_bytes})
    body = f'{head[:-1]},"files":{{{_files_json(sorted(files, key=_path_of))}}},"dirs":{json.dumps(sorted(dirs))}}}'
    return body.encode()


def encode_diff(
    site: str,
    *,
    since: int,
    version: int,
    total_bytes: int,
    whole: bool,
    files: Iterable[tuple[str, _FileFacts | None]],
    dirs: Iterable[str],
) -> bytes:
    """A :class:`VersionDiff` as JSON, written without a model per file."""
    head = json.dumps(
        {"site": site, "since": since, "version": version, "total_bytes": total_bytes, "whole": whole}
    )
    dirs_json = json.dumps(dict.fromkeys(dirs, True))
    return f'{head[:-1]},"files":{{{_files_json(files)}}},"dirs":{dirs_json}}}'.encode()


# --- what a site holds, and its versions


class SiteContentInfo(Contract):
    """``GET /v1/sites/{site}``: the newest version of a site, its size and its storage quota."""

    site: SiteName
    version: VersionNumber
    total_bytes: ByteCount
    quota_bytes: ByteCount


class DeployResult(Contract):
    """The publisher's answer to a zip deploy (``POST /v1/deploy/{site}`` from management, and the
    tenant's own web deploy): the version the zip became, as the whole site."""

    model_config = ConfigDict(populate_by_name=True)

    site: SiteName
    version: VersionNumber
    files: Annotated[int, Field(ge=0)]
    total_bytes: ByteCount = Field(validation_alias="bytes", serialization_alias="bytes")
    # What the deployer should know beyond the numbers (a stopped site: not built nor served yet).
    message: Annotated[str, Field(max_length=2000)] | None = None

    def to_json(self) -> dict[str, Any]:
        # Nothing to say leaves the answer as it always was.
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class VersionEntry(Contract):
    """One kept version of a site, as management lists them to its tenant."""

    version: VersionNumber
    time: float
    source: Literal["ftp", "deploy", "git", "rollback"]
    files: Annotated[int, Field(ge=0)]
    total_bytes: ByteCount


class VersionList(Contract):
    """``GET /v1/sites/{site}/versions``: the versions kept, oldest first."""

    versions: list[VersionEntry]
    # The version readers get now, so what the site's workers serve (None: nothing published yet,
    # or a fileserver older than this field).
    current: VersionNumber | None = None

    def to_json(self) -> dict[str, Any]:
        # Before the first publish the answer is as it always was.
        return self.model_dump(mode="json", exclude_none=True)


class SiteVersions(Contract):
    """``GET /v1/versions``: every site's newest version, and the change feed's seq they are as of.

    Names are plain strings here: a reader looks up only the sites it serves, and one name it would not
    accept must not make it refuse every other site's version.
    """

    seq: Annotated[int, Field(ge=0)]
    sites: dict[str, VersionNumber]


class ChangeEvent(TypedDict):
    """One new version of a site on the change feed.

    A typed dict, not a model: a worker reads pages of thousands of them, and checking them as dicts
    in pydantic's core costs about 1.5 times the old hand check where a model each costs 6 times.
    """

    seq: Annotated[int, Field(ge=1)]
    site: Annotated[str, Field(min_length=1)]
    version: VersionNumber


class ChangeFeedPage(Contract):
    """``GET /v1/changes?since=N&wait=S``: the changes after ``since``, or ``reset`` when the feed no
    longer holds them (the reader then re-reads :class:`SiteVersions`)."""

    seq: Annotated[int, Field(ge=0)]
    changes: list[ChangeEvent]
    reset: bool


# --- the storage quota (``quota_bytes``), as the fileserver and the publisher both apply it


def over_quota(quota_bytes: int, new_total: int, old_total: int) -> bool:
    """Whether a change that brings a site from ``old_total`` to ``new_total`` bytes is refused.

    A change that does not grow the site is let through even when a smaller plan left it over quota:
    a tenant can always delete their way back under it.
    """
    return new_total > quota_bytes and new_total > old_total


def storage_room(quota_bytes: int, total_bytes: int, replaced: int = 0) -> int:
    """How many bytes one file may have, once the ``replaced`` bytes of the file it overwrites are gone."""
    return max(quota_bytes - (total_bytes - replaced), 0)


# --- writes: blobs, commits, rollbacks


class BlobStored(Contract):
    """``POST /v1/sites/{site}/blobs``: the blob a body became."""

    sha256: Sha256
    size: ByteCount


class BlobBatchStored(Contract):
    """``POST /v1/sites/{site}/blob-batch``: the blobs of a batch, in the order they were sent."""

    blobs: list[BlobStored]


class BlobFetch(Contract):
    """``POST /v1/sites/{site}/blob-fetch``: the blobs a worker wants, in the order it wants them."""

    sha256: Annotated[list[Sha256], Field(max_length=BLOB_BATCH_MAX)]


class PutOp(Contract):
    """Put an uploaded blob at ``path`` (``mtime``: the file's time; the commit's time by default)."""

    op: Literal["put"] = "put"
    path: SitePath
    sha256: Sha256
    mtime: float | None = None


class PathOp(Contract):
    """Delete a file, make or remove an (empty) directory."""

    op: Literal["delete", "mkdir", "rmdir"]
    path: SitePath


class RenameOp(Contract):
    """Move a file or directory; a file may replace a file, as POSIX rename and FTP RNTO do."""

    model_config = ConfigDict(populate_by_name=True)

    op: Literal["rename"] = "rename"
    src: SitePath = Field(validation_alias="from", serialization_alias="from")
    dst: SitePath = Field(validation_alias="to", serialization_alias="to")


CommitOp = Annotated[PutOp | PathOp | RenameOp, Field(discriminator="op")]
# What made a version: an FTP upload, a zip or web deploy, a git push.
CommitSource = Literal["ftp", "deploy", "git"]


class CommitRequest(Contract):
    """``POST /v1/sites/{site}/commit``: ops applied all or nothing as one new version.

    ``replace`` starts from an empty site (a deploy); ``source`` says how the change came: FTP changes
    are file by file, a deploy flips the whole site.
    """

    ops: Annotated[list[CommitOp], Field(max_length=COMMIT_OPS_MAX)]
    replace: bool = False
    source: CommitSource = "deploy"


def encode_commit(
    puts: Iterable[tuple[str, str, float | None]],
    *,
    ops: Iterable[CommitOp] = (),
    replace: bool,
    source: CommitSource = "deploy",
) -> bytes:
    """A :class:`CommitRequest` as JSON: ``ops``, then a put per ``(path, sha256, mtime)``, written
    without a model per file."""
    # Formatted directly: no dict per file (nor the garbage collections their thousands set off).
    written = [json.dumps(op.to_json(), separators=(",", ":")) for op in ops]
    written += [
        f'{{"op":"put","path":{_string(path)},"sha256":{_string(sha)},"mtime":{_number(mtime)}}}'
        for path, sha, mtime in puts
    ]
    tail = json.dumps({"replace": replace, "source": source}, separators=(",", ":"))
    return f'{{"ops":[{",".join(written)}],{tail[1:]}'.encode()


def encode_blob_batch(blobs: Iterable[tuple[str, int]]) -> bytes:
    """A :class:`BlobBatchStored` of ``(sha256, size)`` pairs as JSON, written without a model per blob."""
    written = ",".join([f'{{"sha256":{_string(sha)},"size":{int(size)}}}' for sha, size in blobs])
    return f'{{"blobs":[{written}]}}'.encode()


class CommitAnswer(Contract):
    """The version a commit made (or the newest, when it changed nothing) and the site's size."""

    version: VersionNumber
    total_bytes: ByteCount


class FileStored(Contract):
    """``PUT /v1/sites/{site}/files/{path}[?since=N]``: a file stored and committed in one step.

    With ``since`` (the version the uploader's view of the site is at), ``changes`` holds what changed
    from it to this version when other commits came in between (at most a few hundred paths, else
    None), so a session beside others (parallel transfers) stays exact without asking.
    """

    version: VersionNumber
    total_bytes: ByteCount
    sha256: Sha256
    size: ByteCount
    changes: VersionDiff | None = None


class RollbackRequest(Contract):
    """``POST /v1/sites/{site}/rollback``: the version to bring back; the one before the newest if None."""

    version: VersionNumber | None = None
    # Only while the site's newest version is still this one (409 otherwise): a deploy undoing itself
    # never undoes what was published after it.
    if_newest: VersionNumber | None = None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


class RollbackAnswer(Contract):
    version: VersionNumber
    total_bytes: ByteCount
    rolled_back_to: VersionNumber
