"""A File type over fsspec: streaming, retried, atomically committed object I/O.

>>> from checkpoint_io import File
>>> async with File(path="s3://bucket/ckpt.tar").open("wb") as f:  # doctest: +SKIP
...     await f.write(chunk)   # published only if the block exits without an exception
"""

__version__ = "0.1.0"

from ._errors import (
    MissingBackendError,
    ObjectChangedError,
    SharedUploadError,
    StorageError,
    StorageRetryError,
)
from ._file import AsyncFile, File, SyncFile
from ._loop import SyncInAsyncError, io_loop, refuse_in_loop
from ._registry import filesystem, require_backend, scheme_of
from ._retry import RetryPolicy
from ._shared import (
    AsyncSegmentWriter,
    SegmentReceipt,
    SegmentWriter,
    SharedUpload,
    sweep_shared_uploads,
    sweep_shared_uploads_sync,
)

__all__ = [
    "AsyncFile",
    "AsyncSegmentWriter",
    "File",
    "MissingBackendError",
    "ObjectChangedError",
    "RetryPolicy",
    "SegmentReceipt",
    "SegmentWriter",
    "SharedUpload",
    "SharedUploadError",
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
    "sweep_shared_uploads",
    "sweep_shared_uploads_sync",
]
