"""Local file-system steps shared by the local backend and downloads to local files: hidden
temp siblings that a lock marks as being written, the sweep of those a killed save left,
positional writes, the fsync of a directory. Below both ``_local`` and ``_stream``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import secrets
import stat

__all__ = ["fsync_dir", "open_temp_sibling", "pwrite_all", "sweep_partials"]

log = logging.getLogger("checkpoint_io")

_PARTIAL = ".partial-"
_PARTIAL_TAIL = re.compile(r"[0-9a-f]{12}")


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
    lock; the name is then checked to still be ours, and a new one is made if not.
    """
    while True:
        temp = _temp_sibling(path)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     0o666)
        try:
            # Blocking: a sweep holds a lock only for the time of one unlink.
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, temp):
                return temp, fd
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        os.close(fd)  # swept before we held it: that name is gone, make another


def sweep_partials(path: str) -> list[str]:
    """Remove the temp siblings of ``path`` (``.<name>.partial-<12 hex>``) that no process
    is writing: what a save killed mid-write (SIGKILL, OOM, a lost node) left behind.

    A writer holds an ``flock`` on its temp file until it is renamed or removed (see
    :func:`open_temp_sibling`), so a file that can be locked here has no writer; one that
    cannot is a live save, in this process or another, and is left alone. Best effort:
    what cannot be examined or removed stays. Returns the names removed.
    """
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
            if _same_file(fd, full):  # still that file under that name: no writer left
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
