"""Byte counts for people: the one size formatter of the packages, for messages and logs."""

from __future__ import annotations

__all__ = ["format_size"]

_UNITS = ("B", "KB", "MB", "GB")


def format_size(size: int) -> str:
    """``size`` bytes in decimal units (1 KB = 1,000 bytes), the units of the MB/s rates
    logged beside sizes: ``999 B``, ``1.5 KB``, ``300.0 MB``, ``2048.0 GB`` (GB is the
    largest unit). Exact counts, where they matter, are printed in bytes beside it."""
    value = float(size)
    for unit in _UNITS:
        if value < 1000 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")
