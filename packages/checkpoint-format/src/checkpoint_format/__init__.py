"""Read, write and validate flyte-checkpoint objects (format spec v1).

Standard library only. The optional ``fast`` extra (``isal``) speeds up gzip; it writes the
same format.

- :func:`sniff` / :func:`detect`: tarball, raw payload or no checkpoint, from a bounded prefix.
- :func:`write_tarball`: a directory to a gzip tarball on any binary stream, no temp files.
- :func:`restore`: an object to a directory, safely, all or nothing.
- :func:`validate`: every violation of the spec, with rule IDs and member names.
"""

__version__ = "0.1.0"

from ._detect import PREFIX_SIZE, Detection, detect, sniff  # noqa: E402
from ._errors import (  # noqa: E402
    CheckpointFormatError,
    CorruptArchiveError,
    LimitExceededError,
    UnsafeMemberError,
    UnsupportedFormatError,
    WriteRefusedError,
)
from ._extract import PAYLOAD_NAME, RestoreResult, restore  # noqa: E402
from ._limits import Limits  # noqa: E402
from ._reader import FORMAT_VERSION, Member  # noqa: E402
from ._validate import Report, Violation, validate  # noqa: E402
from ._writer import WriteStats, write_tarball  # noqa: E402

__all__ = [
    "FORMAT_VERSION",
    "PAYLOAD_NAME",
    "PREFIX_SIZE",
    "CheckpointFormatError",
    "CorruptArchiveError",
    "Detection",
    "LimitExceededError",
    "Limits",
    "Member",
    "Report",
    "RestoreResult",
    "UnsafeMemberError",
    "UnsupportedFormatError",
    "Violation",
    "WriteRefusedError",
    "WriteStats",
    "__version__",
    "detect",
    "restore",
    "sniff",
    "validate",
    "write_tarball",
]
