"""The collective seam on ``torch.distributed``: a gloo group of the checkpoint's own.

The group is made for the checkpoint (``new_group(backend="gloo")`` over the ranks of the
group it was given), as ``torch.distributed.checkpoint.async_save`` does: its gathers run on
CPU, from any thread, and never interleave with the training's NCCL (or gloo) collectives,
so a background save cannot make them wait or reorder them. Its timeout is the checkpoint's
(``CHECKPOINT_DISTRIBUTED_TIMEOUT``).

When a collective fails (a peer's connection closed because its process died, or the
timeout passed), the survivors tell who is missing from the rendezvous store: before each
step every rank sets a key of its own there, so the ranks without one are those that never
reached it. When the store itself is gone, its host is: with ``init_process_group``'s env://
rendezvous that is rank 0's process (torchrun's agent hosts it instead, and says so with
``TORCHELASTIC_USE_AGENT_STORE``), so the survivors name rank 0. torch is imported when this
module is, which only ``DistributedCheckpoint``
does, and only for a torch group.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import logging
import os
import time
from typing import Any

import torch.distributed as dist

from ._collectives import CollectiveError

__all__ = ["TorchCollectives"]

logger = logging.getLogger("flyte_checkpoint")

#: How long survivors of a failed step wait for the others' keys before naming the missing.
_GRACE = 5.0
_counter = itertools.count()


class TorchCollectives:
    """:class:`~._collectives.Collectives` over ``group`` (``None``: the default group) of an
    initialised ``torch.distributed``. Every rank of ``group`` builds it, in the same order
    as its other checkpoints' (which keeps their stores' prefixes apart)."""

    def __init__(self, group: Any = None, *, timeout: float) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "DistributedCheckpoint needs torch.distributed initialised (for example by"
                " torchrun and init_process_group()) or a Collectives group of its own")
        self.timeout = float(timeout)
        delta = datetime.timedelta(seconds=self.timeout)
        number = next(_counter)
        if group is None:
            self._group = dist.new_group(backend="gloo", timeout=delta)
        else:
            ranks = dist.get_process_group_ranks(group)
            # Only the members make it: a subgroup's ranks need no help from the others.
            self._group = dist.new_group(ranks=ranks, backend="gloo", timeout=delta,
                                         use_local_synchronization=True)
            number = f"{number}-{'.'.join(map(str, ranks))}"
        self.rank = dist.get_rank(self._group)
        self.size = dist.get_world_size(self._group)
        self._store = _store(f"flyte-checkpoint/{number}")
        self._seq = 0
        self._broken: CollectiveError | None = None

    # ------------------------------------------------------------------ the seam

    def all_gather_object(self, obj: Any, *, step: str) -> list[Any]:
        found: list[Any] = [None] * self.size
        self._run(step, lambda: dist.all_gather_object(found, obj, group=self._group))
        return found

    def broadcast_object(self, obj: Any, *, src: int, step: str) -> Any:
        box = [obj if self.rank == src else None]
        source = dist.get_global_rank(self._group, src)
        self._run(step, lambda: dist.broadcast_object_list(box, src=source, group=self._group))
        return box[0]

    def barrier(self, *, step: str) -> None:
        self.all_gather_object(None, step=step)

    def close(self) -> None:
        """Release the group's sockets and threads (local: no rank waits for another).
        Later steps raise :class:`CollectiveError`. Idempotent, and a no-op once
        ``torch.distributed`` itself was torn down (which released the group with it)."""
        group, self._group = self._group, None
        if self._broken is None:
            self._broken = CollectiveError("close", [], "the checkpoint's group was closed")
        if group is None or not dist.is_initialized():
            return
        try:
            dist.destroy_process_group(group)
        except (RuntimeError, ValueError) as exc:  # already gone with its parent
            logger.debug("releasing the checkpoint's gloo group: %s", exc)

    # ------------------------------------------------------------------ failures

    def _run(self, step: str, collective: Any) -> None:
        if self._broken is not None:
            raise CollectiveError(step, self._broken.missing,
                                  f"the checkpoint's group failed earlier ({self._broken})")
        self._seq += 1
        key = f"{self._seq}/"
        self._mark(key + str(self.rank))
        try:
            collective()
        except Exception as exc:  # gloo: a closed connection, a timeout
            missing, note = self._missing(key)
            self._broken = CollectiveError(step, missing, _cause(exc) + note)
            raise self._broken from exc
        if self._store is not None and self._seq > 1:  # everyone is past the step before
            # (an old store without delete_key: the keys are tiny)
            with contextlib.suppress(Exception):
                self._store.delete_key(f"{self._seq - 1}/{self.rank}")

    def _mark(self, key: str) -> None:
        if self._store is not None:
            try:
                self._store.set(key, "1")
            except Exception as exc:
                logger.debug("checkpoint: could not mark %s in the store: %s", key, exc)

    def _missing(self, key: str) -> tuple[list[int], str]:
        """The ranks whose key for this step is absent, after a short grace for the late;
        and a note on how they were found when it was not from their keys."""
        if self._store is None:
            return [], ""
        deadline = time.monotonic() + min(_GRACE, self.timeout)
        while True:
            try:
                missing = [r for r in range(self.size) if not self._store.check([key + str(r)])]
            except Exception as exc:
                return self._store_host_gone(exc)
            if not missing or time.monotonic() >= deadline:
                return missing, ""
            time.sleep(0.2)

    def _store_host_gone(self, exc: BaseException) -> tuple[list[int], str]:
        """The rendezvous store cannot be reached: its host is gone. That is rank 0's
        process unless torchrun's agent hosts the store."""
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").strip().lower() == "true":
            return [], f" (the rendezvous store is unreachable too: {_cause(exc)})"
        try:
            host = dist.get_group_rank(self._group, 0)
        except Exception:
            return [], f" (the rendezvous store is unreachable too: {_cause(exc)})"
        if host == self.rank:
            return [], ""
        return [host], (" (the rendezvous store, which global rank 0's process hosts, is"
                        " unreachable too: that process is gone)")


def _store(prefix: str) -> Any:
    """The rendezvous store under ``prefix``, or ``None`` when there is none to reach."""
    try:
        from torch.distributed import distributed_c10d

        return dist.PrefixStore(prefix, distributed_c10d._get_default_store())
    except Exception:
        return None


def _cause(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}"
