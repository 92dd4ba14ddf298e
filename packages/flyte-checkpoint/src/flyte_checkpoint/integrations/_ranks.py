"""Which rank this process is, and the few decisions every rank of a job must take alike.

Everything here goes through ``torch.distributed``, imported only when the job has imported
torch already (a framework callback's job has) or when a launcher announced several ranks: a
single-process job never pays for it and behaves exactly as before.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from .._checkpoint import Checkpoint
from .._errors import CheckpointSaveError

logger = logging.getLogger("flyte_checkpoint")

#: What ``init_process_group()`` reads from the environment besides ``WORLD_SIZE``.
_RENDEZVOUS = ("RANK", "MASTER_ADDR", "MASTER_PORT")

__all__ = ["Agreement", "distributed_checkpoint", "launched_size", "timeout_of", "world"]


def timeout_of(checkpoint: Checkpoint) -> float:
    """The bound of every collective for ``checkpoint``: its ``Settings.distributed_timeout``
    (``CHECKPOINT_DISTRIBUTED_TIMEOUT``)."""
    return float(checkpoint.settings.distributed_timeout)


def _distributed() -> Any | None:
    """``torch.distributed`` when torch is imported and built with it, else ``None``."""
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() else None


def launched_size(environ: Mapping[str, str] | None = None) -> int:
    """The world size a launcher announced (torchrun, the Elastic plugin, a JobSet's
    torchrun: ``WORLD_SIZE``); 1 when none did."""
    raw = (os.environ if environ is None else environ).get("WORLD_SIZE", "").strip()
    if not raw:
        return 1
    if not raw.isascii() or not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"WORLD_SIZE={raw!r} is not a whole number of ranks (set by the"
                         " launcher: torchrun or the task's plugin)")
    return int(raw)


def world(*, start: bool = False, timeout: float = 1800.0) -> tuple[int, int]:
    """``(rank, size)`` of the default process group; ``(0, 1)`` for a single process.

    With ``start``, when a launcher announced several ranks but nobody started the group yet
    (Lightning starts it only inside ``fit``), start it here from the launcher's environment,
    with torch's default backends (gloo for CPU tensors, NCCL for CUDA ones where CUDA is
    there): the frameworks' strategies then find it started and use it.
    """
    dist = _distributed()
    if dist is not None and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    size = launched_size()
    if size == 1:
        return 0, 1
    if not start:
        return int(os.environ.get("RANK", "0") or 0), size
    missing = [name for name in _RENDEZVOUS if not os.environ.get(name)]
    if missing:
        # Not torchrun's environment (Lightning's own launcher sets WORLD_SIZE alone, and
        # starts the group later): each process goes on as a single one, as before.
        logger.info("flyte-checkpoint: WORLD_SIZE=%d but no %s: not starting a process group;"
                    " this rank restores on its own", size, " or ".join(missing))
        return 0, 1
    if dist is None:
        try:
            import torch.distributed as dist
        except ImportError as missing:
            raise ImportError(f"WORLD_SIZE={size}: a job of several ranks needs torch"
                              " (pip install torch)") from missing
    dist.init_process_group(timeout=datetime.timedelta(seconds=timeout))
    return dist.get_rank(), dist.get_world_size()


def distributed_checkpoint(checkpoint: Checkpoint, timeout: float) -> Any:
    """The collective helper over ``checkpoint`` (every rank calls this at the same point:
    it may make a process group of its own)."""
    from ..distributed import DistributedCheckpoint

    return DistributedCheckpoint(checkpoint, timeout=timeout)


class Agreement:
    """The decisions every rank must take alike (whether a collective save starts now),
    over a group of the callbacks' own: collectives of their own from
    :func:`flyte_checkpoint.distributed.new_collectives` (a gloo group of its own on torch;
    ``group``: any :class:`~flyte_checkpoint.distributed.Collectives` instead). Its
    collectives run in the training thread, at batch boundaries, only while a save waits to
    start; the saves' own traffic goes through the helper's group, in its background thread,
    so the two never interleave.

    Making one is a collective: every rank makes it at the same point.
    """

    def __init__(self, uri: str, timeout: float, group: Any = None) -> None:
        from ..distributed import new_collectives

        self._group = new_collectives(group, timeout=timeout)
        self.uri = uri
        self.timeout = timeout

    @property
    def rank(self) -> int:
        return self._group.rank

    def decide(self, busy: bool) -> bool:
        """One exchange, the same answer on every rank: whether no rank has a save in
        flight. (Ranks that share one directory, one node's ranks writing into one
        ``output_dir``, all offer it: the collective helper freezes and contributes it
        once.)"""
        answers = self._collective(self._group.all_gather_object, busy,
                                   step="callback: start a save")
        return not any(answers)

    def _collective(self, call: Any, *args: Any, step: str) -> Any:
        try:
            return call(*args, step=step)
        except Exception as failure:  # a peer died, or the timeout passed: the seam says which
            raise CheckpointSaveError(
                f"checkpoint not saved to {self.uri} (the previous object is unchanged): rank"
                f" {self.rank} could not agree with the other ranks on the save within"
                f" {self.timeout:g} s: {failure}", self.uri) from failure
