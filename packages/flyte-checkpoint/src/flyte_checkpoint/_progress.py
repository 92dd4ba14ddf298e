"""A one-line progress display on a terminal; silent in non-interactive runs."""

from __future__ import annotations

import os
import sys
import threading
import time

_INTERVAL = 0.25


def _enabled() -> bool:
    setting = os.environ.get("FLYTE_CHECKPOINT_PROGRESS", "auto").lower()
    if setting in ("0", "off", "false", "no"):
        return False
    if setting in ("1", "on", "true", "yes"):
        return True
    return sys.stderr.isatty()


class Progress:
    """Counts bytes for one save or load and redraws at most four times a second."""

    def __init__(self, verb: str, uri: str, total: int | None = None, *, show: bool = True) -> None:
        self._verb = verb
        self._uri = uri
        self._total = total
        self._done = 0
        self._started = time.perf_counter()
        self._last = 0.0
        self._enabled = show and _enabled()
        self._lock = threading.Lock()
        self._drawn = False

    def update(self, count: int) -> None:
        if not self._enabled:
            return
        with self._lock:
            self._done += count
            now = time.perf_counter()
            if now - self._last >= _INTERVAL:
                self._last = now
                self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-9)
        rate = self._done / 1e6 / elapsed
        amount = f"{self._done / 1e6:,.1f} MB"
        if self._total:
            amount += f" / {self._total / 1e6:,.1f} MB ({100 * self._done / self._total:.0f}%)"
        sys.stderr.write(
            f"\r\x1b[2Kcheckpoint {self._verb}: {amount} at {rate:,.0f} MB/s  {self._uri}"
        )
        sys.stderr.flush()
        self._drawn = True

    def done(self) -> None:
        if self._enabled and self._drawn:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
