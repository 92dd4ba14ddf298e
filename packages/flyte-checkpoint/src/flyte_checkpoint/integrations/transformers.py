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

Under several ranks (torchrun, ``ClusteredTaskEnvironment``, the Elastic plugin), the
callback finds the setup itself, the same code on every rank:

- replicated state (DDP, FSDP with ``FULL_STATE_DICT``): rank 0 uploads, once every rank has
  written its share of ``checkpoint-N`` (``Trainer`` writes an ``rng_state_<rank>.pth`` per
  rank); ``resume_path()`` is a collective: one rank per node downloads, and every rank gets
  the same directory.
- sharded state (Accelerate FSDP with ``SHARDED_STATE_DICT``, DeepSpeed): every rank
  contributes its ``checkpoint-N`` through the collective save, which stores one object
  holding the union of the ranks' trees.
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


def sharded_state(args: Any) -> bool:
    """Whether ``Trainer`` with ``args`` saves a checkpoint that every rank holds a share of:
    DeepSpeed, or FSDP whose state dict type (Accelerate's plugin, else ``fsdp_config``) is
    ``SHARDED_STATE_DICT``."""
    if getattr(args, "deepspeed", None):
        return True
    if not getattr(args, "fsdp", None):
        return False
    kind = _accelerate_state_dict_type()
    if kind is None:
        config = getattr(args, "fsdp_config", None) or {}
        kind = config.get("state_dict_type") or config.get("fsdp_state_dict_type")
    return "SHARDED_STATE_DICT" in str(kind).upper()


def _accelerate_state_dict_type() -> Any:
    """The FSDP plugin's state dict type of Accelerate's started state, else ``None``."""
    try:
        from accelerate.state import AcceleratorState
    except ImportError:
        return None
    if not AcceleratorState._shared_state:  # not started: constructing it would start it
        return None
    return getattr(getattr(AcceleratorState(), "fsdp_plugin", None), "state_dict_type", None)


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
        self._agreement: Agreement | None = None  # several ranks, from on_train_begin
        self._collective: CollectiveMirror | None = None  # sharded state

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
        resumes from the newest save instead of an older one. With sharded state this is a
        collective: call it on every rank.
        """
        if self._collective is not None:
            self._collective.flush()
        else:
            self._mirror.flush()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Every rank, with the process group started: the groups of our own are made here.
        if self._agreement is not None or world()[1] == 1:
            return
        if sharded_state(args):
            helper = self._collective_helper()
            self._agreement = Agreement(self.checkpoint.remote_destination, self._timeout)
            self._collective = CollectiveMirror(helper, self._agreement)
        else:
            self._agreement = Agreement(self.checkpoint.remote_destination, self._timeout)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._newest = pathlib.Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self._collective is not None:  # every rank; the offer's agreement waits for all
            self._collective.note_save()
            self._collective.offer(self._newest)
            return
        if self._agreement is not None:
            # Each rank writes its own rng_state_<rank>.pth, and nothing waits after it:
            # rank 0 snapshots checkpoint-N once every rank is done writing.
            self._agreement.barrier()
        if state.is_world_process_zero:
            self._mirror.note_save()
            self._offer()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._collective is not None:
            self._collective.offer(self._newest)
        elif state.is_world_process_zero:
            self._offer()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._collective is not None:
            self._collective.finish(self._newest)
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
