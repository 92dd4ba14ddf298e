"""``flyte`` facade of the flyte-checkpoint distribution.

This distribution provides the ``flyte`` import name for ``flyte.Checkpoint`` and friends. It
must not be installed in the same environment as the upstream ``flyte`` SDK distribution: both
own the ``flyte`` package and would overwrite each other's files.
"""

from flyte_checkpoint import BaseCheckpoint, Checkpoint, latest_checkpoint

from . import io

__all__ = ["BaseCheckpoint", "Checkpoint", "io", "latest_checkpoint"]
