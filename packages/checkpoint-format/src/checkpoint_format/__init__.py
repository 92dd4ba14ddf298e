"""Read, write and validate flyte-checkpoint objects (format spec v1).

Standard library only. The optional ``fast`` extra (``isal``) speeds up gzip; it writes the
same format.

- :func:`sniff` / :func:`detect`: tarball, raw payload or no checkpoint, from a bounded prefix.
- :func:`write_tarball`: a directory to a gzip tarball on any binary stream, no temp files.
- :func:`restore`: an object to a directory, safely, all or nothing.
- :func:`validate`: every violation of the spec, with rule IDs and member names.
- :func:`scan_tree`, :func:`plan_union`, :func:`write_head`, :func:`write_segment`,
  :func:`end_piece`, :func:`padding`: one object from several writers' trees, written as
  pieces that are joined byte by byte (spec §9, assembled objects).
"""

from ._assemble import end_piece, padding, write_head, write_segment
from ._detect import PREFIX_SIZE, Detection, detect, sniff
from ._errors import (
    CheckpointFormatError,
    CorruptArchiveError,
    LimitExceededError,
    UnionConflictError,
    UnsafeMemberError,
    UnsupportedFormatError,
    WriteRefusedError,
)
from ._extract import PAYLOAD_NAME, RestoreResult, remove_tree, restore
from ._limits import Limits
from ._reader import Member
from ._scan import Fingerprint, ManifestEntry, TreeManifest, scan_tree
from ._sizes import format_size
from ._spec import FORMAT_VERSION
from ._union import UnionPlan, plan_union
from ._validate import Report, Violation, validate
from ._version import __version__
from ._writer import WriteStats, changed_in_place, write_tarball

__all__ = [
    "FORMAT_VERSION",
    "PAYLOAD_NAME",
    "PREFIX_SIZE",
    "CheckpointFormatError",
    "CorruptArchiveError",
    "Detection",
    "Fingerprint",
    "LimitExceededError",
    "Limits",
    "ManifestEntry",
    "Member",
    "Report",
    "RestoreResult",
    "TreeManifest",
    "UnionConflictError",
    "UnionPlan",
    "UnsafeMemberError",
    "UnsupportedFormatError",
    "Violation",
    "WriteRefusedError",
    "WriteStats",
    "__version__",
    "changed_in_place",
    "detect",
    "end_piece",
    "format_size",
    "padding",
    "plan_union",
    "remove_tree",
    "restore",
    "scan_tree",
    "sniff",
    "validate",
    "write_head",
    "write_segment",
    "write_tarball",
]
