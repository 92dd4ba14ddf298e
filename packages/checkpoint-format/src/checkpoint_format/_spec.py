"""The values the format spec fixes that more than one module needs: the marker and digest
record keys, the format version, the tar block and digest piece sizes, the gzip member-size
record. Reader, writer, detection, digests and codec take them from here; this module
imports nothing of the package.
"""

from __future__ import annotations

import struct

__all__ = [
    "ASSEMBLED_VERSION",
    "BLOCK",
    "FORMAT_MAJOR",
    "FORMAT_VERSION",
    "PADDING_RECORD_ID",
    "PIECE",
    "PLAIN_KEY",
    "SIZE_RECORD",
    "SIZE_RECORD_ID",
    "TARBALL_VERSION",
    "TREE_KEY",
    "VERSION_KEY",
    "WRITER_KEY",
]

#: The spec version this package implements; CF-MARK-02: the major version it reads.
FORMAT_VERSION = "1.2"
FORMAT_MAJOR = 1
#: CF-MARK-01: what a tarball of one writer is marked (it needs no record newer than 1.1),
#: and what an assembled object is marked (CF-ASM-02: the version that defines it).
TARBALL_VERSION = "1.1"
ASSEMBLED_VERSION = "1.2"
#: CF-MARK-01: the pax global records of the marker (the writer's name is informative).
VERSION_KEY = "FLYTECKPT.version"
WRITER_KEY = "FLYTECKPT.writer"

#: CF-MARK-04: the per-member digest records, plain and piecewise.
PLAIN_KEY = "FLYTECKPT.sha256"
TREE_KEY = "FLYTECKPT.sha256-pieces"
#: CF-MARK-04: the piece size of the piecewise digest.
PIECE = 4 << 20

#: A block of the uncompressed tar stream (spec, Conventions).
BLOCK = 512

#: CF-WRITE-11: the member-size record, an extra-field subfield "FK" holding the member's
#: length and its inflated size (two unsigned 64-bit little-endian integers).
SIZE_RECORD_ID = b"FK"
SIZE_RECORD = struct.Struct("<QQ")

#: CF-ASM-06: the padding record, an extra-field subfield "FP" of a gzip member that
#: inflates to nothing.
PADDING_RECORD_ID = b"FP"
