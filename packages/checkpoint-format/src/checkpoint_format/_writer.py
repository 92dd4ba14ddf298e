"""The streaming writer: a directory in, a spec-compliant gzip tarball out (spec §3, §4).

The tar stream is produced in the calling thread (walk, stat, headers, small files) and cut
into slices; each slice becomes one gzip member, compressed or stored on a thread pool, and
the members are written to the sink in order. The bytes of large files are read on the
pool too, twice: once to hash them (the digest precedes the data), once straight into the
members that store them. Nothing touches the disk but the files being read.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Protocol

from ._codec import codec_name, gzip_member, seal_member, stored_member
from ._errors import WriteRefusedError
from ._links import NameTree, target_problem
from ._spec import BLOCK, PIECE, PLAIN_KEY, TARBALL_VERSION, TREE_KEY, VERSION_KEY, WRITER_KEY
from ._tarheader import (
    DIRECTORY,
    HARDLINK,
    PAX_GLOBAL,
    REGULAR,
    SYMLINK,
    build_header,
    format_pax_mtime,
    padding,
    pax_header,
)
from ._version import __version__
from ._width import compress_width

__all__ = ["WriteStats", "changed_in_place", "write_tarball"]

#: Size of the tar slices handed to the compressors, and of file reads.
CHUNK_SIZE = 4 << 20
_MAX_OCTAL_SIZE = 8**11 - 1  # what a 12-byte ustar size/mtime field holds
_USTAR_NAME = 100
_PIECES_IN_FLIGHT = 8  # pieces being hashed at once (1 MiB buffers each)
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
_IOV_MAX = 256  # views per preadv call, well within every system's IOV_MAX


class Sink(Protocol):
    """Where the members go, in order. Each is a buffer of its own (``bytes`` or
    ``bytearray``) that the writer never touches again once written: a sink may keep it
    rather than copy it."""

    def write(self, data: bytes, /) -> object: ...


@dataclasses.dataclass
class WriteStats:
    """What :func:`write_tarball` wrote."""

    members: int = 0
    files: int = 0
    file_bytes: int = 0
    tar_bytes: int = 0
    compressed_bytes: int = 0
    seconds: float = 0.0
    codec: str = ""

    @property
    def ratio(self) -> float:
        return self.compressed_bytes / self.tar_bytes if self.tar_bytes else 1.0


def write_tarball(
    source: str | os.PathLike[str],
    sink: Sink | BinaryIO,
    *,
    level: int | str = "auto",
    workers: int | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> WriteStats:
    """Write the tree under ``source`` to ``sink`` as a v1 gzip tarball.

    Members are ``source``'s top-level entries and their subtrees (CF-WRITE-03). ``level`` is
    a gzip level 0-9 or ``"auto"`` (store slices that do not compress, level 1 for the rest).
    ``workers`` compressor threads run at once (default: every core this process may run on,
    :func:`~checkpoint_format._width.compress_width`). Raises
    :class:`WriteRefusedError` for a tree that cannot be written under the spec, having then
    written an incomplete stream to ``sink``: callers publish the object only on success.
    """
    root = Path(source)
    if not root.is_dir():
        raise NotADirectoryError(f"checkpoint source {root} is not a directory")
    started = time.perf_counter()
    stats = WriteStats(codec=codec_name())
    stats.tar_bytes, stats.compressed_bytes = compress_stream(
        sink,
        lambda pool: _tar_stream(root, stats, chunk_size, pool),
        level=level,
        workers=workers,
        chunk_size=chunk_size,
    )
    stats.seconds = time.perf_counter() - started
    return stats


def compress_stream(
    sink: Sink | BinaryIO,
    tar_pieces: Callable[[ThreadPoolExecutor], Iterator[bytes | FileSlice]],
    *,
    level: int | str | None = "auto",
    workers: int | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[int, int]:
    """Cut the tar stream ``tar_pieces(pool)`` yields into slices, each one gzip member
    compressed on ``pool`` (which the pieces may use too, for hashing), written to ``sink``
    in order. The stream is bytes and :class:`FileSlice` objects, the data of a large file to be
    read by the worker that stores it. Returns the tar bytes and the compressed bytes
    written. The one compression path of every writer: :func:`write_tarball` and the pieces
    of an assembled object."""
    if level is None:
        level = "auto"
    workers = compress_width(workers)
    tar_bytes = 0
    with ThreadPoolExecutor(workers, thread_name_prefix="checkpoint-gzip") as pool:
        emitter = _Emitter(sink, depth=workers)  # bounds memory: slices in flight
        pieces = _slices(tar_pieces(pool), chunk_size)
        try:
            for piece in pieces:
                if isinstance(piece, FileSlice):
                    tar_bytes += piece.length
                    emitter.put(piece.submit(pool, level))
                else:
                    tar_bytes += len(piece)
                    emitter.put(pool.submit(gzip_member, piece, level))
            return tar_bytes, emitter.finish()
        except BaseException:
            emitter.abort()
            pieces.close()  # the tar stream's open files: closed once their reads are done
            raise


class _Emitter:
    """Writes compressed members to the sink, in order, on a thread of its own: a slow sink
    (an upload) then overlaps with reading, hashing and compressing instead of pausing them."""

    def __init__(self, sink: Sink | BinaryIO, depth: int) -> None:
        self._sink = sink
        self._queue: queue.Queue[Future[bytes] | None] = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._written = 0
        self._thread = threading.Thread(target=self._run, name="checkpoint-emit", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (future := self._queue.get()) is not None:
            if self._error is not None:
                future.cancel()
                continue
            try:
                member = future.result()
                self._sink.write(member)
                self._written += len(member)
            except BaseException as exc:  # handed to the producing thread
                self._error = exc

    def put(self, future: Future[bytes]) -> None:
        while True:
            if self._error is not None:
                future.cancel()
                raise self._error
            try:
                self._queue.put(future, timeout=0.1)
                return
            except queue.Full:
                continue

    def finish(self) -> int:
        """Wait until everything is written; returns the bytes written."""
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._written

    def abort(self) -> None:
        """Stop writing: what is queued is dropped, the thread ends."""
        if self._error is None:
            self._error = _Aborted()
        while True:
            try:
                pending = self._queue.get_nowait()
            except queue.Empty:
                break
            if pending is not None:
                pending.cancel()
        self._queue.put(None)
        self._thread.join()


class _Aborted(Exception):
    """Marks an emitter stopped by its producer; never raised to callers."""


def _slices(pieces: Iterator[bytes | FileSlice], chunk_size: int) -> Iterator[bytes | FileSlice]:
    """Group small pieces into slices of about ``chunk_size``; pass large pieces and file
    slices through (each is handed on before the next piece is asked for, which
    :class:`FileData` counts on)."""
    buffer = bytearray()
    try:
        for piece in pieces:
            if isinstance(piece, FileSlice) or len(piece) >= chunk_size:
                if buffer:
                    yield bytes(buffer)
                    buffer.clear()
                yield piece
                continue
            buffer += piece
            if len(buffer) >= chunk_size:
                yield bytes(buffer)
                buffer.clear()
        if buffer:
            yield bytes(buffer)
    finally:  # closed early (a failed write): so is the tar stream, and its open files
        close = getattr(pieces, "close", None)
        if close is not None:
            close()


# --------------------------------------------------------------------------- the tar stream


def _tar_stream(
    root: Path, stats: WriteStats, chunk_size: int, pool: ThreadPoolExecutor
) -> Iterator[bytes | FileSlice]:
    records = [(VERSION_KEY, TARBALL_VERSION), (WRITER_KEY, f"checkpoint-format {__version__}")]
    inodes: dict[tuple[int, int], str] = {}
    links = NameTree()  # the links only, with their parents: what CF-EXTRACT-03 needs
    for name, path, st in _walk(root):
        if stats.members == 0:
            # CF-MARK-01: the marker leads, but only in front of a member (an empty archive
            # is the end-of-archive marker alone, which tarfile can read).
            yield pax_header(records, PAX_GLOBAL)
        stats.members += 1
        mode = stat.S_IMODE(st.st_mode) & 0o777  # CF-WRITE-06: no setuid/setgid/sticky
        if stat.S_ISDIR(st.st_mode):
            yield _member_header(name, DIRECTORY, mode, st.st_mtime_ns)
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            _check_link(name, target, links)
            yield _member_header(name, SYMLINK, mode, st.st_mtime_ns, linkname=target)
        elif stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in inodes:
                yield _member_header(name, HARDLINK, mode, st.st_mtime_ns, linkname=inodes[key])
                continue
            if st.st_nlink > 1:
                inodes[key] = name
            stats.files += 1
            stats.file_bytes += st.st_size
            yield from _file(name, path, st, mode, chunk_size, pool)
        else:
            raise WriteRefusedError(
                "CF-WRITE-05",
                f"{_kind(st.st_mode)} cannot be saved in a checkpoint (only files, directories"
                " and links)",
                name,
            )
    for name, problem in links.problems():  # judged with every link known, as a reader does
        _refuse_link(name, problem)
    yield bytes(2 * BLOCK)  # CF-WRITE-08


def _walk(root: Path) -> Iterator[tuple[str, str, os.stat_result]]:
    """Depth-first pre-order, siblings sorted by UTF-8 bytes (CF-WRITE-04). Iterative: a
    tree thousands of levels deep needs no recursion (which Python bounds at ~1,000)."""
    stack: list[tuple[Iterator[os.DirEntry[str]], str]] = [(_entries(root), "")]
    while stack:
        entries, prefix = stack[-1]
        entry = next(entries, None)
        if entry is None:
            stack.pop()
            continue
        try:
            entry.name.encode("utf-8")
        except UnicodeEncodeError:
            raise WriteRefusedError(
                "CF-WRITE-02",
                "name is not valid UTF-8",
                prefix + os.fsencode(entry.name).decode("utf-8", "replace"),
            ) from None
        name = prefix + entry.name
        st = entry.stat(follow_symlinks=False)
        yield name, entry.path, st
        if stat.S_ISDIR(st.st_mode):
            stack.append((_entries(entry.path), name + "/"))


def _entries(directory: str | Path) -> Iterator[os.DirEntry[str]]:
    with os.scandir(directory) as scan:
        entries = sorted(scan, key=lambda entry: os.fsencode(entry.name))
    return iter(entries)


def _check_link(name: str, target: str, links: NameTree) -> None:
    """CF-WRITE-05: refuse what a reader would refuse under CF-EXTRACT-03, judged the same
    way. A target that is not relative is refused at once; where the others lead is judged
    once every link of the tree is known (:meth:`NameTree.problems`)."""
    problem = target_problem(target)
    if problem is not None:
        _refuse_link(name, problem)
    parts = name.split("/")
    parent = links.parent(parts)
    assert not isinstance(parent, int)  # the walk never descends into a link
    links.add_link(parent, name, parts[-1], target)


def _refuse_link(name: str, problem: str) -> None:
    raise WriteRefusedError(
        "CF-WRITE-05",
        f"{problem}; only relative links that stay inside the checkpoint can be saved",
        name,
    )


def _member_header(
    name: str,
    typeflag: bytes,
    mode: int,
    mtime_ns: int,
    *,
    size: int = 0,
    linkname: str = "",
    digest: str | None = None,
    digest_key: str = PLAIN_KEY,
) -> bytes:
    """The pax extended header and ustar header of one member (CF-WRITE-02, -06, CF-MARK-04)."""
    raw_name = name.encode("utf-8")
    raw_link = linkname.encode("utf-8")
    records: list[tuple[str, str]] = []
    if len(raw_name) > _USTAR_NAME or not raw_name.isascii():
        records.append(("path", name))
    if len(raw_link) > _USTAR_NAME or not raw_link.isascii():
        records.append(("linkpath", linkname))
    records.append(("mtime", format_pax_mtime(mtime_ns)))
    if size > _MAX_OCTAL_SIZE:
        records.append(("size", str(size)))
    if digest is not None:
        records.append((digest_key, digest))
    header = build_header(
        raw_name,
        mode=mode,
        size=size if size <= _MAX_OCTAL_SIZE else 0,
        mtime=min(max(mtime_ns // 1_000_000_000, 0), _MAX_OCTAL_SIZE),
        typeflag=typeflag,
        linkname=raw_link,
    )
    return pax_header(records) + header


def _file(
    name: str, path: str, st: os.stat_result, mode: int, chunk_size: int, pool: ThreadPoolExecutor
) -> Iterator[bytes | FileSlice]:
    size = st.st_size
    fd = os.open(path, _OPEN_FLAGS)
    with FileData(fd, name, size, lambda now: _check_unchanged(name, st, now)) as data:
        data.check()
        if size <= min(chunk_size, PIECE):  # small file: one read, hash, emit
            content = pread_exactly(fd, size, 0, name)
            digest = hashlib.sha256(content).hexdigest()
            yield _member_header(name, REGULAR, mode, st.st_mtime_ns, size=size, digest=digest)
            yield content + padding(size)
            return
        # Large file: the digest must precede the data, so hash in a first pass. Past one
        # piece, the piecewise digest lets every core take part (CF-MARK-04).
        if size > PIECE:
            digest, key = _piecewise_digest(fd, size, name, pool), TREE_KEY
        else:
            digest, key = _hash_piece(fd, 0, size, name).hex(), PLAIN_KEY
        yield _member_header(
            name, REGULAR, mode, st.st_mtime_ns, size=size, digest=digest, digest_key=key
        )
        yield from data.slices(chunk_size)
    yield padding(size)


class FileData:
    """The data pass of one file, read by the compressing workers: each slice
    (:meth:`slices`) is read with ``os.preadv`` straight into the member that stores it
    (:func:`~checkpoint_format._codec.stored_member`), on the worker that finishes that
    member, so that no one thread reads every byte.

    The descriptor ``fd`` is the object's: held by the ``with`` block of the generator that
    yields the slices and by each read submitted. Whoever lets go last closes it, having
    first, if nothing failed, made the file's final check: it did not grow, and
    ``check(os.fstat(fd))`` passes (CF-WRITE-07). That is after every byte was read, on a
    worker (failing its member, and so the save) or in the generator.
    """

    def __init__(
        self, fd: int, name: str, size: int, check: Callable[[os.stat_result], None]
    ) -> None:
        self.fd, self.name, self.size = fd, name, size
        self._check = check
        self._lock = threading.Lock()
        self._holders = 1  # the generator, until its with block ends
        self._failed = False

    def __enter__(self) -> FileData:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._release(ok=exc_type is None)

    def check(self) -> None:
        """The check, now (as the file is opened)."""
        self._check(os.fstat(self.fd))

    def slices(self, chunk_size: int) -> Iterator[FileSlice]:
        for offset in range(0, self.size, chunk_size):
            yield FileSlice(self, offset, min(chunk_size, self.size - offset))

    def _hold(self) -> None:
        with self._lock:
            if self._holders == 0:  # pragma: no cover - compress_stream submits in order
                raise RuntimeError(f"{self.name}: a read submitted after the file was closed")
            self._holders += 1

    def _release(self, ok: bool) -> None:
        with self._lock:
            self._holders -= 1
            self._failed |= not ok
            if self._holders:
                return
        try:
            if not self._failed:
                if os.pread(self.fd, 1, self.size):
                    raise _changed(self.name, "it grew while being saved")
                self.check()
        finally:
            os.close(self.fd)


@dataclasses.dataclass(frozen=True)
class FileSlice:
    """``length`` bytes of a file at ``offset``, to be read into the member storing them."""

    data: FileData
    offset: int
    length: int

    def submit(self, pool: ThreadPoolExecutor, level: int | str) -> Future[bytes | bytearray]:
        """Read and seal this slice's member on ``pool``."""
        self.data._hold()
        ran = False

        def member() -> bytes | bytearray:
            nonlocal ran
            ran = True
            return self._member(level)

        try:
            future = pool.submit(member)
        except BaseException:  # a pool shut down: this read never holds the file
            self.data._release(ok=False)
            raise
        # A read that never ran (cancelled) lets go here: callbacks run then too. One that
        # ran let go itself, before its future was done.
        future.add_done_callback(lambda _: ran or self.data._release(ok=False))
        return future

    def _member(self, level: int | str) -> bytes | bytearray:
        read = False
        try:
            member, slots = stored_member(self.length)
            _preadv_exactly(self.data.fd, slots, self.offset, self.data.name)
            read = True
        finally:
            self.data._release(ok=read)  # the file's last read makes its final check
        return seal_member(member, slots, level)


def _preadv_exactly(fd: int, views: list[memoryview], offset: int, name: str) -> None:
    """Fill ``views`` in order from ``fd`` at ``offset``."""
    preadv = getattr(os, "preadv", None)
    views = list(views)  # what is left to fill; the caller's list stays whole
    while views:
        batch = views[:_IOV_MAX]
        if preadv is not None:
            got = preadv(fd, batch, offset)
        else:  # pragma: no cover - systems without preadv (Windows)
            data = os.pread(fd, sum(view.nbytes for view in batch), offset)
            got = len(data)
            _fill(batch, data)
        if not got:
            raise _changed(name, "it shrank while being saved")
        offset += got
        while got:
            if got >= views[0].nbytes:
                got -= views.pop(0).nbytes
            else:
                views[0] = views[0][got:]
                got = 0


def _fill(views: list[memoryview], data: bytes) -> None:  # pragma: no cover - no preadv
    offset = 0
    for view in views:
        if offset >= len(data):
            return
        chunk = data[offset : offset + view.nbytes]
        view[: len(chunk)] = chunk
        offset += len(chunk)


def _piecewise_digest(fd: int, size: int, name: str, pool: ThreadPoolExecutor) -> str:
    """SHA-256 over the SHA-256s of the file's 4 MiB pieces, hashed on the pool."""
    # Each piece is read by the worker that hashes it (pread at its offset), so that no
    # one thread reads every byte of the first pass.
    outer = hashlib.sha256()
    pending: collections.deque[Future[bytes]] = collections.deque()
    try:
        for offset in range(0, size, PIECE):
            length = min(PIECE, size - offset)
            pending.append(pool.submit(_hash_piece, fd, offset, length, name))
            while len(pending) > _PIECES_IN_FLIGHT:
                outer.update(pending.popleft().result())
        while pending:
            outer.update(pending.popleft().result())
    finally:
        for future in pending:  # a failed piece: none may read the fd once it is closed
            future.cancel()
        for future in pending:
            if not future.cancelled():
                future.exception()
    if os.pread(fd, 1, size):
        raise _changed(name, "it grew while being saved")
    return outer.hexdigest()


def _hash_piece(fd: int, offset: int, length: int, name: str) -> bytes:
    """SHA-256 of ``length`` bytes of ``fd`` at ``offset``, read in 1 MiB preads."""
    hasher = hashlib.sha256()
    done = 0
    while done < length:
        data = os.pread(fd, min(length - done, 1 << 20), offset + done)
        if not data:
            raise _changed(name, "it shrank while being saved")
        hasher.update(data)
        done += len(data)
    return hasher.digest()


def pread_exactly(fd: int, size: int, offset: int, name: str) -> bytes:
    """``size`` bytes of ``fd`` at ``offset``; a file that ends first shrank."""
    data = os.pread(fd, size, offset)
    while len(data) < size:
        more = os.pread(fd, size - len(data), offset + len(data))
        if not more:
            raise _changed(name, "it shrank while being saved")
        data += more
    return data


def changed_in_place(
    before: os.stat_result, after: os.stat_result, *, links_added: bool = False
) -> str | None:
    """Why the file stat'ed as ``before`` and then ``after`` may have been written in place
    (its bytes changed under the same inode), or ``None`` if it was not (CF-WRITE-07).

    Size and modification time can be put back (``rsync --inplace -t``, ``os.utime``); the
    change time cannot: every write, ``utime`` and ``chmod`` sets it. A name removed or added
    sets it too. A removal lowers the link count and leaves the bytes alone, so a change time
    moved with fewer links is accepted (a file whose other names are gone can no longer be
    opened by them and written). A name added raises the link count: refused unless
    ``links_added`` says the caller knows links are being added to its files, since a rewrite
    may hide behind the new link's change time.
    """
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
        return "its size or modification time changed"
    if before.st_ctime_ns == after.st_ctime_ns or after.st_nlink < before.st_nlink:
        return None
    if links_added and after.st_nlink > before.st_nlink:
        return None
    return ("its change time moved, with its size and modification time put back, as an"
            " in-place rewrite followed by utime (rsync --inplace -t) leaves it")


def _check_unchanged(name: str, before: os.stat_result, now: os.stat_result) -> None:
    # A link added while the file is read (a background save's snapshot of the same tree,
    # taken by another Checkpoint or thread, hard-links its files; so does ``cp -al``) moves
    # the change time: accepted when the size and modification time held. The writer cannot
    # tell such a link from one added by whoever rewrote the file and put its mtime back;
    # that takes two concurrent actors, where a snapshot's own check (which knows its links)
    # stays exact.
    why = changed_in_place(before, now, links_added=True)
    if why is not None:
        raise _changed(name, f"{why} while being saved")


def _changed(name: str, why: str) -> WriteRefusedError:
    return WriteRefusedError("CF-WRITE-07", f"file changed during save: {why}", name)


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "an unknown file type"
