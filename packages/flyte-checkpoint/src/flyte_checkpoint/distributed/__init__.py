"""Multi-rank checkpoints: every rank saves its share of one atomic object, each node loads
it once.

``DistributedCheckpoint(checkpoint, group=None)`` wraps this rank's
:class:`~flyte_checkpoint.Checkpoint`; ``group`` is a ``torch.distributed`` process group
(``None``: the default group) or any :class:`Collectives`. torch is imported only when a
torch group is used. ``new_collectives(group, timeout=...)`` gives code beside it (the
framework callbacks) collectives of its own over the same ranks, through the same seam.
"""

from ._checkpoint import DistributedCheckpoint
from ._collectives import CollectiveError, Collectives, ThreadGroup, node_identity
from ._new import new_collectives

__all__ = ["CollectiveError", "Collectives", "DistributedCheckpoint", "ThreadGroup",
           "new_collectives", "node_identity"]
