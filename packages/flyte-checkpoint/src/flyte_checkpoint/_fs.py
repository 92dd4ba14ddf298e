"""File-tree helpers that never recurse on depth: a legal tree may be thousands of levels deep,
and Python's recursion limit (``shutil.rmtree`` up to 3.12, ``os.walk`` up to 3.11 are
recursive) must not decide whether a workspace or a snapshot can be removed or taken.

``remove_tree`` works from directory descriptors, one level at a time, so it needs neither
the recursion limit nor paths shorter than ``PATH_MAX``, and keeps two descriptors open
whatever the depth.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

__all__ = ["remove_tree", "walk_tree"]

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | (
    getattr(os, "O_CLOEXEC", 0))


def remove_tree(root: str | os.PathLike[str]) -> bool:
    """Remove ``root`` and everything under it, read-only directories included; a missing
    ``root`` is fine. Best effort: what cannot be removed stays, and the result says whether
    ``root`` is gone. Never raises ``OSError`` and never follows a symlink."""
    root = os.fspath(root)
    try:
        st = os.lstat(root)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(OSError):
            os.unlink(root)
        return not os.path.lexists(root)
    parent, name = os.path.split(os.path.abspath(root))
    try:
        parent_fd = os.open(parent, _DIR_FLAGS & ~getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False
    try:
        _empty_and_remove(parent_fd, name)
    finally:
        os.close(parent_fd)
    return not os.path.lexists(root)


def _empty_and_remove(top_fd: int, top_name: str) -> None:
    """Remove directory ``top_name`` of ``top_fd``: clear a level's non-directories, go down
    into its subdirectories one at a time, and come back up through ``..``, checked against
    the identity recorded on the way down (a directory moved meanwhile is left alone rather
    than the wrong one emptied)."""
    fd = _open_dir(top_fd, top_name)
    if fd is None:
        return
    # One entry per level on the way down: (name in its parent, the parent's identity, the
    # subdirectories of this level still to remove).
    stack: list[tuple[str, tuple[int, int], list[str]]] = []
    subdirs = _clear_files(fd)
    try:
        while True:
            if subdirs:
                child = subdirs.pop()
                child_fd = _open_dir(fd, child)
                if child_fd is None:  # gone, or cannot be entered: try it empty, go on
                    _remove_dir_entry(fd, child)
                    continue
                here = os.fstat(fd)
                stack.append((child, (here.st_dev, here.st_ino), subdirs))
                os.close(fd)
                fd = child_fd
                subdirs = _clear_files(fd)
                continue
            if not stack:
                break
            name, identity, subdirs = stack.pop()
            up = os.open("..", _DIR_FLAGS & ~getattr(os, "O_NOFOLLOW", 0), dir_fd=fd)
            os.close(fd)
            fd = up
            upst = os.fstat(fd)
            if (upst.st_dev, upst.st_ino) != identity:
                return  # moved while we worked in it: leave the rest
            _remove_dir_entry(fd, name)  # what cannot be removed stays; siblings go on
    except OSError:
        return
    finally:
        os.close(fd)
    _remove_dir_entry(top_fd, top_name)


def _clear_files(fd: int) -> list[str]:
    """Unlink every non-directory in the directory ``fd``; return its subdirectories."""
    try:
        with os.scandir(fd) as entries:
            names = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    except OSError:
        return []
    subdirs = []
    for name, is_dir in names:
        if is_dir:
            subdirs.append(name)
        else:
            _unlink(fd, name)
    return subdirs


def _remove_dir_entry(fd: int, name: str) -> None:
    try:
        os.rmdir(name, dir_fd=fd)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):  # a read-only parent
            _make_writable(fd)
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=fd)


def _unlink(fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            _make_writable(fd)
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=fd)


def _open_dir(parent_fd: int, name: str) -> int | None:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM):
            return None
    with contextlib.suppress(OSError):  # a directory restored without r or x for its owner
        st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        if stat.S_ISDIR(st.st_mode):
            os.chmod(name, stat.S_IMODE(st.st_mode) | 0o700, dir_fd=parent_fd)
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    return None


def _make_writable(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | 0o700)


def walk_tree(root: str | os.PathLike[str], skip_dir: str | None = None, *,
              vanished_ok: bool = False) -> Iterator[tuple[str, str, os.stat_result]]:
    """Everything under ``root``, depth-first, pre-order, siblings in byte order, from an
    explicit stack: ``(relative path, path, lstat)``. Symlinks are reported, never followed.
    Directories whose name starts with ``skip_dir`` are neither reported nor entered.
    Errors (``OSError``) propagate, except, with ``vanished_ok``, for entries removed while
    the walk runs (and a missing ``root``), which are left out."""
    stack = [iter(_level(os.fspath(root), "", skip_dir, vanished_ok))]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
            continue
        yield item
        name, path, st = item
        if stat.S_ISDIR(st.st_mode):
            stack.append(iter(_level(path, name + "/", skip_dir, vanished_ok)))


def _level(directory: str, prefix: str, skip_dir: str | None,
           vanished_ok: bool) -> list[tuple[str, str, os.stat_result]]:
    try:
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=lambda entry: os.fsencode(entry.name))
    except (FileNotFoundError, NotADirectoryError):
        if vanished_ok:
            return []
        raise
    level = []
    for entry in entries:
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            if vanished_ok:
                continue
            raise
        if skip_dir and stat.S_ISDIR(st.st_mode) and entry.name.startswith(skip_dir):
            continue
        level.append((prefix + entry.name, entry.path, st))
    return level
