"""``flyte.io`` where the upstream Flyte SDK is not installed: checkpoint-io's ``File``."""

from checkpoint_io import File

__all__ = ["File"]
