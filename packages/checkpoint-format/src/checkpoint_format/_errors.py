"""One error type per rule family. Every error carries the spec rule ID and the member name."""

from __future__ import annotations

__all__ = [
    "CheckpointFormatError",
    "CorruptArchiveError",
    "LimitExceededError",
    "UnionConflictError",
    "UnsafeMemberError",
    "UnsupportedFormatError",
    "WriteRefusedError",
]


class CheckpointFormatError(Exception):
    """Base class: a checkpoint object, or a tree to be saved, breaks a rule of the spec.

    ``rule`` is the spec rule ID (e.g. ``"CF-EXTRACT-02"``); ``member`` is the offending member
    name, or ``None`` when the problem is not tied to one member.
    """

    def __init__(self, rule: str, message: str, member: str | None = None) -> None:
        self.rule = rule
        self.member = member
        self.detail = message
        where = f"member {member!r}: " if member is not None else ""
        super().__init__(f"{where}{message} ({rule})")

    def __reduce__(self):  # keep errors picklable across process pools
        return (type(self), (self.rule, self.detail, self.member))


class UnsafeMemberError(CheckpointFormatError):
    """A member would escape the target, is of a forbidden type, or clashes with another
    (CF-EXTRACT)."""


class LimitExceededError(CheckpointFormatError):
    """A member count, size, name length or expansion ratio passed its cap (CF-LIMIT)."""


class CorruptArchiveError(CheckpointFormatError):
    """The stream is truncated, fails a checksum or digest, or does not decode
    (CF-INTEG, CF-MARK-04)."""


class UnsupportedFormatError(CheckpointFormatError):
    """The object declares a format version this reader must not read (CF-MARK-02)."""


class WriteRefusedError(CheckpointFormatError):
    """The tree to be saved cannot be written as a spec-compliant tarball (CF-WRITE)."""


class UnionConflictError(WriteRefusedError):
    """The trees of several contributors cannot be joined into one assembled object
    (CF-ASM-07): ``path`` is held differently by the contributors ``ranks`` (in increasing
    order), for ``reason``."""

    def __init__(self, path: str, ranks: tuple[int, ...] | list[int], reason: str) -> None:
        self.path = path
        self.ranks = tuple(ranks)
        self.reason = reason
        super().__init__("CF-ASM-07", reason, path)

    def __reduce__(self):
        return (type(self), (self.path, self.ranks, self.reason))
