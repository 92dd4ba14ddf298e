"""A file-tree walk that never recurses on depth: a legal tree may be thousands of levels
deep, and Python's recursion limit (``os.walk`` recurses up to 3.11) must not decide whether a
snapshot can be taken. Removal is :func:`checkpoint_format.remove_tree`, iterative too.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator

__all__ = ["walk_tree"]

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
