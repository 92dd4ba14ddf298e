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

Under several ranks (torchrun, ``ClusteredTaskEnvironment``, the Elastic plugin), the
callback finds the setup itself, the same code on every rank:

- replicated state (``strategy="ddp"`` and the like): rank 0 uploads, as above, and the
  other ranks upload nothing; ``resume_path()`` is a collective: one rank per node downloads,
  and every rank gets the same path.
- sharded state (``FSDPStrategy(state_dict_type="sharded")``, ``ModelParallelStrategy``,
  ``DeepSpeedStrategy``: every rank writes its own shard files): every rank contributes the
  ``ModelCheckpoint`` directory through the collective save, which stores one object holding
  the union of the ranks' trees; the ranks agree, through a gloo group of the callback's
  own, on when a save starts, so they always start the same one.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

from .._checkpoint import Checkpoint
from .._latest import latest_checkpoint
from ._mirror import CollectiveMirror, DirectoryMirror, task_checkpoint
from ._ranks import Agreement, distributed_checkpoint, timeout_of, world

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

#: Strategies whose every rank writes shard files of its own into the checkpoint.
_SHARDING = {"FSDPStrategy", "ModelParallelStrategy", "DeepSpeedStrategy"}


def sharded_strategy(strategy: Any) -> bool:
    """Whether ``strategy`` writes a checkpoint that every rank holds a share of: FSDP with
    ``state_dict_type="sharded"``, model parallelism with distributed checkpoints (its
    default), DeepSpeed. Matched by class name, for ``lightning`` and ``pytorch_lightning``
    alike."""
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if "FSDPStrategy" in names:
        return getattr(strategy, "_state_dict_type", "full") == "sharded"
    if "ModelParallelStrategy" in names:
        return bool(getattr(strategy, "_save_distributed_checkpoint", True))
    return bool(names & _SHARDING)


def _sharded_directory(path: pathlib.Path) -> bool:
    """A checkpoint a sharded strategy saved: a directory holding Lightning's ``meta.pt``."""
    return path.is_dir() and (path / "meta.pt").is_file()


def newest_checkpoint(root: pathlib.Path, pattern: str) -> pathlib.Path | None:
    """The newest checkpoint matching ``pattern``: a file, or a sharded checkpoint's
    directory (dated by its ``meta.pt``); ties broken by path."""
    found = latest_checkpoint(root, pattern)
    shards = [p for p in root.glob(pattern) if _sharded_directory(p)]
    dated = [(p.stat().st_mtime_ns, str(p), p) for p in ([found] if found else [])]
    dated += [((p / "meta.pt").stat().st_mtime_ns, str(p), p) for p in shards]
    return max(dated)[2] if dated else None


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
        self._timeout = timeout_of(self.checkpoint)
        self._distributed: Any = None  # the collective helper, made at first collective use
        self._collective: CollectiveMirror | None = None  # sharded strategies, from setup()

    def resume_path(self, pattern: str = "**/last.ckpt") -> str | None:
        """Restore the previous attempt's checkpoint; the path for
        ``Trainer.fit(ckpt_path=...)``: the newest checkpoint matching ``pattern`` (else the
        newest ``*.ckpt``; a file, or a sharded checkpoint's directory), or ``None`` on the
        first attempt.

        Under several ranks this is a collective (call it on every rank): one rank per node
        downloads, and every rank gets the same answer. Called before ``fit`` (which is
        where Lightning starts the process group), it starts the default group from the
        launcher's environment, as Lightning would; the strategy then uses that group.
        """
        _, size = world(start=True, timeout=self._timeout)
        restored = (self._collective_helper().load_sync() if size > 1
                    else self.checkpoint.load_sync())
        if restored is None:
            return None
        restored = pathlib.Path(restored)
        found = newest_checkpoint(restored, pattern) or newest_checkpoint(restored, "**/*.ckpt")
        return str(found) if found is not None else None

    @property
    def uploads(self) -> int:
        """How many background saves this callback has started (on this rank)."""
        return self._collective.saves if self._collective else self._mirror.saves

    def _collective_helper(self) -> Any:
        if self._distributed is None:
            self._distributed = distributed_checkpoint(self.checkpoint, self._timeout)
        return self._distributed

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Where the process group exists: with a sharded strategy on several ranks, save
        every rank's share through the collective save from now on."""
        if self._collective is not None or world()[1] == 1:
            return
        if sharded_strategy(trainer.strategy):
            helper = self._collective_helper()
            self._collective = CollectiveMirror(
                helper, Agreement(self.checkpoint.remote_destination, self._timeout))
            saver = getattr(trainer, "checkpoint_callback", None)
            if getattr(saver, "save_last", None) is True and trainer.is_global_zero:
                # DCP writes shard files in place: a last.ckpt/ rewritten while its previous
                # upload runs fails that upload (caught, never published torn).
                logger.warning(
                    "flyte-checkpoint: ModelCheckpoint(save_last=True) rewrites the shard files"
                    " of last.ckpt in place under %s; a save while the previous upload runs"
                    " then fails that upload. Use ModelCheckpoint(save_last=\"link\"): each"
                    " save in a directory of its own, last.ckpt a link to the newest",
                    type(trainer.strategy).__name__)

    def flush(self) -> None:
        """Wait until the newest checkpoint seen so far is the remote checkpoint, uploading it
        now if it was waiting for an earlier upload; raises a failed upload's error.

        For an attempt that must end soon (a preemption notice, say): the next attempt then
        resumes from the newest save instead of an older one. Under a sharded strategy this
        is a collective: call it on every rank.
        """
        if self._collective is not None:
            self._collective.flush()
        else:
            self._mirror.flush()

    def _directory(self, trainer: Any) -> pathlib.Path | None:
        if self.dirpath is not None:
            return self.dirpath
        saver = getattr(trainer, "checkpoint_callback", None)
        found = getattr(saver, "dirpath", None)
        return pathlib.Path(found) if found else None

    def _offer(self, trainer: Any) -> None:
        if self._collective is not None:  # every rank, at the same boundary
            self._collective.offer(self._directory(trainer))
        elif trainer.is_global_zero:
            self._mirror.offer(self._directory(trainer))

    def on_save_checkpoint(self, trainer: Any, *args: Any) -> None:
        # Called while the checkpoint is assembled, before its file is written: the upload
        # starts at the next boundary, and is not skipped for a look-alike fingerprint.
        # Every rank assembles it (a sharded save is a collective), so every rank notes it.
        (self._collective or self._mirror).note_save()

    def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
        self._offer(trainer)

    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        self._offer(trainer)

    def on_validation_start(self, trainer: Any, *args: Any) -> None:
        self._offer(trainer)

    def on_train_end(self, trainer: Any, *args: Any) -> None:
        if self._collective is not None:
            self._collective.finish(self._directory(trainer))
        elif trainer.is_global_zero:
            self._mirror.finish(self._directory(trainer))

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """The attempt is ending (an error, Ctrl-C, or SIGTERM, which Lightning raises in the
        loop): upload the newest checkpoint first, so the retry resumes from it rather than
        from the one before. A failed upload is logged, not raised: it must not hide the
        exception that ended training.

        Under a sharded strategy no new save starts here (the other ranks may be anywhere, or
        gone): this rank waits for its save in flight, which is bounded by the checkpoint's
        distributed timeout."""
        if self._collective is None and not trainer.is_global_zero:
            return
        try:
            if self._collective is not None:
                self._collective.settle()
            else:
                self._mirror.flush()
        except Exception as failure:
            logger.error("flyte-checkpoint: the newest checkpoint was not uploaded while"
                         " training stopped on %s: %s", type(exception).__name__, failure)
