"""Reader caps of spec §5.1 (CF-LIMIT-01), with their defaults."""

from __future__ import annotations

import dataclasses

__all__ = ["Limits"]


@dataclasses.dataclass(frozen=True)
class Limits:
    """Caps a reader enforces before trusting any declared count, size or length.

    Raise a cap by passing a new value (``Limits(max_total_size=4 << 40)``). The library
    never reads ``CHECKPOINT_*`` variables; the tools at the edge do (``checkpoint-format``'s
    CLI, flyte-checkpoint's ``Settings``), taking each cap from ``CHECKPOINT_MAX_<FIELD>``
    (``CHECKPOINT_MAX_MEMBERS``, ``CHECKPOINT_MAX_TOTAL_SIZE``, ...).
    """

    max_members: int = 1_000_000
    max_total_size: int = 1 << 40
    max_name_length: int = 4096
    max_expansion_ratio: float = 1100.0
    max_extended_header: int = 1 << 20
    #: Parent directories a reader creates because members lie below them without a member
    #: of their own (CF-EXTRACT-10). One 4 KiB name can imply 2,048 of them, each a mkdir:
    #: this bounds the directories a small object can make the reader create.
    max_implied_dirs: int = 16_384
    #: The expansion ratio is only judged once this many bytes have been decompressed, so
    #: that small, highly compressible archives (an empty directory) are never refused.
    ratio_grace_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"Limits.{field.name} must be a positive number, got {value!r}")
