"""The per-member digests of CF-MARK-04: plain SHA-256, and the piecewise form for large files.

A plain SHA-256 can only be computed on one core. Files larger than one piece carry instead
the SHA-256 of the concatenated SHA-256 digests of their 4 MiB pieces, which a writer can
compute on every core before it writes the member's header.
"""

from __future__ import annotations

import hashlib

__all__ = ["PIECE", "PLAIN_KEY", "TREE_KEY", "TreeHasher", "piece_digest"]

PLAIN_KEY = "FLYTECKPT.sha256"
TREE_KEY = "FLYTECKPT.sha256-pieces"
#: The piece size of the piecewise digest, fixed by the spec.
PIECE = 4 << 20


def piece_digest(piece: bytes | memoryview) -> bytes:
    """The raw SHA-256 of one piece (thread-safe; hashlib releases the GIL)."""
    return hashlib.sha256(piece).digest()


class TreeHasher:
    """Incremental piecewise digest, with the ``update``/``hexdigest`` interface of hashlib."""

    def __init__(self) -> None:
        self._outer = hashlib.sha256()
        self._piece = hashlib.sha256()
        self._filled = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            part = view[: PIECE - self._filled]
            self._piece.update(part)
            self._filled += len(part)
            view = view[len(part) :]
            if self._filled == PIECE:
                self._outer.update(self._piece.digest())
                self._piece = hashlib.sha256()
                self._filled = 0

    def hexdigest(self) -> str:
        outer = self._outer.copy()
        if self._filled:
            outer.update(self._piece.digest())
        return outer.hexdigest()
