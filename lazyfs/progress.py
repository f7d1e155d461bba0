"""Progress output for long operations: a redrawn bar on a terminal, sparse log lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def human(n: float) -> str:
    """A byte count as a short human-readable string."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class Progress:
    """Reports ``label: done/total`` for one step at a time; quiet when ``enabled`` is False."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True, interval: float = 2.0) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.interval = interval if not self.tty else 0.1
        self._label = ""
        self._total: int | None = None
        self._last = 0.0

    def start(self, label: str, total: int | None = None) -> None:
        """Begin a new step."""
        self._label, self._total, self._last = label, total, 0.0
        self.update(0)

    def update(self, done: int) -> None:
        """Report *done* bytes of the current step (rate-limited)."""
        now = time.monotonic()
        if not self.enabled or (now - self._last < self.interval and done != self._total):
            return
        self._last = now
        if self._total:
            width = 30
            filled = int(width * min(done, self._total) / self._total)
            text = f"{self._label} [{'#' * filled}{'.' * (width - filled)}] {human(done)}/{human(self._total)}"
        else:
            text = f"{self._label} {human(done)}"
        self.stream.write(("\r\x1b[K" + text) if self.tty else text + "\n")
        self.stream.flush()

    def done(self, message: str) -> None:
        """Finish the step with a summary line."""
        if self.enabled:
            self.stream.write(("\r\x1b[K" if self.tty else "") + f"{self._label}: {message}\n")
            self.stream.flush()
