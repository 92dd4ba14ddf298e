"""Validation and inspection: read a whole object, report every violation (CF-VALID-01)."""

from __future__ import annotations

import dataclasses
from typing import BinaryIO

from ._detect import Detection, sniff
from ._errors import CheckpointFormatError
from ._limits import Limits
from ._reader import Member, TarReader

__all__ = ["Report", "Violation", "validate"]

_READ = 4 << 20


@dataclasses.dataclass(frozen=True)
class Violation:
    rule: str
    member: str | None
    message: str

    @classmethod
    def from_error(cls, error: CheckpointFormatError) -> Violation:
        return cls(error.rule, error.member, str(error))


@dataclasses.dataclass
class Report:
    """Everything :func:`validate` learned about an object."""

    detection: Detection
    size: int = 0
    format_version: str | None = None
    writer: str | None = None
    members: list[Member] = dataclasses.field(default_factory=list)
    violations: list[Violation] = dataclasses.field(default_factory=list)
    digests_present: int = 0

    @property
    def valid(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict:
        return {
            "kind": self.detection.kind,
            "compression": self.detection.compression,
            "reason": self.detection.reason,
            "size": self.size,
            "format_version": self.format_version,
            "legacy": self.detection.kind == "tarball" and self.format_version is None,
            "writer": self.writer,
            "digests_present": self.digests_present,
            "members": [dataclasses.asdict(m) for m in self.members],
            "valid": self.valid,
            "violations": [dataclasses.asdict(v) for v in self.violations],
        }


class _Counting:
    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self.count += len(data)
        return data


def validate(
    source: BinaryIO, *, limits: Limits | None = None, decode_threads: int | None = None
) -> Report:
    """Read ``source`` to its end and report what it is and every rule it breaks.

    Rule violations are collected and reading goes on; a fault that makes the rest of the
    stream unreadable (truncation, corruption, an unknown major version) is recorded last.
    I/O errors of ``source`` propagate. ``limits`` and ``decode_threads`` as for
    :func:`~checkpoint_format.restore`.
    """
    detection, stream = sniff(source)
    counted = _Counting(stream)
    report = Report(detection)
    if detection.kind == "tarball":
        reader = TarReader(
            counted,  # type: ignore[arg-type]
            detection.compression,
            limits=limits,
            decode_threads=decode_threads,
            on_violation=lambda error: report.violations.append(Violation.from_error(error)),
        )
        try:
            with reader:
                for member, _chunks in reader.members():
                    report.members.append(member)
        except CheckpointFormatError as error:
            report.violations.append(Violation.from_error(error))
        report.format_version = reader.format_version
        report.writer = reader.writer
        report.digests_present = reader.digests_present
    while counted.read(_READ):  # a raw payload, or what a fatal fault left unread
        pass
    report.size = counted.count
    return report
