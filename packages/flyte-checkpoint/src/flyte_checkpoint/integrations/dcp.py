"""``torch.distributed.checkpoint`` (DCP) into one Flyte checkpoint object, and back on any
world size.

.. code-block:: python

    from flyte_checkpoint.integrations import dcp as flyte_dcp

    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}  # DTensors
    if flyte_dcp.load(state):          # every rank; False on the first attempt
        model.load_state_dict(state["model"]); optimizer.load_state_dict(state["optim"])
    ...
    flyte_dcp.save(state)              # every rank: one atomic object
    future = flyte_dcp.async_save(state)  # or: the upload in the background

Every function here is a collective: every rank of the group calls it, with its own share of
the state dict (its DTensor shards, as FSDP2, ``ModelParallelStrategy`` or torchtitan hold
them).

**Save.** DCP's ``FileSystemWriter`` writes this rank's files into a staging directory of
its own on node-local disk (``__<rank>_0.distcp``; the coordinator rank also ``.metadata``);
the collective save (:class:`~flyte_checkpoint.distributed.DistributedCheckpoint`) then
stores one object holding the union of the ranks' staging trees, which is exactly the
directory DCP would have written on a shared file system. The object is published once
every rank's part is in, or not at all: no half-written checkpoint, no ``.metadata`` beside
older shards. The staging directory is removed when the save returns (:func:`save`), or as
soon as its files are frozen for the background upload (:func:`async_save`).

**Load.** The collective load restores the object once per node and every rank gets the same
local directory; DCP's ``FileSystemReader`` reads it there, and DCP's load planner reshards:
a checkpoint saved by 4 ranks loads on 2, or on 8, into whatever sharding the state dict
passed in has.

**Memory and disk.** Each rank holds no more in memory than DCP's own ``FileSystemWriter``
and ``FileSystemReader`` do (its shards, written and read tensor by tensor), plus the
buffers of the collective save or load, which stream files as a single-rank save does (no
rank gathers the state, nor reads a whole file into memory). On disk, each save needs this
rank's share of the checkpoint once, in its staging directory, until the upload has read it
(a background save's frozen snapshot is made of hard links, so it takes no second copy); each
load needs the whole checkpoint once per node, until the helper is closed.
"""

from __future__ import annotations

import contextlib
import pathlib
import tempfile
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

from checkpoint_format import remove_tree

from .._checkpoint import Checkpoint
from .._errors import CheckpointLoadError
from ._mirror import task_checkpoint
from ._ranks import timeout_of, world

try:
    import torch.distributed as dist
    import torch.distributed.checkpoint as torch_dcp
except ImportError as missing:
    raise ImportError("flyte_checkpoint.integrations.dcp needs PyTorch with"
                      " torch.distributed: pip install torch") from missing

__all__ = ["async_save", "helper_for", "load", "save"]

#: The file DCP's coordinator rank writes last, naming every other file of the checkpoint.
_METADATA = ".metadata"

_helpers: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_helpers_lock = threading.Lock()


def helper_for(checkpoint: Any = None, group: Any = None) -> Any:
    """The collective helper these functions use for ``checkpoint``: the
    :class:`DistributedCheckpoint` itself if one is given; for a :class:`Checkpoint` (default:
    the task's, as the callbacks find it), one ``DistributedCheckpoint`` over it and
    ``group``, made at the first call and reused after (making one is a collective); a later
    call for the same checkpoint with another ``group`` raises :class:`ValueError`."""
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        if not callable(getattr(checkpoint, "save_sync", None)):
            raise TypeError(f"checkpoint must be a flyte_checkpoint Checkpoint or"
                            f" DistributedCheckpoint, got {checkpoint!r}")
        return checkpoint
    checkpoint = task_checkpoint(checkpoint)
    with _helpers_lock:
        helper, made_for = _helpers.get(checkpoint, (None, None))
        if helper is None:
            world(start=True, timeout=timeout_of(checkpoint))
            from ..distributed import DistributedCheckpoint

            helper = DistributedCheckpoint(checkpoint, group, timeout=timeout_of(checkpoint))
            _helpers[checkpoint] = (helper, group)
        elif made_for is not group:
            raise ValueError(
                f"the helper for {checkpoint.remote_destination} was made over another process"
                " group: pass the same group on every call, or a DistributedCheckpoint of"
                " your own as checkpoint")
        return helper


@contextlib.contextmanager
def _staging(staging_dir: str | pathlib.Path | None, rank: int) -> Iterator[pathlib.Path]:
    """A new directory for this rank's DCP files, removed (however deep) when done."""
    root = tempfile.mkdtemp(prefix=f"flyte-dcp-rank{rank}-",
                            dir=None if staging_dir is None else str(staging_dir))
    try:
        yield pathlib.Path(root)
    finally:
        remove_tree(root)


def _write(state_dict: dict[str, Any], directory: pathlib.Path, group: Any,
           planner: Any, writer_options: dict[str, Any] | None) -> None:
    writer = torch_dcp.FileSystemWriter(str(directory), **(writer_options or {}))
    torch_dcp.save(state_dict, storage_writer=writer, planner=planner, process_group=group)


def save(state_dict: dict[str, Any], checkpoint: Any = None, *, group: Any = None,
         planner: Any = None, staging_dir: str | pathlib.Path | None = None,
         writer_options: dict[str, Any] | None = None) -> None:
    """Save ``state_dict`` (this rank's share) as the new checkpoint; returns once the object
    is published. A collective: every rank of ``group`` calls it.

    Args:
        state_dict: what ``torch.distributed.checkpoint.save`` takes (DTensors, sharded or
            replicated tensors, and plain values).
        checkpoint: a :class:`Checkpoint` (default: the running task's) or a
            ``DistributedCheckpoint``.
        group: the process group DCP plans over and the helper saves over (default: the
            default group).
        planner: DCP's save planner (default: DCP's).
        staging_dir: where this rank's staging directory is made (default: the temporary
            directory); node-local disk is best.
        writer_options: more arguments of ``FileSystemWriter`` (``thread_count``, ...).

    Raises :class:`CheckpointSaveError` on every rank when any rank failed; the previous
    object is then unchanged.
    """
    helper = helper_for(checkpoint, group)
    with _staging(staging_dir, _rank(group)) as staging:
        _write(state_dict, staging, group, planner, writer_options)
        helper.save_sync(staging)


def async_save(state_dict: dict[str, Any], checkpoint: Any = None, *, group: Any = None,
               planner: Any = None, staging_dir: str | pathlib.Path | None = None,
               writer_options: dict[str, Any] | None = None) -> Future[None]:
    """:func:`save`, with the upload in the background: returns once DCP has written this
    rank's files to local disk and they are frozen, with a :class:`Future` (on every rank)
    whose result is ``None`` once the object is published, or the ``CheckpointSaveError``.

    The training loop waits for the local write only; the upload and the commit use the
    helper's own process group, so they never wait for or interleave with the training's
    collectives. A new save first waits for the one in flight (one at a time per helper).
    """
    helper = helper_for(checkpoint, group)
    with _staging(staging_dir, _rank(group)) as staging:
        _write(state_dict, staging, group, planner, writer_options)
        # Frozen (hard links) when this returns: the staging directory can go at once.
        return helper.save_sync(staging, wait=False)


def load(state_dict: dict[str, Any], checkpoint: Any = None, *, group: Any = None,
         planner: Any = None) -> bool:
    """Load the previous checkpoint into ``state_dict`` in place (DCP's ``load``: each
    tensor, DTensor shard or plain value is filled from the checkpoint, resharded to this
    rank's share). A collective: every rank of ``group`` calls it.

    Returns ``True`` when a checkpoint was loaded, ``False`` when there is none (the first
    attempt: ``state_dict`` is untouched). Raises :class:`CheckpointLoadError` on every rank
    when the object cannot be restored.
    """
    helper = helper_for(checkpoint, group)
    restored = helper.load_sync()
    if restored is None:
        return False
    restored = pathlib.Path(restored)
    if not (restored / _METADATA).is_file():
        source = (getattr(helper, "restored_from", None) or getattr(helper, "remote_source", None)
                  or "the previous checkpoint")
        raise CheckpointLoadError(
            f"checkpoint at {source} holds no {_METADATA}: it was not saved by"
            " torch.distributed.checkpoint (flyte_checkpoint.integrations.dcp.save); nothing"
            " was loaded into the state dict", str(source))
    reader = torch_dcp.FileSystemReader(str(restored))
    torch_dcp.load(state_dict, storage_reader=reader, planner=planner, process_group=group)
    return True


def _rank(group: Any) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0
