"""A File type over fsspec: streaming, retried, atomically committed object I/O."""

__all__: list[str] = []
