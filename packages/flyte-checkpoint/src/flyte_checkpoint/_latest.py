"""``latest_checkpoint``: pick the file to resume from inside a restored tree."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

__all__ = ["latest_checkpoint"]


def latest_checkpoint(
    root: str | pathlib.Path,
    glob_pattern: str = "**/last.ckpt",
    *,
    key: Callable[[pathlib.Path], Any] | None = None,
) -> pathlib.Path | None:
    """The file under ``root`` matching ``glob_pattern`` with the greatest ``key``, or ``None``.

    ``key`` defaults to the modification time (newest wins; restored trees keep mtimes to the
    nanosecond). Ties are broken by path so that the answer does not depend on directory order.
    Pass ``key`` to rank by something else, e.g. a step number parsed from the name.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        return None
    matches = [p for p in root.glob(glob_pattern) if p.is_file()]
    if not matches:
        return None
    rank = key if key is not None else (lambda p: p.stat().st_mtime_ns)
    return max(matches, key=lambda p: (rank(p), str(p)))
