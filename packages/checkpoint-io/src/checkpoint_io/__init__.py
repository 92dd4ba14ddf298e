"""A File type over fsspec: streaming, retried, atomically committed object I/O.

>>> from checkpoint_io import File
>>> async with File(path="s3://bucket/ckpt.tar").open("wb") as f:  # doctest: +SKIP
...     await f.write(chunk)   # published only if the block exits without an exception
"""

__version__ = "0.1.0"

from ._errors import MissingBackendError, ObjectChangedError, StorageError, StorageRetryError
from ._file import AsyncFile, File, SyncFile
from ._loop import SyncInAsyncError, io_loop, refuse_in_loop
from ._registry import filesystem, require_backend, scheme_of
from ._retry import RetryPolicy

__all__ = [
    "AsyncFile",
    "File",
    "MissingBackendError",
    "ObjectChangedError",
    "RetryPolicy",
    "StorageError",
    "StorageRetryError",
    "SyncFile",
    "SyncInAsyncError",
    "__version__",
    "filesystem",
    "io_loop",
    "refuse_in_loop",
    "require_backend",
    "scheme_of",
]
