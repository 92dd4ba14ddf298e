"""Restore an object into a directory: staged, verified, then published whole (spec §5, §7)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from ._detect import Detection, read_pieces_of, sniff
from ._limits import Limits
from ._reader import Member, TarReader
from ._width import decode_width

__all__ = ["PAYLOAD_NAME", "RestoreResult", "remove_tree", "restore"]

#: CF-RAW-01: where a raw payload lands inside the target.
PAYLOAD_NAME = "payload"

_COPY_CHUNK = 4 << 20
#: Files at least this large are written by the writer pool, in pieces of at most
#: ``_WRITE_PIECE`` at their offsets; smaller ones in the reading thread (a hop costs more).
_PARALLEL_WRITE_MIN = 4 << 20
_WRITE_PIECE = 4 << 20
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    """What :func:`restore` found and wrote.

    ``path`` is the target directory for a tarball, ``target / "payload"`` for a raw payload,
    and ``None`` when there was no checkpoint (an empty object).
    """

    detection: Detection
    path: Path | None
    members: int
    bytes: int
    seconds: float
    format_version: str | None = None

    @property
    def kind(self) -> str:
        return self.detection.kind


def restore(
    source: BinaryIO,
    target: str | os.PathLike[str],
    *,
    limits: Limits | None = None,
    decode_threads: int | None = None,
) -> RestoreResult:
    """Classify ``source`` and restore it into ``target``, all or nothing.

    ``target`` must be absent or an empty directory. A tarball is extracted under it, a raw
    payload is written to ``target / "payload"``. Everything is first written to a staging
    directory beside ``target`` and renamed into place only once the whole stream has been
    read and verified; on any error the staging directory is removed and ``target`` is left
    as it was (CF-EXTRACT-11). Rule violations raise :class:`CheckpointFormatError`
    subclasses; I/O errors of ``source`` propagate unchanged.

    ``limits`` raise or lower the reader caps (default ``Limits()``); ``decode_threads`` is
    how many threads inflate and hash, and how many write the pieces of large files at
    their offsets (default: the cores, at most 4). All of a restore's inputs are its
    arguments: no ``CHECKPOINT_*`` variable is read.
    """
    started = time.perf_counter()
    decode_threads = decode_width(decode_threads)  # a bad width fails before any I/O
    target = Path(target)
    _require_empty(target)
    detection, stream = sniff(source)
    if detection.kind == "none":
        return RestoreResult(detection, None, 0, 0, time.perf_counter() - started)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        if detection.kind == "tarball":
            reader = TarReader(stream, detection.compression, limits=limits,
                               decode_threads=decode_threads)
            members, size = _extract_members(reader, staging, decode_threads)
            version = reader.format_version
            restored = target
        else:
            size = _copy_payload(stream, staging / PAYLOAD_NAME, decode_threads)
            members, version = 1, None
            restored = target / PAYLOAD_NAME
        _publish(staging, target)
    except BaseException:
        remove_tree(staging)
        raise
    return RestoreResult(
        detection, restored, members, size, time.perf_counter() - started, version
    )


def remove_tree(root: str | os.PathLike[str]) -> bool:
    """Remove a tree that :func:`restore` wrote (or was writing), including the read-only
    directories it restores faithfully, which ``shutil.rmtree`` alone cannot empty as a
    normal user. What still cannot be removed is left in place; a missing tree is fine.
    Never raises ``OSError``: returns whether ``root`` is gone.

    Iterative, on directory descriptors: a tree thousands of levels deep needs neither
    recursion (``shutil.rmtree`` recurses on Python 3.10-3.12, and fails past ~1,000 levels)
    nor paths longer than PATH_MAX, and at most three descriptors are open at any time (the
    top, the directory being emptied and, for a moment, the one entered or left). Links
    are removed, never followed.
    """
    path = os.fspath(root)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        _unlink_or_rmdir(path, None, False)
        return not os.path.lexists(path)
    with contextlib.suppress(OSError):
        top = _open_dir(path, None, st)
        try:
            _empty_tree(top)
        finally:
            os.close(top)
    _unlink_or_rmdir(path, None, True)
    return not os.path.lexists(path)


def _open_dir(name: str, dir_fd: int | None, st: os.stat_result) -> int:
    """A descriptor of the directory ``name``, first made readable, writable and searchable
    by its owner if it was not (what emptying it needs)."""
    if st.st_mode & 0o700 != 0o700:
        os.chmod(name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=dir_fd)
    return os.open(name, _DIR_OPEN, dir_fd=dir_fd)


def _empty_tree(top: int) -> None:
    """Remove everything below the directory open as ``top`` (which stays open).

    Depth first, holding the current directory's descriptor and, per level, the names left
    to remove; the way back up is ``..``, checked against the device and inode recorded on
    the way down, so that a directory moved meanwhile stops the walk instead of redirecting
    it. What cannot be removed is skipped."""
    fd = top
    # (names left, this directory's name in its parent, the parent's (st_dev, st_ino))
    levels: list[tuple[list[str], str, tuple[int, int]]] = [(os.listdir(top), "", (0, 0))]
    try:
        while True:
            names, name_in_parent, parent_id = levels[-1]
            if not names:
                if len(levels) == 1:
                    return
                levels.pop()
                parent = os.open("..", _DIR_OPEN, dir_fd=fd)
                os.close(fd)
                fd = parent
                up = os.fstat(fd)
                if (up.st_dev, up.st_ino) != parent_id:
                    return  # moved meanwhile: leave the rest
                _unlink_or_rmdir(name_in_parent, fd, True)
                continue
            name = names.pop()
            try:
                st = os.lstat(name, dir_fd=fd)
            except OSError:
                continue
            if not stat.S_ISDIR(st.st_mode):
                _unlink_or_rmdir(name, fd, False)
                continue
            try:
                child = _open_dir(name, fd, st)
            except OSError:
                continue  # cannot be entered: left in place
            try:
                here = os.fstat(fd)
                levels.append((os.listdir(child), name, (here.st_dev, here.st_ino)))
            except OSError:
                os.close(child)
                continue
            if fd != top:
                os.close(fd)
            fd = child
    finally:
        if fd != top:
            os.close(fd)


def _unlink_or_rmdir(name: str, dir_fd: int | None, directory: bool) -> None:
    """Remove one entry; on a permission error make its directory writable and retry once.
    Failures are left in place, as the docstring of :func:`remove_tree` says."""
    remove = os.rmdir if directory else os.unlink
    try:
        remove(name, dir_fd=dir_fd)
        return
    except FileNotFoundError:
        return
    except PermissionError:
        pass
    except OSError:
        return
    with contextlib.suppress(OSError):
        if dir_fd is None:
            parent = os.path.dirname(os.path.abspath(name))
            os.chmod(parent, os.stat(parent).st_mode | 0o700)
        else:
            os.fchmod(dir_fd, os.fstat(dir_fd).st_mode | 0o700)
        remove(name, dir_fd=dir_fd)


def _require_empty(target: Path) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(f"restore target {target} exists and is not a directory")
    if target.is_dir() and _has_entries(target):
        raise FileExistsError(
            f"restore target {target} is not empty; restore needs an empty directory"
        )


def _has_entries(directory: Path) -> bool:
    with os.scandir(directory) as entries:
        return any(True for _ in entries)


def _publish(staging: Path, target: Path) -> None:
    mode = target.stat().st_mode & 0o7777 if target.is_dir() else 0o755
    os.chmod(staging, mode)
    os.rename(staging, target)  # atomic; replaces an empty directory on POSIX


def _copy_payload(stream: BinaryIO, dest: Path, width: int = 1) -> int:
    """Write a raw payload: as the buffers the stream hands out (``read_pieces``), by the
    writer pool at their offsets when there is more than one thread."""
    fd = os.open(dest, _FILE_FLAGS, 0o644)
    try:
        pieces = _stream_pieces(stream)
        if width < 2:
            size = 0
            for chunk in pieces:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                size += len(chunk)
            return size
        writers = _Writers(width)
        try:
            return writers.write(fd, pieces)
        finally:
            writers.close()
    finally:
        os.close(fd)


def _stream_pieces(stream: BinaryIO) -> Iterator[bytes | memoryview]:
    while pieces := read_pieces_of(stream, _COPY_CHUNK):
        yield from pieces


def _extract_members(reader: TarReader, staging: Path, width: int = 1) -> tuple[int, int]:
    """Write every member under ``staging``. Every entry is made relative to a descriptor of
    its own directory, so a name as long as the limit allows never meets PATH_MAX. Large
    files are written by ``width`` threads (see :class:`_Writers`)."""
    writers = _Writers(width) if width > 1 else None
    try:
        return _extract_all(reader, staging, writers)
    finally:
        if writers is not None:
            writers.close()


def _extract_all(reader: TarReader, staging: Path, writers: _Writers | None) -> tuple[int, int]:
    root = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    made: dict[str, dict] = {}  # the directories made so far, as a trie of components
    directories: dict[str, Member] = {}
    restored = 0
    size = 0
    # The directory of the last member: its name, trie node and descriptor (members of one
    # directory usually come together, so most need no walk and no open).
    here: tuple[str | None, dict[str, dict], int] = (None, made, root)
    try:
        with reader:
            for member, chunks in reader.members():
                dirname, _, leaf = member.name.rpartition("/")
                try:
                    if dirname != here[0]:
                        node, fd = _make_parents(member.name, made, root)
                        if here[2] != root:
                            os.close(here[2])
                        here = (dirname, node, fd)
                    parent, fd = here[1], here[2]
                    restored += 1
                    if member.type == "file":
                        size += _write_file(member, chunks, leaf, fd, writers)
                    elif member.type == "dir":
                        if leaf not in parent:
                            os.mkdir(leaf, 0o700, dir_fd=fd)
                            parent[leaf] = {}
                        directories[member.name] = member  # a later entry's metadata wins
                    elif member.type == "symlink":
                        assert member.linkname is not None
                        os.symlink(member.linkname, leaf, dir_fd=fd)
                        mtime = (member.mtime_ns, member.mtime_ns)
                        os.utime(leaf, ns=mtime, dir_fd=fd, follow_symlinks=False)
                    else:
                        assert member.linkname is not None
                        source_dir, _, source = member.linkname.rpartition("/")
                        source_fd = _open_path(source_dir, root)
                        try:
                            os.link(source, leaf, src_dir_fd=source_fd, dst_dir_fd=fd,
                                    follow_symlinks=False)
                        finally:
                            if source_fd != root:
                                os.close(source_fd)
                except OSError as exc:
                    raise _naming(exc, member.name)  # noqa: B904 -- _naming keeps the cause
        # CF-EXTRACT-10: directory modes and times last, deepest first, so that writing their
        # contents neither needed nor disturbed them.
        for name in sorted(directories, key=lambda n: n.count("/"), reverse=True):
            member = directories[name]
            dirname, _, leaf = name.rpartition("/")
            fd = _open_path(dirname, root)
            try:
                os.chmod(leaf, member.mode, dir_fd=fd)
                os.utime(leaf, ns=(member.mtime_ns, member.mtime_ns), dir_fd=fd)
            finally:
                if fd != root:
                    os.close(fd)
    finally:
        if here[2] != root:
            os.close(here[2])
        os.close(root)
    return restored, size


#: Paths opened in one call stay below this many bytes (Linux's PATH_MAX is 4,096 with
#: the NUL): a longer one is opened a piece at a time, each relative to the one before.
_PATH_PIECE = 4000


def _open_path(path: str, root: int) -> int:
    """A descriptor of the directory ``path`` below ``root`` (``root`` itself for ``""``),
    opened in pieces shorter than PATH_MAX, whatever its length."""
    if not path:
        return root
    if len(os.fsencode(path)) < _PATH_PIECE:
        return os.open(path, _DIR_OPEN, dir_fd=root)
    fd = root
    try:
        piece: list[str] = []
        length = 0
        for part in path.split("/"):
            size = len(os.fsencode(part)) + 1
            if piece and length + size >= _PATH_PIECE:
                below = os.open("/".join(piece), _DIR_OPEN, dir_fd=fd)
                if fd != root:
                    os.close(fd)
                fd = below
                piece, length = [], 0
            piece.append(part)
            length += size
        below = os.open("/".join(piece), _DIR_OPEN, dir_fd=fd)
    except BaseException:
        if fd != root:
            os.close(fd)
        raise
    if fd != root:
        os.close(fd)
    return below


def _make_parents(name: str, made: dict[str, dict], root: int) -> tuple[dict[str, dict], int]:
    """Create the missing parents of ``name`` (implicit parents: 0o755, CF-EXTRACT-10) and
    return the trie node of its directory and a descriptor of it (``root`` for a name at
    the top; the caller closes any other). Each missing level is made relative to a
    descriptor of the one above, so a member thousands of levels deep costs one walk of its
    name, not one per level."""
    parts = name.split("/")[:-1]
    node = made
    index = 0
    while index < len(parts) and parts[index] in node:
        node = node[parts[index]]
        index += 1
    fd = _open_path("/".join(parts[:index]), root)
    try:
        for part in parts[index:]:
            os.mkdir(part, 0o755, dir_fd=fd)
            below = os.open(part, _DIR_OPEN, dir_fd=fd)
            if fd != root:
                os.close(fd)
            fd = below
            node = node.setdefault(part, {})
    except BaseException:
        if fd != root:
            os.close(fd)
        raise
    return node, fd


def _naming(exc: OSError, member: str) -> OSError:
    """The error to raise for ``exc``, saying which member was being restored.

    A builtin OSError (a local write that failed: ENOSPC, EACCES, ...) is raised again as
    the same class with the member in its message, ``exc`` as its cause. Any other class (a
    storage error raised while the member's bytes were being read: ``StorageRetryError``,
    ``ObjectChangedError``, ...) has a constructor of its own and already names its URI:
    it is raised as it is, its message and cause untouched, with the member as a note
    (``__notes__``; ``add_note`` on 3.11+, the attribute itself on 3.10).
    """
    note = f"while restoring member {member!r}"
    if type(exc).__module__ != "builtins":
        notes = getattr(exc, "__notes__", None)
        if not (isinstance(notes, list) and note in notes):
            if hasattr(exc, "add_note"):
                exc.add_note(note)
            else:  # Python 3.10
                exc.__notes__ = [*(notes or ()), note]
        return exc
    if exc.errno is None or exc.strerror is None:  # OSError("message"): no errno to keep
        error = type(exc)(f"{exc} ({note})")
    else:
        error = type(exc)(exc.errno, f"{exc.strerror} ({note})")
        if exc.filename is not None:  # set to None, str() would end in ": None"
            error.filename = exc.filename
    error.__cause__ = exc
    return error


class _Writers:
    """Writes pieces of files at their offsets (``os.pwrite``) on a pool, so that no single
    thread copies every restored byte into the kernel. At most ``2 x width`` pieces are in
    flight; each keeps the decoded chunk it views alive until written, so memory stays
    within that many pieces. The pool starts on the first large file."""

    def __init__(self, width: int) -> None:
        self._width = width
        self._pool: ThreadPoolExecutor | None = None
        self._in_flight: collections.deque[Future[None]] = collections.deque()

    def write(self, fd: int, pieces: Iterable[bytes | memoryview]) -> int:
        """Write ``pieces`` in order from offset 0 of ``fd``; returns the bytes written once
        every piece is on the file. The first failure is raised, after every write of
        ``fd`` in flight has ended (so the caller may close it)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._width, "checkpoint-write")
        offset = 0
        try:
            for chunk in pieces:
                chunk = memoryview(chunk)  # slices are views, not copies
                for start in range(0, len(chunk), _WRITE_PIECE):
                    piece = chunk[start:start + _WRITE_PIECE]
                    while len(self._in_flight) >= 2 * self._width:
                        self._in_flight.popleft().result()
                    self._in_flight.append(self._pool.submit(_pwrite_all, fd, piece, offset))
                    offset += len(piece)
            while self._in_flight:
                self._in_flight.popleft().result()
        except BaseException:
            self._settle()
            raise
        return offset

    def _settle(self) -> None:
        """Let every write in flight end, its outcome dropped (a failure is being raised)."""
        while self._in_flight:
            future = self._in_flight.popleft()
            future.cancel()
            with contextlib.suppress(BaseException):
                future.result()

    def close(self) -> None:
        self._settle()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _pwrite_all(fd: int, piece: memoryview, offset: int) -> None:
    view = piece
    while view:
        view = view[os.pwrite(fd, view, offset + len(piece) - len(view)) :]


def _write_file(member: Member, chunks, leaf: str, directory: int,
                writers: _Writers | None = None) -> int:
    # Created private, its mode set once the content is in place. (Creating it with its
    # final mode and skipping the fchmod is not exact: a default ACL on the directory, or
    # another thread's umask, would narrow it.)
    fd = os.open(leaf, _FILE_FLAGS, 0o600, dir_fd=directory)
    written = 0
    try:
        if writers is not None and member.size >= _PARALLEL_WRITE_MIN:
            written = writers.write(fd, chunks)
        else:
            for chunk in chunks:
                view = chunk
                while view:
                    view = view[os.write(fd, view) :]
                written += len(chunk)
        os.fchmod(fd, member.mode)
        os.utime(fd, ns=(member.mtime_ns, member.mtime_ns))
    finally:
        os.close(fd)
    return written
