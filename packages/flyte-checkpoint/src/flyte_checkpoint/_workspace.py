"""Local workspaces: where loads restore, living until their Checkpoint is closed or the
process exits.

A path returned by ``load`` must outlive the Checkpoint object that returned it, so the
cleanup is tied to ``close()`` and interpreter exit, never to garbage collection.
"""

from __future__ import annotations

import atexit
import logging
import pathlib
import tempfile
import threading

from checkpoint_format import remove_tree

__all__ = ["clear", "workspaces"]

logger = logging.getLogger("flyte_checkpoint")


class _Workspaces:
    def __init__(self) -> None:
        self._open: set[str] = set()
        self._lock = threading.Lock()
        atexit.register(self.close_all)

    def create(self) -> pathlib.Path:
        root = tempfile.mkdtemp(prefix="flyte-checkpoint-")
        with self._lock:
            self._open.add(root)
        return pathlib.Path(root)

    def remove(self, root: pathlib.Path) -> None:
        with self._lock:
            self._open.discard(str(root))
        if not remove_tree(root):
            logger.warning("checkpoint: could not remove all of the workspace %s", root)

    def close_all(self) -> None:
        with self._lock:
            roots, self._open = list(self._open), set()
        for root in roots:
            remove_tree(root)


workspaces = _Workspaces()


def clear(directory: pathlib.Path) -> None:
    """Empty ``directory`` (a workspace's restore target), however deep its tree."""
    for child in directory.iterdir():
        if child.is_dir() and not child.is_symlink():
            remove_tree(child)
        else:
            child.unlink()
