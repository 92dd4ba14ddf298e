"""``flyte.io`` facade: the :class:`File` type from checkpoint-io."""

from checkpoint_io import File

__all__ = ["File"]
