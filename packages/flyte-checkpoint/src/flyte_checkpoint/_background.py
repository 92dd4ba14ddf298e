"""Background saves: the upload of a frozen snapshot on a thread of its own, at a lower CPU
priority, joined at interpreter exit so that a process that returns from its training loop
still publishes its last checkpoint."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future

from checkpoint_io import io_loop

from ._errors import CheckpointSaveError, save_error
from ._snapshot import Snapshot

__all__ = ["BACKGROUND_NICENESS", "Background"]

logger = logging.getLogger("flyte_checkpoint")

#: Niceness of the threads that upload in the background (and of the compression and hashing
#: threads they start, which inherit it): under CPU contention the training loop goes first.
BACKGROUND_NICENESS = 10


class Background:
    """One background save of ``snapshot`` to ``dest``: ``upload(snapshot)`` runs on a thread
    of its own; a failure is logged, handed to ``failed`` and set on :attr:`future`.

    The thread is not a daemon, and at interpreter exit :func:`_wait_at_exit` joins it before
    the thread pools that the upload uses are shut down.
    """

    def __init__(self, dest: str, snapshot: Snapshot, upload: Callable[[Snapshot], None],
                 failed: Callable[[CheckpointSaveError], None]) -> None:
        self.dest = dest
        self.snapshot = snapshot
        self._upload = upload
        self._failed = failed
        self.future: Future[None] = Future()
        self.future.set_running_or_notify_cancel()
        self.thread = threading.Thread(target=self._run, name="flyte-checkpoint-save")
        # Set once the outcome is known and the snapshot gone, before the future's
        # done-callbacks run (which may save again, and wait for this).
        self.finished = threading.Event()

    def start(self) -> None:
        _register_exit_wait()
        with _pending_lock:
            _pending_saves.add(self)
        self.thread.start()

    def join(self) -> None:
        self.finished.wait()

    def _run(self) -> None:
        io_loop()  # started (if not yet) at normal priority: it serves foreground I/O too
        _give_way()
        error: CheckpointSaveError | None = None
        try:
            self._upload(self.snapshot)
        except BaseException as exc:
            error = exc if isinstance(exc, CheckpointSaveError) else save_error(self.dest, exc)
            if error is not exc:
                error.__cause__ = exc
            logger.error("checkpoint save: background save failed: %s", error)
            self._failed(error)
        finally:
            # Gone before the future completes: whoever waits on it finds no snapshot left.
            self.snapshot.cleanup()
            with _pending_lock:
                _pending_saves.discard(self)
            self.finished.set()
        if error is None:
            self.future.set_result(None)
        else:
            self.future.set_exception(error)


def _give_way() -> None:
    """Lower this thread's CPU priority (Linux: niceness is per thread); best effort."""
    with contextlib.suppress(AttributeError, OSError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid),
                                                 BACKGROUND_NICENESS))


_pending_lock = threading.Lock()
_pending_saves: weakref.WeakSet[Background] = weakref.WeakSet()
_exit_wait_registered = False


def _register_exit_wait() -> None:
    """Wait for background saves at exit, before ``concurrent.futures`` stops its pools:
    ``threading._register_atexit`` callbacks run last-registered first, and this one is
    registered after the writer's thread pool module was imported."""
    global _exit_wait_registered
    with _pending_lock:
        if _exit_wait_registered:
            return
        _exit_wait_registered = True
    register = getattr(threading, "_register_atexit", None)
    # RuntimeError: already shutting down; the non-daemon thread is joined anyway.
    with contextlib.suppress(RuntimeError):
        (register or atexit.register)(_wait_at_exit)


def _wait_at_exit() -> None:
    with _pending_lock:
        pending = [p for p in _pending_saves if not p.future.done()]
    for background in pending:
        logger.warning("checkpoint save: waiting at exit for the background save to %s",
                       background.dest)
        background.join()
        background.thread.join()
