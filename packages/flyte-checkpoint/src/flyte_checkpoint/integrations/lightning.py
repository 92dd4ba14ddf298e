"""PyTorch Lightning: mirror what ``ModelCheckpoint`` writes to the task's checkpoint, in the
background, and resume the next attempt from it.

.. code-block:: python

    from flyte_checkpoint.integrations.lightning import FlyteCheckpointCallback

    mirror = FlyteCheckpointCallback()  # flyte.ctx().checkpoint, or from the environment
    trainer = L.Trainer(callbacks=[ModelCheckpoint(dirpath="ckpts", save_last=True), mirror])
    trainer.fit(model, data, ckpt_path=mirror.resume_path())

A callback, because that is how Lightning users add behaviour to ``Trainer``; it leaves the
``CheckpointIO`` plugin free for whatever the user already runs. ``ModelCheckpoint`` writes
its files atomically (a temporary file renamed into place), so the hard-link snapshot of a
background save never sees a half-written file, and the loop waits only for that snapshot.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

from .._checkpoint import Checkpoint
from .._latest import latest_checkpoint
from ._mirror import DirectoryMirror, task_checkpoint

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    try:
        from pytorch_lightning import Callback
    except ImportError as missing:
        raise ImportError(
            "flyte_checkpoint.integrations.lightning needs PyTorch Lightning:"
            " pip install lightning (or pytorch-lightning)") from missing

__all__ = ["FlyteCheckpointCallback"]

logger = logging.getLogger("flyte_checkpoint")


class FlyteCheckpointCallback(Callback):
    """Upload the ``ModelCheckpoint`` directory after each save, without blocking training.

    Args:
        checkpoint: the Flyte checkpoint; default: the running task's
            ``flyte.ctx().checkpoint`` (after :func:`flyte_checkpoint.install`), else
            :meth:`Checkpoint.from_env`.
        dirpath: the directory to mirror; default: the trainer's ``ModelCheckpoint.dirpath``.

    Saves are noticed at the next batch or epoch boundary (``ModelCheckpoint`` runs after
    every other callback) and uploaded in the background, one at a time: while one upload
    runs, newer saves wait for it to end and only the newest is uploaded. When training
    ends, the callback waits for the last upload, so a finished task has published its
    final checkpoint; when it stops on an exception (SIGTERM included), it uploads the
    newest checkpoint before the exception goes on. A failed upload raises
    :class:`CheckpointSaveError` at the next boundary.
    """

    def __init__(self, checkpoint: Checkpoint | None = None, *,
                 dirpath: str | pathlib.Path | None = None) -> None:
        super().__init__()
        self.checkpoint = task_checkpoint(checkpoint)
        self.dirpath = pathlib.Path(dirpath) if dirpath is not None else None
        self._mirror = DirectoryMirror(self.checkpoint)

    def resume_path(self, pattern: str = "**/last.ckpt") -> str | None:
        """Restore the previous attempt's checkpoint; the path for
        ``Trainer.fit(ckpt_path=...)``: the newest file matching ``pattern`` (else the
        newest ``*.ckpt``), or ``None`` on the first attempt."""
        restored = self.checkpoint.load_sync()
        if restored is None:
            return None
        found = latest_checkpoint(restored, pattern) or latest_checkpoint(restored, "**/*.ckpt")
        return str(found) if found is not None else None

    @property
    def uploads(self) -> int:
        """How many background saves this callback has started."""
        return self._mirror.saves

    def flush(self) -> None:
        """Wait until the newest checkpoint seen so far is the remote checkpoint, uploading it
        now if it was waiting for an earlier upload; raises a failed upload's error.

        For an attempt that must end soon (a preemption notice, say): the next attempt then
        resumes from the newest save instead of an older one.
        """
        self._mirror.flush()

    def _directory(self, trainer: Any) -> pathlib.Path | None:
        if self.dirpath is not None:
            return self.dirpath
        saver = getattr(trainer, "checkpoint_callback", None)
        found = getattr(saver, "dirpath", None)
        return pathlib.Path(found) if found else None

    def _offer(self, trainer: Any) -> None:
        if trainer.is_global_zero:
            self._mirror.offer(self._directory(trainer))

    def on_save_checkpoint(self, trainer: Any, *args: Any) -> None:
        # Called while the checkpoint is assembled, before its file is written: the upload
        # starts at the next boundary, and is not skipped for a look-alike fingerprint.
        self._mirror.note_save()

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self._offer(trainer)

    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        self._offer(trainer)

    def on_validation_start(self, trainer: Any, *args: Any) -> None:
        self._offer(trainer)

    def on_train_end(self, trainer: Any, *args: Any) -> None:
        if trainer.is_global_zero:
            self._mirror.finish(self._directory(trainer))

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """The attempt is ending (an error, Ctrl-C, or SIGTERM, which Lightning raises in the
        loop): upload the newest checkpoint first, so the retry resumes from it rather than
        from the one before. A failed upload is logged, not raised: it must not hide the
        exception that ended training."""
        if not trainer.is_global_zero:
            return
        try:
            self._mirror.flush()
        except Exception as failure:
            logger.error("flyte-checkpoint: the newest checkpoint was not uploaded while"
                         " training stopped on %s: %s", type(exception).__name__, failure)
