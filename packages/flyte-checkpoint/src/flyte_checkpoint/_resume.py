"""The resume rule of the helper tasks get: restore the newest checkpoint the store holds.

Every restart of a task gets the locations of its attempt, and they do not always point at
the newest checkpoint (issue 18):

- a restart *within* an attempt (torchrun's ``TORCHELASTIC_RESTART_COUNT``, a JobSet
  restart) keeps the attempt's destination, which may already hold what this attempt saved
  before it died; only this attempt can have written it, so it is the newest there is;
- an attempt that died before saving leaves its destination empty, and the next attempt's
  ``prev`` points at it, hiding the attempt before (flyte#2894).

So a load tries, in order: this attempt's own destination, when it holds an object; the
previous location given (``prev``); then, where the locations follow Flyte's
``.../<attempt>/_flytecheckpoints`` layout (or the local runner's ``.../attempt-<n>/...``),
each earlier attempt's object, newest first. The first that holds an object is restored,
and the log says which and why. A plain ``Checkpoint(dest, src)`` does none of this: it
restores ``src``, as upstream's helper does.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MAX_EARLIER_ATTEMPTS", "Resume", "earlier_attempts"]

logger = logging.getLogger("flyte_checkpoint")

#: How many earlier attempts the rule looks at, at most (one existence check each).
MAX_EARLIER_ATTEMPTS = 32

# ".../<n>/_flytecheckpoints" (Flyte) or ".../attempt-<n>/_flytecheckpoints" (our runner).
_LAYOUT = re.compile(
    r"^(?P<base>.*/)(?P<label>(?:attempt-)?)(?P<n>\d+)/(?P<name>_flytecheckpoints)/?$")


def earlier_attempts(dest: str) -> list[str]:
    """The objects of the attempts before ``dest``'s in Flyte's layout, newest first; empty
    when ``dest`` does not follow it."""
    match = _LAYOUT.match(dest)
    if match is None:
        return []
    number = int(match["n"])
    lowest = max(0, number - MAX_EARLIER_ATTEMPTS)
    return [f"{match['base']}{match['label']}{n}/{match['name']}"
            for n in range(number - 1, lowest - 1, -1)]


@dataclass(frozen=True)
class Resume:
    """The candidates of one helper: its destination, its ``prev``, the earlier attempts."""

    dest: str
    prev: str | None

    def candidates(self) -> list[tuple[str, str]]:
        """``(uri, why)`` in the order a load tries them, each location once."""
        found = [(self.dest, "this attempt's own destination holds an object: it restarted"
                             " after saving (a torchrun or JobSet restart), so this is the"
                             " newest checkpoint")]
        if self.prev:
            found.append((self.prev, "the previous location this attempt was given"))
        found += [(uri, "the newest earlier attempt that saved one (the attempts after it"
                        " saved none)") for uri in earlier_attempts(self.dest)]
        seen: set[str] = set()
        unique = []
        for uri, why in found:
            if uri.rstrip("/") not in seen:
                seen.add(uri.rstrip("/"))
                unique.append((uri, why))
        return unique

    def choose(self, holds_object: Callable[[str], bool]) -> str | None:
        """The first candidate that holds an object; else ``prev`` (whose load then reports
        what is there: nothing, or a prefix of objects), or ``None`` without one."""
        for uri, why in self.candidates():
            if holds_object(uri):
                logger.info("checkpoint load: restoring %s: %s", uri, why)
                return uri
        logger.info("checkpoint load: no checkpoint at %s", ", ".join(
            uri for uri, _ in self.candidates()))
        return self.prev
