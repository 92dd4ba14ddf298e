"""flyte-checkpoint: ``flyte.Checkpoint``, streaming and safe, over any object store.

Inside Flyte tasks (the upstream SDK installed), :func:`install` makes ``flyte.Checkpoint`` and
``flyte.ctx().checkpoint`` ours. Where the upstream SDK is absent, ``import flyte`` finds a
small standalone facade over this package instead (see ``_standalone/flyte``).
"""

__version__ = "0.1.0"

from ._checkpoint import ENV_DEST, ENV_SRC, BaseCheckpoint, Checkpoint
from ._errors import CheckpointError, CheckpointLoadError, CheckpointSaveError
from ._latest import latest_checkpoint
from ._settings import Settings, SettingsError
from ._upstream import SUPPORTED_UPSTREAM, UpstreamNotSupportedError, install, installed, uninstall

__all__ = [
    "ENV_DEST",
    "ENV_SRC",
    "SUPPORTED_UPSTREAM",
    "BaseCheckpoint",
    "Checkpoint",
    "CheckpointError",
    "CheckpointLoadError",
    "CheckpointSaveError",
    "Settings",
    "SettingsError",
    "UpstreamNotSupportedError",
    "__version__",
    "install",
    "installed",
    "latest_checkpoint",
    "uninstall",
]
