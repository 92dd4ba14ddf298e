"""flyte-checkpoint: ``flyte.Checkpoint``, streaming and safe, over any object store.

The implementation lives here; the ``flyte`` package is a thin facade over it.
"""

__version__ = "0.1.0"

from ._checkpoint import (
    ENV_DEST,
    ENV_SRC,
    BaseCheckpoint,
    Checkpoint,
    CheckpointError,
    CheckpointLoadError,
    CheckpointSaveError,
)
from ._latest import latest_checkpoint

__all__ = [
    "ENV_DEST",
    "ENV_SRC",
    "BaseCheckpoint",
    "Checkpoint",
    "CheckpointError",
    "CheckpointLoadError",
    "CheckpointSaveError",
    "__version__",
    "latest_checkpoint",
]
