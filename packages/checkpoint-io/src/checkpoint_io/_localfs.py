"""Local file-system steps shared by the local backend and downloads to local files: hidden
temp siblings that a lock marks as being written, the sweep of those a killed save left,
positional writes, the fsync of a directory. Below both ``_local`` and ``_stream``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
import time

__all__ = ["fsync_dir", "open_temp_sibling", "pwrite_all", "sweep_partials"]

log = logging.getLogger("checkpoint_io")

_PARTIAL = ".partial-"
_PARTIAL_TAIL = re.compile(r"[0-9a-f]{12}")
#: errno values of a file system that does not do flock() at all.
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS})
#: A temp sibling unlocked and unmodified this long (seconds) was left by a dead save.
PARTIAL_IDLE = 600.0


def _temp_sibling(path: str) -> str:
    head, name = os.path.split(path)
    return os.path.join(head, f".{name}{_PARTIAL}{secrets.token_hex(6)}")


def _same_file(fd: int, path: str) -> bool:
    try:
        named = os.lstat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (named.st_dev, named.st_ino)


def open_temp_sibling(path: str) -> tuple[str, int]:
    """Create a hidden temp sibling of ``path`` for writing and ``flock`` it: the lock,
    held while any descriptor of this open file lives, tells :func:`sweep_partials` of
    another save that the file is being written. Returns its name and a descriptor; close
    that only after the file is renamed or removed.

    A sweep may lock and remove the new file in the instant between its creation and our
    lock; the name is then checked to still be ours, and a new one is made if not. Where
    the file system has no ``flock`` (some FUSE and network mounts) the file is written
    unlocked: a sweep leaves alone what it cannot lock, and what was written recently.
    """
    while True:
        temp = _temp_sibling(path)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     0o666)
        try:
            # Blocking: a sweep holds a lock only for the time of one unlink.
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    raise
                log.debug("no flock on %s (%s): writing it unlocked", temp, exc)
            if _same_file(fd, temp):
                return temp, fd
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        os.close(fd)  # swept before we held it: that name is gone, make another


def sweep_partials(path: str, idle: float | None = None) -> list[str]:
    """Remove the temp siblings of ``path`` (``.<name>.partial-<12 hex>``) that no process
    is writing: what a save killed mid-write (SIGKILL, OOM, a lost node) left behind.

    A writer holds an ``flock`` on its temp file until it is renamed or removed (see
    :func:`open_temp_sibling`), so one that cannot be locked here is a live save, in this
    process or another, and is left alone. A free lock proves nothing about a writer that
    could not take one (a file system without ``flock`` on its side, an older
    checkpoint-io on a shared volume, an NFS mount with local locks only), but every writer
    writes: so a file is removed only if it is unlocked *and* unmodified for
    :data:`PARTIAL_IDLE` seconds (or ``idle``, when given). Best effort: what cannot be
    examined or removed stays. Returns the names removed. The part files of shared uploads
    (see ``_local``) are named the same way, and swept by the same rules.
    """
    limit = PARTIAL_IDLE if idle is None else idle
    directory, name = os.path.split(path)
    prefix = f".{name}{_PARTIAL}"
    removed = []
    try:
        with os.scandir(directory or ".") as scan:  # closed even if listing fails midway
            entries = [e.name for e in scan if e.name.startswith(prefix)]
    except OSError:
        return removed
    for entry in entries:
        if not _PARTIAL_TAIL.fullmatch(entry[len(prefix):]):
            continue
        full = os.path.join(directory, entry)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                         | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue  # gone meanwhile, a symlink, unreadable: not ours to judge
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a save in progress holds it
            unmodified = time.time() - os.fstat(fd).st_mtime
            # Still that file under that name, and long unwritten: no writer left.
            if unmodified > limit and _same_file(fd, full):
                os.unlink(full)
                removed.append(entry)
        except OSError as exc:
            log.debug("could not sweep %s: %s", full, exc)
        finally:
            os.close(fd)  # releases the lock
    if removed:
        log.info("removed %d temp file(s) left beside %s by an interrupted save: %s",
                 len(removed), path, ", ".join(removed))
    return removed


def fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem allows it
        fd = os.open(directory or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
