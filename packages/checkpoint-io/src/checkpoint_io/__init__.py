"""A File type over fsspec: streaming, retried, atomically committed object I/O.

>>> from checkpoint_io import File
>>> async with File(path="s3://bucket/ckpt.tar").open("wb") as f:  # doctest: +SKIP
...     await f.write(chunk)   # published only if the block exits without an exception
"""

__version__ = "0.1.0"

from ._errors import MissingBackendError, ObjectChangedError, StorageRetryError
from ._file import AsyncFile, File, SyncFile
from ._loop import SyncInAsyncError
from ._registry import filesystem, require_backend, scheme_of
from ._retry import RetryPolicy

__all__ = [
    "AsyncFile",
    "File",
    "MissingBackendError",
    "ObjectChangedError",
    "RetryPolicy",
    "StorageRetryError",
    "SyncFile",
    "SyncInAsyncError",
    "__version__",
    "filesystem",
    "require_backend",
    "scheme_of",
]
