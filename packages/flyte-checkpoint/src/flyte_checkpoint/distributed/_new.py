"""``new_collectives``: the collectives of a checkpoint's own over a group, from any engine.

Apart from :mod:`._collectives` because it imports :mod:`._torch` (lazily, for a torch group),
which imports that module's error.
"""

from __future__ import annotations

from typing import Any

from ._collectives import Collectives, _is_collectives

__all__ = ["new_collectives"]


def new_collectives(group: Any = None, *, timeout: float) -> Collectives:
    """The collectives a checkpoint uses over ``group``: a gloo group of their own made
    over the ranks of ``group`` (a ``torch.distributed`` process group; ``None``: the default
    one, which must be initialised), each step bounded by ``timeout`` seconds; or ``group``
    itself when it already is a :class:`Collectives` (a :class:`ThreadGroup` member, another
    engine's).

    For code beside a :class:`DistributedCheckpoint` that must take decisions alike on every
    rank without touching the training's collectives (the framework callbacks agree there
    on when a save starts). On torch, making one is a collective of the group: every rank
    calls it at the same point, in the same order as its other checkpoints' (which keeps
    their rendezvous prefixes apart). torch is imported only here, and only for a torch
    group. After a step fails the group stays broken: later steps raise
    :class:`CollectiveError` at once; make a new one (on every rank) to go on.
    """
    if _is_collectives(group):
        return group
    if not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
    from ._torch import TorchCollectives  # torch, only for a torch group

    return TorchCollectives(group, timeout=timeout)
