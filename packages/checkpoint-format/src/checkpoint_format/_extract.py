"""Restore an object into a directory: staged, verified, then published whole (spec §5, §7)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

from ._detect import Detection, sniff
from ._limits import Limits
from ._reader import Member, TarReader

__all__ = ["PAYLOAD_NAME", "RestoreResult", "remove_tree", "restore"]

#: CF-RAW-01: where a raw payload lands inside the target.
PAYLOAD_NAME = "payload"

_COPY_CHUNK = 4 << 20
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
    source: BinaryIO, target: str | os.PathLike[str], *, limits: Limits | None = None
) -> RestoreResult:
    """Classify ``source`` and restore it into ``target``, all or nothing.

    ``target`` must be absent or an empty directory. A tarball is extracted under it, a raw
    payload is written to ``target / "payload"``. Everything is first written to a staging
    directory beside ``target`` and renamed into place only once the whole stream has been
    read and verified; on any error the staging directory is removed and ``target`` is left
    as it was (CF-EXTRACT-11). Rule violations raise :class:`CheckpointFormatError`
    subclasses; I/O errors of ``source`` propagate unchanged.
    """
    started = time.perf_counter()
    target = Path(target)
    _require_empty(target)
    detection, stream = sniff(source)
    if detection.kind == "none":
        return RestoreResult(detection, None, 0, 0, time.perf_counter() - started)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        if detection.kind == "tarball":
            reader = TarReader(stream, detection.compression, limits=limits)
            members, size = _extract_members(reader, staging)
            version = reader.format_version
            restored = target
        else:
            size = _copy_payload(stream, staging / PAYLOAD_NAME)
            members, version = 1, None
            restored = target / PAYLOAD_NAME
        _publish(staging, target)
    except BaseException:
        remove_tree(staging)
        raise
    return RestoreResult(
        detection, restored, members, size, time.perf_counter() - started, version
    )


def remove_tree(root: str | os.PathLike[str]) -> None:
    """Remove a tree that :func:`restore` wrote (or was writing), including the read-only
    directories it restores faithfully, which ``shutil.rmtree`` alone cannot empty as a
    normal user. What still cannot be removed is left in place; a missing tree is fine."""

    def make_writable_and_retry(function, path, _exc) -> None:
        parent = os.path.dirname(path)
        with contextlib.suppress(OSError):
            os.chmod(parent, os.stat(parent).st_mode | 0o700)
            if os.path.isdir(path) and not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o700)
            function(path)

    if not os.path.lexists(root):
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(root, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(root, onerror=make_writable_and_retry)


def _require_empty(target: Path) -> None:
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(f"restore target {target} exists and is not a directory")
    if target.is_dir() and any(os.scandir(target)):
        raise FileExistsError(
            f"restore target {target} is not empty; restore needs an empty directory"
        )


def _publish(staging: Path, target: Path) -> None:
    mode = target.stat().st_mode & 0o7777 if target.is_dir() else 0o755
    os.chmod(staging, mode)
    os.rename(staging, target)  # atomic; replaces an empty directory on POSIX


def _copy_payload(stream: BinaryIO, dest: Path) -> int:
    size = 0
    fd = os.open(dest, _FILE_FLAGS, 0o644)
    with open(fd, "wb", buffering=0) as out:
        while chunk := stream.read(_COPY_CHUNK):
            out.write(chunk)
            size += len(chunk)
    return size


def _extract_members(reader: TarReader, staging: Path) -> tuple[int, int]:
    """Write every member under ``staging``. All paths are relative to a descriptor of the
    staging directory, so a name as long as the limit allows never meets PATH_MAX."""
    root = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    made: set[str] = {""}
    directories: dict[str, Member] = {}
    restored = 0
    size = 0
    try:
        with reader:
            for member, chunks in reader.members():
                try:
                    _make_parents(member.name, made, root)
                    restored += 1
                    if member.type == "file":
                        size += _write_file(member, chunks, root)
                    elif member.type == "dir":
                        if member.name not in made:
                            os.mkdir(member.name, 0o700, dir_fd=root)
                            made.add(member.name)
                        directories[member.name] = member  # a later entry's metadata wins
                    elif member.type == "symlink":
                        assert member.linkname is not None
                        os.symlink(member.linkname, member.name, dir_fd=root)
                        mtime = (member.mtime_ns, member.mtime_ns)
                        os.utime(member.name, ns=mtime, dir_fd=root, follow_symlinks=False)
                    else:
                        assert member.linkname is not None
                        os.link(member.linkname, member.name, src_dir_fd=root, dst_dir_fd=root,
                                follow_symlinks=False)
                except OSError as exc:
                    raise _naming(exc, member.name)  # noqa: B904 -- _naming keeps the cause
        # CF-EXTRACT-10: directory modes and times last, deepest first, so that writing their
        # contents neither needed nor disturbed them.
        for name in sorted(directories, key=lambda n: n.count("/"), reverse=True):
            member = directories[name]
            os.chmod(name, member.mode, dir_fd=root)
            os.utime(name, ns=(member.mtime_ns, member.mtime_ns), dir_fd=root)
    finally:
        os.close(root)
    return restored, size


def _make_parents(name: str, made: set[str], root: int) -> None:
    parent = name.rpartition("/")[0]
    missing = []
    while parent not in made:
        missing.append(parent)
        parent = parent.rpartition("/")[0]
    for directory in reversed(missing):  # implicit parents: created 0o755 (CF-EXTRACT-10)
        os.mkdir(directory, 0o755, dir_fd=root)
        made.add(directory)


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


def _write_file(member: Member, chunks, root: int) -> int:
    # Created private, its mode set once the content is in place. (Creating it with its
    # final mode and skipping the fchmod is not exact: a default ACL on the directory, or
    # another thread's umask, would narrow it.)
    fd = os.open(member.name, _FILE_FLAGS, 0o600, dir_fd=root)
    written = 0
    try:
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
