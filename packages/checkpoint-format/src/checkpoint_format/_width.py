"""How wide the format's thread pools run when the caller does not say: the one place that
answers it for this package.

Every pool takes its width as an argument (``write_tarball(workers=)``,
``restore(decode_threads=)``, ``validate(decode_threads=)``); ``None`` there means the
default below, computed from the cores this process may run on. Nothing here reads a
``CHECKPOINT_*`` variable: the tools at the edge (``checkpoint-format``'s CLI, flyte-checkpoint's
``Settings``) turn variables into arguments.
"""

from __future__ import annotations

import os

__all__ = ["DECODE_WIDTH_CAP", "compress_width", "cores", "decode_width"]

#: Beyond this many threads, inflating stored or level-1 members (and hashing what they
#: hold) outruns any disk or network, so a load never takes more by default.
DECODE_WIDTH_CAP = 4


def cores() -> int:
    """The cores this process may run on (its CPU affinity where the platform has one,
    else the machine's CPU count); at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def compress_width(workers: int | None = None) -> int:
    """Compressor threads of a save: ``workers`` if given, else every core."""
    return _given("workers", workers) or cores()


def decode_width(threads: int | None = None) -> int:
    """Threads of a load's inflate, hash and file-writer pools: ``threads`` if given, else
    the cores, at most :data:`DECODE_WIDTH_CAP`."""
    return _given("decode_threads", threads) or min(cores(), DECODE_WIDTH_CAP)


def _given(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a whole number of 1 or more or None, got {value!r}")
    return value
