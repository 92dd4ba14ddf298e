"""What both integrations share: which Checkpoint to use, and a mirror that uploads a
directory in the background without ever making the training loop wait for an upload."""

from __future__ import annotations

import pathlib
import stat
from concurrent.futures import Future

from .._checkpoint import Checkpoint
from .._fs import walk_tree


def task_checkpoint(checkpoint: Checkpoint | None = None) -> Checkpoint:
    """``checkpoint`` if given; else the running Flyte task's ``flyte.ctx().checkpoint``
    (with :func:`flyte_checkpoint.install` in effect); else one from the environment that
    ``flyte-checkpoint run`` sets (:meth:`Checkpoint.from_env`)."""
    if checkpoint is not None:
        return checkpoint
    try:
        import flyte

        context = flyte.ctx() if callable(getattr(flyte, "ctx", None)) else None
    except ImportError:
        context = None
    served = getattr(context, "checkpoint", None) if context else None
    if served is not None:
        if not isinstance(served, Checkpoint):
            raise TypeError(
                "flyte.ctx().checkpoint is the upstream SDK's helper; call"
                " flyte_checkpoint.install() at import of your task module first")
        return served
    return Checkpoint.from_env()


class DirectoryMirror:
    """Uploads the newest state of one directory, one upload at a time, in the background.

    :meth:`offer` is cheap (one directory scan) and never waits for an upload: when one is in
    flight, the change is remembered and uploaded by a later ``offer`` or by :meth:`finish`.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self._in_flight: Future[None] | None = None
        self._uploaded: dict[pathlib.Path, tuple] = {}
        self._offered: pathlib.Path | None = None
        self._saved_since = False  # note_save() since the last upload started
        self.saves = 0

    def note_save(self) -> None:
        """Say that the framework saved: the next :meth:`offer` uploads even when the
        directory's fingerprint looks unchanged.

        A fingerprint can miss a save. A file replaced by rename gets a new inode, but once
        the last upload's snapshot link is gone the old inode's number is free for the next
        new file; where the kernel stamps file times once per clock tick, a same-size file
        written in the same tick as the one it replaces then matches in every field.
        """
        self._saved_since = True

    def offer(self, directory: pathlib.Path | str | None) -> bool:
        """Start a background save of ``directory`` if it changed since the last one and no
        upload is in flight. Returns whether one started."""
        if directory is None:
            return False
        directory = self._offered = pathlib.Path(directory)
        if self._in_flight is not None and not self._in_flight.done():
            return False
        self._wait()  # done: a failure surfaces here, in the training loop
        state = _fingerprint(directory)
        if not state or (state == self._uploaded.get(directory) and not self._saved_since):
            return False
        self._saved_since = False
        self._in_flight = self.checkpoint.save_sync(directory, wait=False)
        self._uploaded[directory] = state
        self.saves += 1
        return True

    def finish(self, directory: pathlib.Path | str | None) -> None:
        """Wait for the upload in flight, upload what changed since, and wait for that."""
        self._wait()
        self.offer(directory)
        self._wait()

    def flush(self) -> None:
        """:meth:`finish` for the directory last offered: when this returns, its newest state
        is the remote checkpoint (or the failure is raised)."""
        self.finish(self._offered)

    def _wait(self) -> None:
        """Wait for the upload in flight, if any; raise its failure."""
        future, self._in_flight = self._in_flight, None
        if future is not None:
            future.result()


def _fingerprint(directory: pathlib.Path) -> tuple:
    """Names, sizes, mtimes and inodes of everything but directories under ``directory``
    (empty if absent), from an explicit-stack walk: ``os.walk`` recurses up to Python 3.11,
    and a legal tree may be deeper than the recursion limit."""
    return tuple(
        (path, st.st_size, st.st_mtime_ns, st.st_ino)
        for _, path, st in walk_tree(directory, vanished_ok=True)
        if not stat.S_ISDIR(st.st_mode)
    )
