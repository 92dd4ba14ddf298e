"""What both integrations share: which Checkpoint to use, and the mirrors that upload a
directory in the background without ever making the training loop wait for an upload: one
rank's directory (:class:`DirectoryMirror`, a single process or replicated state), or every
rank's share through the collective save (:class:`CollectiveMirror`, sharded state)."""

from __future__ import annotations

import pathlib
import stat
from concurrent.futures import Future
from typing import Any, Protocol

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


class Agrees(Protocol):
    """What :class:`CollectiveMirror` asks of the ranks (``_ranks.Agreement``): whether no
    rank has a save in flight (the same answer on every rank)."""

    def decide(self, busy: bool) -> bool: ...


class CollectiveMirror:
    """:class:`DirectoryMirror` for state that every rank holds a share of: each save is a
    collective save of every rank's directory (one object, the union of their trees).

    The framework saves on every rank at the same step, so :meth:`note_save` is called alike
    on every rank, and so is :meth:`offer` (at the same boundaries): whether a save is
    waiting is the same everywhere, and only then do the ranks agree, through ``agreement``,
    on whether every rank's previous save has ended. A save starts on all ranks or on none,
    and the loop never waits for an upload.

    Ranks that offer the same directory (one node's ranks sharing one directory) all pass
    it: the collective helper freezes and contributes it once, from the first of them.

    Args:
        distributed: the collective helper (``DistributedCheckpoint``): ``save_sync(dir,
            wait=False)`` on every rank, returning a Future on every rank.
        agreement: decides, alike on every rank, whether no rank has a save in flight.
    """

    def __init__(self, distributed: Any, agreement: Agrees) -> None:
        self.distributed = distributed
        self.agreement = agreement
        self._in_flight: Future[None] | None = None
        self._offered: pathlib.Path | None = None
        self._waiting = False  # a save noted (on every rank alike) and not started yet
        self.saves = 0

    def note_save(self) -> None:
        """Say that the framework saved (on every rank): the next :meth:`offer` starts a
        collective save as soon as no rank has one in flight."""
        self._waiting = True

    def offer(self, directory: pathlib.Path | str | None) -> bool:
        """On every rank: start the collective save of this rank's ``directory`` (``None``
        or absent: nothing from this rank) if a save is waiting and no rank has one in
        flight. Returns whether one started (the same on every rank)."""
        if directory is not None:
            self._offered = pathlib.Path(directory)
        if not self._waiting:
            return False
        busy = self._in_flight is not None and not self._in_flight.done()
        share = self._offered if self._offered is not None and self._offered.exists() else None
        if not self.agreement.decide(busy):
            return False
        self._wait()  # ended on every rank: a failure (every rank's) surfaces here, alike
        self._waiting = False
        self._in_flight = self.distributed.save_sync(share, wait=False)
        self.saves += 1
        return True

    def finish(self, directory: pathlib.Path | str | None) -> None:
        """On every rank: wait for the save in flight, save what is waiting, wait for that."""
        self._wait()
        self.offer(directory)
        self._wait()

    def flush(self) -> None:
        """:meth:`finish` for the directory last offered (a collective)."""
        self.finish(self._offered)

    def settle(self) -> None:
        """Wait for this rank's save in flight, starting none (no collective of the
        callbacks: for an attempt that is ending on one rank's exception)."""
        self._wait()

    def _wait(self) -> None:
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
