"""The pieces of an assembled object (spec §9): the head, a contributor's segment, the end
piece, and padding. Each is whole gzip members, so that concatenating them byte by byte, in
the order of CF-ASM-01, gives one tarball any reader restores.

The head and the segments go through the writer's one compression path
(``_writer.compress_stream``: slices compressed on a pool, stored when they do not shrink,
each member with its size record), and members are built by the writer's own header code, so
a segment's members are byte for byte those :func:`~checkpoint_format.write_tarball` would
write for the same files.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from ._codec import gzip_member, padding_members
from ._errors import WriteRefusedError
from ._scan import DIR, FILE, HARDLINK, SYMLINK, ManifestEntry, TreeManifest
from ._spec import ASSEMBLED_VERSION, BLOCK, PIECE, VERSION_KEY, WRITER_KEY
from ._tarheader import DIRECTORY, PAX_GLOBAL, REGULAR, pax_header
from ._tarheader import HARDLINK as HARDLINK_TYPE
from ._tarheader import SYMLINK as SYMLINK_TYPE
from ._tarheader import padding as block_padding
from ._union import UnionPlan
from ._version import __version__
from ._writer import (
    _OPEN_FLAGS,
    CHUNK_SIZE,
    FileData,
    FileSlice,
    Sink,
    _changed,
    _member_header,
    changed_in_place,
    compress_stream,
    pread_exactly,
)

__all__ = ["end_piece", "padding", "write_head", "write_segment"]

# CF-ASM-05: the end-of-archive marker in one member, stored: the same bytes whatever
# deflate implementation this process has.
_END_PIECE = gzip_member(bytes(2 * BLOCK), 0)


class _Counting:
    def __init__(self, sink: Sink | BinaryIO) -> None:
        self._sink = sink
        self.written = 0

    def write(self, data: bytes) -> None:
        self._sink.write(data)
        self.written += len(data)


def write_head(plan: UnionPlan, sink: Sink | BinaryIO, *, level: int | str | None = None) -> int:
    """Write the head of the object ``plan`` describes to ``sink`` (CF-ASM-02): the marker
    (version 1.2) and every directory of the union, in pre-order. Returns the bytes written:
    none for an empty union, whose object is the end piece alone (CF-ASM-05). ``level`` as
    for :func:`~checkpoint_format.write_tarball` (``None``: ``"auto"``)."""
    if plan.empty:
        return 0

    def pieces(_pool: ThreadPoolExecutor) -> Iterator[bytes]:
        records = [
            (VERSION_KEY, ASSEMBLED_VERSION),
            (WRITER_KEY, f"checkpoint-format {__version__}"),
        ]
        yield pax_header(records, PAX_GLOBAL)  # CF-MARK-01
        for entry in plan.directory_entries:
            yield _member_header(entry.name, DIRECTORY, entry.mode, entry.mtime_ns)

    return compress_stream(sink, pieces, level=level)[1]


def write_segment(
    directory: str | os.PathLike[str],
    manifest: TreeManifest,
    names: Iterable[str],
    sink: Sink | BinaryIO,
    *,
    workers: int | None = None,
    level: int | str | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> int:
    """Write one contributor's segment (CF-ASM-03): the members ``names`` of ``manifest``
    (the plan's ``assigned[rank]``), read from ``directory``, in the manifest's pre-order,
    with the digests the scan computed (no second digest pass). Returns the bytes written
    (0 for no names).

    Each file is checked against the scan's fingerprint when it is opened and again when it
    has been read, and must yield exactly its size (CF-WRITE-07, CF-ASM-08); small files are
    also hashed again, which costs nothing next to reading them. Raises
    :class:`WriteRefusedError` for a file or link that changed, having then written an
    incomplete segment: the caller must not commit the object. ``ValueError`` for a name the
    manifest does not hold, or a directory (the head writes those).
    """
    if isinstance(names, str):
        raise TypeError("names must be a collection of member names, not one string")
    root = Path(directory)
    wanted = set(names)
    entries = [entry for entry in manifest.entries if entry.name in wanted]
    if len(entries) != len(wanted):
        unknown = sorted(wanted - {entry.name for entry in entries})
        raise ValueError(f"names not in the manifest of {manifest.root}: {unknown[:5]}")
    dirs = [entry.name for entry in entries if entry.kind == DIR]
    if dirs:
        raise ValueError(f"directories belong in the head, not in a segment: {dirs[:5]}")
    if not entries:
        return 0

    def pieces(_pool: ThreadPoolExecutor) -> Iterator[bytes | FileSlice]:
        for entry in entries:
            yield from _member(root, entry, chunk_size)

    counted = _Counting(sink)
    compress_stream(counted, pieces, level=level, workers=workers, chunk_size=chunk_size)
    return counted.written


def end_piece() -> bytes:
    """The end piece (CF-ASM-05): one gzip member holding the end-of-archive marker. For an
    empty union it is the whole object."""
    return _END_PIECE


def padding(n: int) -> bytes:
    """Padding members (CF-ASM-06) that add nothing to the tar stream: exactly ``n`` bytes
    for ``n`` of 26 or more (or 0), else the 26-byte minimum. Put them between any two
    gzip members of an assembled object, never before the head's first member nor in the
    end piece."""
    return padding_members(n)


# --------------------------------------------------------------------------- members


def _member(root: Path, entry: ManifestEntry, chunk_size: int) -> Iterator[bytes]:
    path = os.path.join(root, *entry.name.split("/"))
    if entry.kind == SYMLINK:
        try:
            target = os.readlink(path)
        except OSError as exc:
            raise _moved(entry, f"it can no longer be read as a symbolic link ({exc})") from None
        if target != entry.link:
            raise _moved(entry, f"its target changed from {entry.link!r} to {target!r}")
        yield _member_header(entry.name, SYMLINK_TYPE, entry.mode, entry.mtime_ns,
                             linkname=target)
    elif entry.kind == HARDLINK:
        assert entry.link is not None
        yield _member_header(entry.name, HARDLINK_TYPE, entry.mode, entry.mtime_ns,
                             linkname=entry.link)
    elif entry.kind == FILE:
        yield from _file(path, entry, chunk_size)
    else:  # pragma: no cover - ManifestEntry kinds are closed
        raise ValueError(f"unknown manifest entry kind {entry.kind!r} for {entry.name!r}")


def _file(path: str, entry: ManifestEntry, chunk_size: int) -> Iterator[bytes | FileSlice]:
    name, size = entry.name, entry.size
    if entry.digest is None or entry.digest_key is None:
        raise ValueError(f"manifest entry {name!r} has no digest: scan the tree with scan_tree")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise _changed(name, "it was removed since the tree was scanned") from None
    with FileData(fd, name, size, lambda now: _check(entry, now)) as data:
        data.check()
        header = _member_header(
            name, REGULAR, entry.mode, entry.mtime_ns, size=size, digest=entry.digest,
            digest_key=entry.digest_key,
        )
        if size <= min(chunk_size, PIECE):  # one read; hashing it again is free
            content = pread_exactly(fd, size, 0, name)
            if hashlib.sha256(content).hexdigest() != entry.digest:
                raise _changed(name, "its content changed since the tree was scanned")
            yield header
            yield content + block_padding(size)
            return
        yield header
        yield from data.slices(chunk_size)  # read on the workers, checked after the last
    yield block_padding(size)


def _check(entry: ManifestEntry, now: os.stat_result) -> None:
    """CF-ASM-08: the file is the one scanned (same inode), unchanged by CF-WRITE-07."""
    before = entry.fingerprint
    assert before is not None
    if (before.st_dev, before.st_ino) != (now.st_dev, now.st_ino):
        raise _changed(entry.name, "it was replaced by another file since the tree was scanned")
    why = changed_in_place(before, now, links_added=True)  # type: ignore[arg-type]
    if why is not None:
        raise _changed(entry.name, f"{why} since the tree was scanned")


def _moved(entry: ManifestEntry, why: str) -> WriteRefusedError:
    return WriteRefusedError("CF-ASM-08", f"symbolic link changed since it was scanned: {why}",
                             entry.name)

