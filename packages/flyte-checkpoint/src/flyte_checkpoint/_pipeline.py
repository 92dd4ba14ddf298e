"""The pieces of the blocking pipelines that stream between a local tree and one object:
adapters between the tar writer/restorer and the object's stream (with cancellation and
progress), what a save reads, and running a pipeline off an event loop."""

from __future__ import annotations

import asyncio
import os
import pathlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from checkpoint_format import changed_in_place

from ._progress import Progress
from ._snapshot import open_regular

__all__ = ["Cancelled", "EmptyPayload", "ReadStream", "WriteSink", "copy_bytes", "copy_file",
           "ensure_local_parent", "in_thread", "save_source", "size_of"]

CHUNK = 8 << 20
_T = TypeVar("_T")


class EmptyPayload(RuntimeError):
    """A file read as zero bytes: stored, it would read as no checkpoint (CF-WRITE-12)."""


class Cancelled(RuntimeError):
    """Raised inside a pipeline whose awaiting task was cancelled, to abort it."""


class WriteSink:
    """Adapts the object writer for the tar writer; checks for cancellation between chunks.
    ``owned``: what is written is never changed again by its writer (the tar writer's
    members), so the object writer may keep it instead of copying it."""

    def __init__(self, remote: Any, progress: Progress, cancelled: threading.Event) -> None:
        self._remote = remote
        self._progress = progress
        self._cancelled = cancelled
        self.owned = False
        self.written = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._cancelled.is_set():
            raise Cancelled("save cancelled")
        self._remote.write(data, owned=self.owned)
        self.written += len(data)
        self._progress.update(len(data))
        return len(data)


class ReadStream:
    """Adapts the object reader for the restorer; checks for cancellation between reads."""

    # No copy on the way: the restorer takes whole gzip members through read_pieces.

    def __init__(self, remote: Any, progress: Progress, cancelled: threading.Event) -> None:
        self._remote = remote
        self._progress = progress
        self._cancelled = cancelled

    def read(self, size: int = -1) -> bytes:
        if self._cancelled.is_set():
            raise Cancelled("load cancelled")
        data = self._remote.read(size)
        self._progress.update(len(data))
        return data

    def read_pieces(self, size: int = -1) -> list[Any]:
        """Like :meth:`read`, as the buffers the object reader received (views of the
        network's, unjoined): the restorer hands them to the inflaters as they are."""
        if self._cancelled.is_set():
            raise Cancelled("load cancelled")
        read_pieces = getattr(self._remote, "read_pieces", None)
        if read_pieces is None:
            data = self._remote.read(size)
            pieces = [data] if data else []
        else:
            pieces = read_pieces(size)
        self._progress.update(sum(map(len, pieces)))
        return pieces


def save_source(data: Any) -> pathlib.Path | memoryview:
    """What a save reads: a path that exists, or the bytes as one flat view."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        if not view.c_contiguous:  # strided or Fortran-ordered: its bytes in C order
            return memoryview(view.tobytes())
        return view.cast("B")
    if isinstance(data, (str, os.PathLike)):
        path = pathlib.Path(data)
        if not path.exists():
            raise FileNotFoundError(f"checkpoint source path does not exist: {path}")
        return path
    raise TypeError(
        f"save() takes a pathlib.Path, a str path or bytes, not {type(data).__name__}"
    )


def size_of(source: pathlib.Path | memoryview) -> int | None:
    if isinstance(source, memoryview):
        return len(source)
    return source.stat().st_size if source.is_file() else None


def size_hint(source: pathlib.Path | memoryview) -> int | None:
    """About how many bytes saving ``source`` uploads: a file's or the bytes' size, for a
    directory the sum of its regular files (symlinks not followed; what cannot be read is
    left out, the save itself reports it). Storage sizes its parts by it."""
    size = size_of(source)
    if size is not None or not isinstance(source, pathlib.Path):
        return size
    total, pending = 0, [str(source)]
    while pending:
        try:
            with os.scandir(pending.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            pending.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def copy_bytes(data: memoryview, sink: WriteSink) -> int:
    for start in range(0, len(data), CHUNK):
        sink.write(data[start : start + CHUNK])
    return len(data)


def copy_file(path: pathlib.Path, sink: WriteSink) -> int:
    size = 0
    with open(open_regular(path), "rb") as handle:  # a FIFO swapped in cannot block
        before = os.fstat(handle.fileno())
        while chunk := handle.read(CHUNK):
            sink.write(chunk)
            size += len(chunk)
        after = os.fstat(handle.fileno())
    # As the tar writer judges a file it reads (a link added meanwhile, by another
    # Checkpoint's snapshot of it, is no write).
    why = changed_in_place(before, after, links_added=True)
    if why is None and size != after.st_size:
        why = "it was read with another size than it has"
    if why is not None:
        raise OSError(f"{path} changed while it was being saved ({why}); not publishing a"
                      " torn copy")
    return size


def ensure_local_parent(uri: str) -> None:
    if "://" in uri and not uri.startswith("file://"):
        return
    path = uri.removeprefix("file://")
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)


async def in_thread(work: Callable[[threading.Event], _T]) -> _T:
    """Run a blocking pipeline on a worker thread. If the awaiting task is cancelled, tell
    the pipeline to stop, wait until it has aborted (so nothing is published half-way), then
    let the cancellation through."""
    cancelled = threading.Event()
    future = asyncio.get_running_loop().run_in_executor(None, work, cancelled)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        cancelled.set()
        while not future.done():  # a second cancel must not let the caller go on early
            try:
                await asyncio.shield(future)
            except asyncio.CancelledError:
                continue
            except BaseException:  # the pipeline's own abort error; the cancellation wins
                break
        raise
