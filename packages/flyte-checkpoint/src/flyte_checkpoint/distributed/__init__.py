"""Multi-rank checkpoints: every rank saves its share of one atomic object, each node loads
it once.

``DistributedCheckpoint(checkpoint, group=None)`` wraps this rank's
:class:`~flyte_checkpoint.Checkpoint`; ``group`` is a ``torch.distributed`` process group
(``None``: the default group) or any :class:`Collectives`. torch is imported only when a
torch group is used.
"""

from ._checkpoint import DistributedCheckpoint
from ._collectives import CollectiveError, Collectives, ThreadGroup, node_identity

__all__ = ["CollectiveError", "Collectives", "DistributedCheckpoint", "ThreadGroup",
           "node_identity"]
