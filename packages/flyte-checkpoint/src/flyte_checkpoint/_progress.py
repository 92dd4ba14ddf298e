"""A one-line progress display on a terminal; silent in non-interactive runs."""

from __future__ import annotations

import sys
import threading
import time

_INTERVAL = 0.25


class Progress:
    """Counts bytes for one save or load and redraws at most four times a second."""

    def __init__(self, verb: str, uri: str, total: int | None = None, *, show: bool = True,
                 setting: bool | None = None) -> None:
        """``show=False`` never draws (a background snapshot's upload); else ``setting``
        decides (``Settings.progress``: ``None`` draws when standard error is a terminal)."""
        self._verb = verb
        self._uri = uri
        self._total = total
        self._done = 0
        self._started = time.perf_counter()
        self._last = 0.0
        self._enabled = show and (sys.stderr.isatty() if setting is None else setting)
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
