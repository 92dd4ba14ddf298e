"""The collective seam of multi-rank checkpoints: the few group operations they need.

:class:`DistributedCheckpoint` talks to its group only through :class:`Collectives`: a rank
and a size, gather, broadcast and barrier of picklable objects, each bounded by the group's
timeout. Any engine can serve it: :mod:`._torch` does it on a gloo group of its own (made for
the checkpoint, so its traffic never interleaves with the training's collectives), and
:class:`ThreadGroup` in memory, for ranks that are threads of one process (tests, and tools
that drive several ranks at once); a ``jax.distributed`` one can be added without touching
the rest.

A collective that cannot complete raises :class:`CollectiveError` naming the step, the ranks
that did not reach it (when the engine can tell) and the cause.
"""

from __future__ import annotations

import os
import pickle
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

__all__ = ["CollectiveError", "Collectives", "ThreadGroup", "node_identity"]


class CollectiveError(RuntimeError):
    """A collective step did not complete on every rank: a rank failed, was killed, or hangs
    past the timeout. ``step`` names the step, ``missing`` the ranks that never reached it
    (empty when the engine cannot tell)."""

    def __init__(self, step: str, missing: Sequence[int], cause: str) -> None:
        self.step = step
        self.missing = tuple(missing)
        self.cause = cause
        if self.missing:
            who = ", ".join(f"rank {r}" for r in self.missing)
            verb = "does" if len(self.missing) == 1 else "do"
            message = (f"{who} {verb} not answer at step {step!r} (failed, killed or hung):"
                       f" {cause}")
        else:
            message = f"step {step!r} did not complete on every rank: {cause}"
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.step, self.missing, self.cause))


@runtime_checkable
class Collectives(Protocol):
    """What a multi-rank checkpoint needs from its group. Every rank calls the same
    operations in the same order; each call returns within :attr:`timeout` seconds or
    raises :class:`CollectiveError`. ``step`` names the call in errors and logs."""

    rank: int
    size: int
    timeout: float

    def all_gather_object(self, obj: Any, *, step: str) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""

    def broadcast_object(self, obj: Any, *, src: int, step: str) -> Any:
        """Rank ``src``'s ``obj`` on every rank (the others pass anything)."""

    def barrier(self, *, step: str) -> None:
        """Return once every rank has called it."""


def _is_collectives(group: Any) -> bool:
    return group is not None and all(
        hasattr(group, name) for name in ("rank", "size", "all_gather_object",
                                          "broadcast_object", "barrier")
    ) and isinstance(getattr(group, "rank", None), int)


def node_identity(override: str | None = None) -> str:
    """What the ranks of one node share: ``override`` if given, else the hostname, the
    kernel's boot id and this process's mount namespace (containers on one host differ in
    the last, so ranks with the same identity see the same local files)."""
    if override:
        return override
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
            boot = handle.read().strip()
    except OSError:
        boot = ""
    try:
        namespace = str(os.stat("/proc/self/ns/mnt").st_ino)
    except OSError:
        namespace = ""
    return "/".join((socket.gethostname(), boot, namespace))


class ThreadGroup:
    """A group whose ranks are threads of this process; ``member(rank)`` is a rank's
    :class:`Collectives`. Objects are pickled on the way, as between processes. A rank that
    stops calling (a test's stand-in for a killed process) makes the others' call fail
    after ``timeout`` seconds, naming it."""

    def __init__(self, size: int, *, timeout: float = 30.0) -> None:
        if size < 1:
            raise ValueError(f"a group has at least one rank, not {size}")
        self.size = size
        self.timeout = timeout
        self._cond = threading.Condition()
        self._slots: dict[int, dict[int, bytes]] = {}
        self._left: dict[int, int] = {}

    def member(self, rank: int) -> _ThreadMember:
        if not 0 <= rank < self.size:
            raise ValueError(f"rank {rank} is outside a group of {self.size}")
        return _ThreadMember(self, rank)

    def _exchange(self, seq: int, rank: int, payload: bytes | None, step: str,
                  wanted: Sequence[int]) -> dict[int, bytes]:
        deadline = time.monotonic() + self.timeout
        with self._cond:
            slots = self._slots.setdefault(seq, {})
            slots[rank] = payload if payload is not None else b""
            self._cond.notify_all()
            while len(slots) < self.size:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = sorted(set(range(self.size)) - set(slots))
                    raise CollectiveError(step, missing,
                                          f"no answer within {self.timeout:g} s")
                self._cond.wait(remaining)
            found = {r: slots[r] for r in wanted}
            self._left[seq] = self._left.get(seq, self.size) - 1
            if self._left[seq] == 0:  # the last rank out frees the slot
                del self._slots[seq], self._left[seq]
            return found


class _ThreadMember:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self._group = group
        self.rank = rank
        self.size = group.size
        self.timeout = group.timeout
        self._seq = 0

    def _next(self) -> int:
        self._seq += 1
        return self._seq

    def all_gather_object(self, obj: Any, *, step: str) -> list[Any]:
        found = self._group._exchange(self._next(), self.rank, pickle.dumps(obj), step,
                                      range(self.size))
        return [pickle.loads(found[r]) for r in range(self.size)]

    def broadcast_object(self, obj: Any, *, src: int, step: str) -> Any:
        payload = pickle.dumps(obj) if self.rank == src else None
        found = self._group._exchange(self._next(), self.rank, payload, step, [src])
        return pickle.loads(found[src])

    def barrier(self, *, step: str) -> None:
        self._group._exchange(self._next(), self.rank, None, step, [])
