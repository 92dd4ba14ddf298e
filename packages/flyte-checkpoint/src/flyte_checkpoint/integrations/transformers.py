"""Hugging Face Transformers: mirror each ``checkpoint-N`` that ``Trainer`` writes to the
task's checkpoint, in the background, and resume the next attempt from it.

.. code-block:: python

    from flyte_checkpoint.integrations.transformers import FlyteCheckpointCallback

    mirror = FlyteCheckpointCallback()  # flyte.ctx().checkpoint, or from the environment
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[mirror])
    trainer.train(resume_from_checkpoint=mirror.resume_path())

``Trainer`` writes every checkpoint to a new ``checkpoint-N`` directory and deletes old ones
(``save_total_limit``); the hard-link snapshot of a background save keeps the files it holds
even when they are deleted, so the loop waits only for the snapshot.

Under several ranks (torchrun, ``ClusteredTaskEnvironment``, the Elastic plugin), every
rank contributes its ``checkpoint-N`` through the collective save, which stores one object
holding the union of the ranks' trees, and ``resume_path()`` is a collective: one rank per
node downloads, and every rank gets the same directory. Every rank, because ``Trainer``'s
checkpoint is never rank 0's alone: even under DDP each rank writes its own
``rng_state_<rank>.pth`` (into its own ``output_dir``, on its own node), and with sharded
state (Accelerate FSDP with ``SHARDED_STATE_DICT``, DeepSpeed) each writes its shard files.
Ranks that share one directory contribute the same files, which the object holds once.
"""

from __future__ import annotations

import pathlib
from typing import Any

from .._checkpoint import Checkpoint
from ._mirror import CollectiveMirror, DirectoryMirror, task_checkpoint
from ._ranks import Agreement, distributed_checkpoint, timeout_of, world

try:
    from transformers import TrainerCallback
except ImportError as missing:
    raise ImportError("flyte_checkpoint.integrations.transformers needs Hugging Face"
                      " Transformers: pip install transformers") from missing

__all__ = ["FlyteCheckpointCallback"]

_STATE = "trainer_state.json"


class FlyteCheckpointCallback(TrainerCallback):
    """Upload the newest ``checkpoint-N`` directory after each save, without blocking training.

    Args:
        checkpoint: the Flyte checkpoint; default: the running task's
            ``flyte.ctx().checkpoint`` (after :func:`flyte_checkpoint.install`), else
            :meth:`Checkpoint.from_env`.

    The object holds one ``checkpoint-N`` directory's contents: the newest one whose upload
    could start. While an upload runs, newer saves wait and only the newest is uploaded
    after it. When training ends, the callback waits for the last upload. A failed upload
    raises :class:`CheckpointSaveError` at the next step.
    """

    def __init__(self, checkpoint: Checkpoint | None = None) -> None:
        self.checkpoint = task_checkpoint(checkpoint)
        self._mirror = DirectoryMirror(self.checkpoint)
        self._newest: pathlib.Path | None = None
        self._timeout = timeout_of(self.checkpoint)
        self._distributed: Any = None  # the collective helper, made at first collective use
        self._collective: CollectiveMirror | None = None  # several ranks, from on_train_begin

    def resume_path(self) -> str | None:
        """Restore the previous attempt's checkpoint; the directory for
        ``trainer.train(resume_from_checkpoint=...)``, or ``None`` on the first attempt.

        Under several ranks this is a collective (call it on every rank): one rank per node
        downloads, and every rank gets the same directory. ``TrainingArguments`` starts the
        process group; made before this call, its settings (``ddp_timeout``, the backend)
        are the group's, else this starts it from the launcher's environment.
        """
        _, size = world(start=True, timeout=self._timeout)
        restored = (self._collective_helper().load_sync() if size > 1
                    else self.checkpoint.load_sync())
        if restored is None:
            return None
        restored = pathlib.Path(restored)
        if not (restored / _STATE).is_file():
            raise ValueError(f"the checkpoint restored at {restored} holds no {_STATE}: it was"
                             " not saved from a Trainer checkpoint-N directory")
        return str(restored)

    @property
    def uploads(self) -> int:
        """How many background saves this callback has started (on this rank)."""
        return self._collective.saves if self._collective else self._mirror.saves

    def _collective_helper(self) -> Any:
        if self._distributed is None:
            self._distributed = distributed_checkpoint(self.checkpoint, self._timeout)
        return self._distributed

    def flush(self) -> None:
        """Wait until the newest checkpoint seen so far is the remote checkpoint, uploading it
        now if it was waiting for an earlier upload; raises a failed upload's error.

        For an attempt that must end soon (a preemption notice, say): the next attempt then
        resumes from the newest save instead of an older one. Under several ranks this is a
        collective: call it on every rank.
        """
        if self._collective is not None:
            self._collective.flush()
        else:
            self._mirror.flush()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Every rank, with the process group started: the groups of our own are made here.
        if self._collective is not None or world()[1] == 1:
            return
        self._collective = CollectiveMirror(
            self._collective_helper(),
            Agreement(self.checkpoint.remote_destination, self._timeout))

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._newest = pathlib.Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self._collective is not None:
            # Every rank: the offer's agreement is also what waits until every rank has
            # written its share (nothing in Trainer waits after rng_state_<rank>.pth).
            self._collective.note_save()
            self._collective.offer(self._newest)
        elif state.is_world_process_zero:
            self._mirror.note_save()
            self._offer()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._collective is not None:
            self._collective.offer(self._newest)
        elif state.is_world_process_zero:
            self._offer()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._collective is not None:
            self._collective.finish(self._final(pathlib.Path(args.output_dir)))
        elif state.is_world_process_zero:
            self._mirror.finish(self._final(pathlib.Path(args.output_dir)))

    def _final(self, output_dir: pathlib.Path) -> pathlib.Path | None:
        """The newest checkpoint still there: with ``save_total_limit=1`` and
        ``load_best_model_at_end`` Trainer may have deleted the last one it wrote."""
        if self._newest is not None and self._newest.exists():
            return self._newest
        steps = [(int(p.name.rsplit("-", 1)[1]), p) for p in output_dir.glob("checkpoint-*")
                 if p.name.rsplit("-", 1)[1].isdigit() and (p / _STATE).is_file()]
        return max(steps)[1] if steps else None

    def _offer(self) -> None:
        if self._newest is not None and self._newest.exists():
            self._mirror.offer(self._newest)
