"""The FTP session's filesystem: a site's manifest on the fileserver, seen as a chroot at ``/``.

pyftpdlib hands this class "real" paths made by ``ftp2fs``; with the root at ``/`` those are the
normalised virtual paths themselves (``..`` cannot climb above ``/``), and every method turns them into a
path inside the site with :func:`shared.paths.site_relpath` before it touches anything. Nothing here
reads or writes the local disk except the spools of :mod:`roles.publisher._content`.
"""

from __future__ import annotations

import os
import posixpath
import secrets
import stat
import zlib
from collections.abc import Callable
from typing import Any

from pyftpdlib.exceptions import FilesystemError
from pyftpdlib.filesystems import AbstractedFS

from roles.publisher._content import (
    CachedDownload,
    Download,
    SiteContent,
    StreamedDownload,
    Tree,
    Upload,
)
from shared.contracts.content import PathOp, RenameOp
from shared.errors import AlreadyExists, Forbidden, InvalidInput, NotFound
from shared.paths import site_relpath

__all__ = ["SiteFilesystem"]

_FILE_MODE = stat.S_IFREG | 0o644
_DIR_MODE = stat.S_IFDIR | 0o755


class SiteFilesystem(AbstractedFS):  # type: ignore[misc]  # pyftpdlib has no type hints
    """Made by pyftpdlib at login as ``abstracted_fs(home, handler)``; the handler holds the site."""

    def __init__(self, root: str, cmd_channel: Any) -> None:
        super().__init__("/", cmd_channel)
        self.content: SiteContent = cmd_channel.site_content

    # --- paths: virtual and "real" are the same, rooted at the site

    def ftp2fs(self, ftppath: str) -> str:
        return str(self.ftpnorm(ftppath))

    def fs2ftp(self, fspath: str) -> str:
        return posixpath.normpath(fspath) if fspath.startswith("/") else "/"

    def validpath(self, path: str) -> bool:
        return path.startswith("/")

    def realpath(self, path: str) -> str:
        return path

    @staticmethod
    def _rel(path: str, *, allow_root: bool = False) -> str:
        return site_relpath(path, allow_root=allow_root)

    def _tree_says(self, check: Callable[[Tree], bool], *, refusing: bool) -> bool:
        """``check`` on the session's tree, which may be a moment stale; an answer that would refuse
        the command (``refusing``) is checked again on the tree as the fileserver has it now."""
        answer = check(self.content.tree())
        if answer == refusing:
            answer = check(self.content.current_tree())
        return answer

    def _parent_must_exist(self, rel: str, path: str) -> None:
        parent = posixpath.dirname(rel)
        if not self._tree_says(lambda tree: tree.is_dir(parent), refusing=False):
            raise NotFound(f"no directory {posixpath.dirname(path)}")

    # --- reading

    def _stat(self, path: str) -> os.stat_result:
        try:
            rel = self._rel(path, allow_root=True)
        except InvalidInput as err:
            raise FilesystemError(err.message) from None
        tree = self.content.tree()
        if rel not in tree.files and rel not in tree.dirs:
            tree = self.content.current_tree()
        ino = zlib.crc32(rel.encode())
        if rel in tree.files:
            size, mtime, _ = tree.files[rel]
            return os.stat_result((_FILE_MODE, ino, 0, 1, 0, 0, size, mtime, mtime, mtime))
        if rel in tree.dirs:
            return os.stat_result((_DIR_MODE, ino, 0, 2, 0, 0, 0, tree.mtime, tree.mtime, tree.mtime))
        # FilesystemError, not NotFound: listings skip an entry pyftpdlib cannot stat.
        raise FilesystemError(f"no such file or directory: {path}")

    def stat(self, path: str) -> os.stat_result:
        return self._stat(path)

    def lstat(self, path: str) -> os.stat_result:
        return self._stat(path)

    def isfile(self, path: str) -> bool:
        try:
            rel = self._rel(path)
        except InvalidInput:
            return False
        return self._tree_says(lambda tree: tree.is_file(rel), refusing=False)

    def isdir(self, path: str) -> bool:
        try:
            rel = self._rel(path, allow_root=True)
        except InvalidInput:
            return False
        return self._tree_says(lambda tree: tree.is_dir(rel), refusing=False)

    def islink(self, path: str) -> bool:
        return False

    def lexists(self, path: str) -> bool:
        return self.isfile(path) or self.isdir(path)

    def getsize(self, path: str) -> int:
        """A file's size as the fileserver has it now (SIZE, and the offset check of a resumed
        transfer): a client resumes from it, and another session may have just replaced the file."""
        try:
            rel = self._rel(path)
        except InvalidInput as err:
            raise FilesystemError(err.message) from None
        info = self.content.current_tree().files.get(rel)
        if info is None:
            raise FilesystemError(f"no such file: {path}")
        return info.size

    def getmtime(self, path: str) -> float:
        return self._stat(path).st_mtime

    def listdir(self, path: str) -> list[str]:
        rel = self._rel(path, allow_root=True)
        if not self._tree_says(lambda tree: tree.is_dir(rel), refusing=False):
            raise NotFound(f"no directory {path}")
        return self.content.tree().children(rel)

    def listdirinfo(self, path: str) -> list[str]:
        return self.listdir(path)

    def chdir(self, path: str) -> None:
        if not self.isdir(path):
            raise NotFound(f"no directory {path}")
        self.cwd = self.fs2ftp(path)

    def readlink(self, path: str) -> str:
        raise InvalidInput(f"{path} is not a symbolic link")

    def get_user_by_uid(self, uid: int) -> str:
        return self.content.site.name

    def get_group_by_gid(self, gid: int) -> str:
        return self.content.site.name

    # --- files

    def open(self, filename: str, mode: str) -> Download | StreamedDownload | CachedDownload | Upload:
        rel = self._rel(filename)
        if mode in ("r", "rb"):
            # The fileserver says if there is no such file, or it is a directory (550 either way).
            try:
                return self.content.download(rel, filename)
            except InvalidInput:
                raise NotFound(f"no file {filename}") from None
        if self._tree_says(lambda tree: tree.is_dir(rel), refusing=True):
            raise InvalidInput(f"{filename} is a directory")
        self._parent_must_exist(rel, filename)
        # "ab" (APPE) and "r+b" (STOR after REST) continue the file that is there.
        keep = "a" in mode or "+" in mode
        return self.content.start_upload(rel, filename, keep_existing=keep, append="a" in mode)

    def mkstemp(self, suffix: str = "", prefix: str = "", dir: str | None = None, mode: str = "wb") -> Upload:
        """STOU: an upload under a new name in ``dir`` (pyftpdlib would make a local temp file)."""
        base = dir if dir is not None else self.cwd
        for _ in range(20):
            path = posixpath.join(base, f"{prefix}{secrets.token_hex(4)}{suffix}")
            if not self.lexists(path):
                upload = self.open(path, "wb")
                assert isinstance(upload, Upload)
                return upload
        raise AlreadyExists("no unused file name found")

    # --- changes: each is one commit on the fileserver

    def mkdir(self, path: str) -> None:
        self.content.commit([PathOp(op="mkdir", path=self._rel(path))])
        self.content.log.info("created directory %s", path)

    def rmdir(self, path: str) -> None:
        self.content.commit([PathOp(op="rmdir", path=self._rel(path))])
        self.content.log.info("removed directory %s", path)

    def remove(self, path: str) -> None:
        self.content.commit([PathOp(op="delete", path=self._rel(path))])
        self.content.log.info("deleted %s", path)

    def rename(self, src: str, dst: str) -> None:
        self.content.commit([RenameOp(src=self._rel(src), dst=self._rel(dst))])
        self.content.log.info("renamed %s to %s", src, dst)

    def chmod(self, path: str, mode: int) -> None:
        # A site's files have no modes; clients that copy modes after each upload (lftp mirror,
        # FileZilla's "preserve permissions") must not fail for it.
        if not self.lexists(path):
            raise NotFound(f"no such file or directory: {path}")

    def utime(self, path: str, timeval: float) -> None:
        raise Forbidden("modification times are set by the server")
