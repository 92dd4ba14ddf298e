"""A contributor's tree described for an assembled object (spec §9): walked, stat'ed, checked
and hashed once, as a picklable manifest that the union is planned from (CF-ASM-07) and the
contributor's segment is written from (CF-ASM-08).

The checks are the writer's (CF-WRITE-02, -05), on the same walk (``_writer._walk``), so a
tree that scans is a tree :func:`~checkpoint_format.write_tarball` would write. The digests
are those of CF-MARK-04, computed on a thread pool: small files one per task, large files one
4 MiB piece per task, so that one big file keeps every core busy too.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import os
import stat
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from ._errors import LimitExceededError, WriteRefusedError
from ._limits import Limits
from ._links import NameTree
from ._spec import PIECE, PLAIN_KEY, TREE_KEY
from ._width import compress_width
from ._writer import (
    _changed,
    _check_link,
    _check_unchanged,
    _hash_piece,
    _kind,
    _refuse_link,
    _walk,
)

__all__ = [
    "DIR",
    "FILE",
    "HARDLINK",
    "SYMLINK",
    "Fingerprint",
    "ManifestEntry",
    "TreeManifest",
    "scan_tree",
]

FILE, DIR, SYMLINK, HARDLINK = "file", "dir", "symlink", "hardlink"
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)


class Fingerprint(NamedTuple):
    """What CF-WRITE-07 compares of a file: the ``os.stat_result`` fields it needs, under the
    same names, so that :func:`~checkpoint_format.changed_in_place` takes it as ``before``."""

    st_dev: int
    st_ino: int
    st_size: int
    st_mtime_ns: int
    st_ctime_ns: int
    st_nlink: int

    @classmethod
    def of(cls, st: os.stat_result) -> Fingerprint:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_nlink)


@dataclasses.dataclass(frozen=True)
class ManifestEntry:
    """One member of a scanned tree.

    ``kind`` is ``"file"``, ``"dir"``, ``"symlink"`` or ``"hardlink"``; ``size`` the file's
    size (for a hard link, the size of the file it links to; 0 otherwise); ``mode`` the
    permission bits written (``mode & 0o777``); ``link`` the target of a symbolic link or the
    earlier member a hard link names; ``digest_key``/``digest`` the CF-MARK-04 record of a
    file (a hard link carries its target's, which is what the union compares); ``fingerprint``
    the stat the segment is checked against (CF-ASM-08).
    """

    name: str
    kind: str
    size: int
    mode: int
    mtime_ns: int
    link: str | None = None
    digest_key: str | None = None
    digest: str | None = None
    fingerprint: Fingerprint | None = None


@dataclasses.dataclass(frozen=True)
class TreeManifest:
    """A scanned tree: ``root`` (the directory scanned) and its ``entries`` in depth-first
    pre-order (CF-WRITE-04). Picklable, to be gathered from every contributor."""

    root: str
    entries: tuple[ManifestEntry, ...]

    @property
    def files(self) -> int:
        return sum(1 for entry in self.entries if entry.kind == FILE)

    @property
    def file_bytes(self) -> int:
        return sum(entry.size for entry in self.entries if entry.kind == FILE)

    def entry(self, name: str) -> ManifestEntry:
        """The entry called ``name``; KeyError if the tree holds none."""
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(name)


def scan_tree(
    directory: str | os.PathLike[str],
    *,
    workers: int | None = None,
    limits: Limits | None = None,
) -> TreeManifest:
    """Walk, check and hash the tree under ``directory`` (its top-level entries and their
    subtrees, CF-WRITE-03), for one contributor of an assembled object.

    Refuses, with :class:`WriteRefusedError`, what :func:`~checkpoint_format.write_tarball`
    refuses: special files, names that are not UTF-8, symbolic links that leave the tree or
    loop (CF-WRITE-05), a file that changes while it is hashed (CF-WRITE-07). ``workers``
    hashing threads run at once (default: every core). With ``limits``, a tree that a reader
    under them would refuse (more members, a larger total size, a longer name or link target)
    is refused here with :class:`LimitExceededError` (CF-LIMIT-01), before anything is
    uploaded; without, no limit is applied, as for ``write_tarball``.
    """
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"checkpoint source {root} is not a directory")
    rows: list[ManifestEntry] = []
    inodes: dict[tuple[int, int], int] = {}  # (dev, ino) -> index of the first name
    links = NameTree()
    total = 0
    with ThreadPoolExecutor(compress_width(workers), "checkpoint-scan") as pool:
        hashing = _Hashing(pool, window=4 * compress_width(workers) + 16)
        try:
            for name, path, st in _walk(root):
                mode = stat.S_IMODE(st.st_mode) & 0o777  # CF-WRITE-06
                fingerprint = Fingerprint.of(st)
                if stat.S_ISDIR(st.st_mode):
                    rows.append(ManifestEntry(name, DIR, 0, mode, st.st_mtime_ns))
                elif stat.S_ISLNK(st.st_mode):
                    target = os.readlink(path)
                    _check_link(name, target, links)
                    rows.append(ManifestEntry(
                        name, SYMLINK, 0, mode, st.st_mtime_ns, link=target,
                        fingerprint=fingerprint,
                    ))
                elif stat.S_ISREG(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    if st.st_nlink > 1 and key in inodes:
                        rows.append(ManifestEntry(
                            name, HARDLINK, st.st_size, mode, st.st_mtime_ns,
                            link=rows[inodes[key]].name, fingerprint=fingerprint,
                        ))
                    else:
                        if st.st_nlink > 1:
                            inodes[key] = len(rows)
                        rows.append(ManifestEntry(
                            name, FILE, st.st_size, mode, st.st_mtime_ns, fingerprint=fingerprint
                        ))
                        total += st.st_size
                        hashing.add(len(rows) - 1, name, path, st)
                else:
                    raise WriteRefusedError(
                        "CF-WRITE-05",
                        f"{_kind(st.st_mode)} cannot be saved in a checkpoint (only files,"
                        " directories and links)",
                        name,
                    )
                if limits is not None:
                    _check_limits(limits, rows[-1], len(rows), total)
            for name, problem in links.problems():
                _refuse_link(name, problem)
            digests = hashing.finish()
        finally:
            hashing.abort()
    for index, (key, digest) in digests.items():
        rows[index] = dataclasses.replace(rows[index], digest_key=key, digest=digest)
    by_name = {row.name: row for row in rows if row.kind == FILE}
    for index, row in enumerate(rows):
        if row.kind == HARDLINK:
            target = by_name[row.link]  # type: ignore[index]  # the first name of the inode
            rows[index] = dataclasses.replace(
                row, digest_key=target.digest_key, digest=target.digest
            )
    return TreeManifest(str(root), tuple(rows))


def _check_limits(limits: Limits, entry: ManifestEntry, members: int, total: int) -> None:
    def refuse(field: str, what: str) -> None:
        raise LimitExceededError(
            "CF-LIMIT-01",
            f"{what} exceeds {field}={getattr(limits, field)}: a reader under these limits"
            " would refuse the checkpoint",
            entry.name,
        )

    if members > limits.max_members:
        refuse("max_members", f"the tree's {members} members")
    if total > limits.max_total_size:
        refuse("max_total_size", f"the tree's {total} bytes of files")
    longest = max(len(entry.name.encode()), len((entry.link or "").encode()))
    if longest > limits.max_name_length:
        refuse("max_name_length", f"a name or link target of {longest} bytes")


class _LargeFile:
    """A file hashed piece by piece on the pool: its descriptor stays open until the last
    piece is hashed, when the file is checked unchanged (CF-WRITE-07)."""

    def __init__(self, index: int, name: str, fd: int, st: os.stat_result) -> None:
        self.index = index
        self.name = name
        self.fd = fd
        self.st = st
        self.outer = hashlib.sha256()


class _Hashing:
    """Digests of the scanned files, at most ``window`` tasks queued at once (each task reads
    its own bytes when it runs, so memory is bounded by the pool's width, not the tree)."""

    def __init__(self, pool: ThreadPoolExecutor, window: int) -> None:
        self._pool = pool
        self._window = window
        self._pending: collections.deque[tuple[object, Future | None]] = collections.deque()
        self._open: list[_LargeFile] = []
        self.digests: dict[int, tuple[str, str]] = {}

    def add(self, index: int, name: str, path: str, st: os.stat_result) -> None:
        if st.st_size <= PIECE:
            self._queue((index, name), self._pool.submit(_hash_small, name, path, st))
            return
        fd = os.open(path, _OPEN_FLAGS)
        large = _LargeFile(index, name, fd, st)
        self._open.append(large)
        _check_unchanged(name, st, os.fstat(fd))
        for offset in range(0, st.st_size, PIECE):
            length = min(PIECE, st.st_size - offset)
            self._queue(large, self._pool.submit(_hash_piece, fd, offset, length, name))
        self._queue(large, None)  # the end of the file: checked once its pieces are in

    def _queue(self, owner: object, future: Future | None) -> None:
        self._pending.append((owner, future))
        while len(self._pending) > self._window:
            self._settle()

    def _settle(self) -> None:
        owner, future = self._pending.popleft()
        if isinstance(owner, tuple):
            assert future is not None
            self.digests[owner[0]] = (PLAIN_KEY, future.result())
        elif future is not None:
            owner.outer.update(future.result())  # type: ignore[attr-defined]
        else:
            large: _LargeFile = owner  # type: ignore[assignment]
            if os.pread(large.fd, 1, large.st.st_size):
                raise _changed(large.name, "it grew while being saved")
            _check_unchanged(large.name, large.st, os.fstat(large.fd))
            self.digests[large.index] = (TREE_KEY, large.outer.hexdigest())
            self._open.remove(large)
            os.close(large.fd)

    def finish(self) -> dict[int, tuple[str, str]]:
        while self._pending:
            self._settle()
        return self.digests

    def abort(self) -> None:
        """Drop what is queued and close every descriptor still open (after an error)."""
        for _owner, future in self._pending:
            if future is not None:
                future.cancel()
        for _owner, future in self._pending:
            if future is not None and not future.cancelled():
                with contextlib.suppress(BaseException):  # the first error is already raised
                    future.result()
        self._pending.clear()
        for large in self._open:
            os.close(large.fd)
        self._open.clear()


def _hash_small(name: str, path: str, st: os.stat_result) -> str:
    fd = os.open(path, _OPEN_FLAGS)
    with open(fd, "rb", buffering=0) as handle:
        _check_unchanged(name, st, os.fstat(fd))
        data = handle.read(st.st_size + 1)
        while len(data) <= st.st_size:
            more = handle.read(st.st_size + 1 - len(data))
            if not more:
                break
            data += more
        if len(data) != st.st_size:
            raise _changed(name, "it grew while being saved" if len(data) > st.st_size
                           else "it shrank while being saved")
        digest = hashlib.sha256(data).hexdigest()
        _check_unchanged(name, st, os.fstat(fd))
    return digest

