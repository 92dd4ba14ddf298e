"""The per-member digests of CF-MARK-04: plain SHA-256, and the piecewise form for large files.

A plain SHA-256 can only be computed on one core. Files larger than one piece carry instead
the SHA-256 of the concatenated SHA-256 digests of their 4 MiB pieces, which a writer can
compute on every core before it writes the member's header.
"""

from __future__ import annotations

import collections
import hashlib
from concurrent.futures import Executor, Future

from ._spec import PIECE

__all__ = [
    "PieceHashing",
    "PooledTreeHasher",
    "TreeHasher",
    "piece_digest",
]



def piece_digest(piece: bytes | memoryview) -> bytes:
    """The raw SHA-256 of one piece (thread-safe; hashlib releases the GIL)."""
    return hashlib.sha256(piece).digest()


class _Pieces:
    """Cuts the data of :meth:`update` at piece boundaries: ``_add`` gets each part, and
    ``_complete`` is called whenever a piece is whole."""

    _filled = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            part = view[: PIECE - self._filled]
            self._add(part)
            self._filled += len(part)
            view = view[len(part) :]
            if self._filled == PIECE:
                self._filled = 0
                self._complete()

    def _add(self, part: memoryview) -> None:
        raise NotImplementedError

    def _complete(self) -> None:
        raise NotImplementedError


class TreeHasher(_Pieces):
    """Incremental piecewise digest, with the ``update``/``hexdigest`` interface of hashlib."""

    def __init__(self) -> None:
        self._outer = hashlib.sha256()
        self._piece = hashlib.sha256()

    def _add(self, part: memoryview) -> None:
        self._piece.update(part)

    def _complete(self) -> None:
        self._outer.update(self._piece.digest())
        self._piece = hashlib.sha256()

    def hexdigest(self) -> str:
        outer = self._outer.copy()
        if self._filled:
            outer.update(self._piece.digest())
        return outer.hexdigest()


def _hash_views(views: list[memoryview]) -> bytes:
    hasher = hashlib.sha256()
    for view in views:
        hasher.update(view)
    return hasher.digest()


class PieceHashing:
    """Hashes the complete pieces of several :class:`PooledTreeHasher` on a thread pool, at
    most ``window`` pieces at a time across all of them (each piece keeps the decoded chunks
    it lies in alive until it is hashed)."""

    def __init__(self, pool: Executor, window: int) -> None:
        self._pool = pool
        self._window = window
        self._in_flight: collections.deque[tuple[PooledTreeHasher, Future[bytes]]] = (
            collections.deque()
        )

    def submit(self, hasher: PooledTreeHasher, views: list[memoryview]) -> None:
        self._in_flight.append((hasher, self._pool.submit(_hash_views, views)))
        while len(self._in_flight) > self._window:
            self._settle()

    def drain(self) -> None:
        """Wait for every piece submitted so far."""
        while self._in_flight:
            self._settle()

    def _settle(self) -> None:
        hasher, future = self._in_flight.popleft()  # in submission order: per hasher too
        hasher._outer.update(future.result())


class PooledTreeHasher(_Pieces):
    """The piecewise digest of :class:`TreeHasher`, its pieces hashed on a pool. ``hexdigest``
    is valid after :meth:`end`, once the shared :class:`PieceHashing` has been drained."""

    def __init__(self, hashing: PieceHashing) -> None:
        self._hashing = hashing
        self._outer = hashlib.sha256()
        self._views: list[memoryview] = []

    def _add(self, part: memoryview) -> None:
        self._views.append(part)

    def _complete(self) -> None:
        views, self._views = self._views, []
        self._hashing.submit(self, views)

    def end(self) -> None:
        """The data is complete: the last, partial piece goes to the pool too, so that no
        view of a decoded chunk outlives the member's data."""
        if self._filled:
            self._filled = 0
            self._complete()

    def hexdigest(self) -> str:
        assert not self._filled, "end() first"
        return self._outer.hexdigest()
