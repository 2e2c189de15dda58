"""A progress line on stderr for long seals and unseals: bytes done / total, rate, ETA.

It draws only when the stream is a terminal (a journal or a pipe gets nothing), redraws at most
a few times a second, and is safe to advance from several threads.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

from confinfer.closable import Closable

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    unit = 0
    while n >= 1024 and unit < len(_UNITS) - 1:
        n /= 1024
        unit += 1
    return f"{n:.0f} {_UNITS[unit]}" if unit == 0 else f"{n:.1f} {_UNITS[unit]}"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress(Closable):
    """Counts bytes; draws ``label  42.0%  1.2 GiB / 2.9 GiB  1.1 GiB/s  ETA 0:02``."""

    def __init__(
        self,
        label: str,
        total: int = 0,
        *,
        stream: TextIO | None = None,
        enabled: bool | None = None,
        interval_s: float = 0.2,
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self._stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self._stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self._interval = interval_s
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._last_draw = 0.0
        self._width = 0
        self._drawn = False

    def set_total(self, total: int) -> None:
        with self._lock:
            self.total = total
            self._start = time.monotonic()

    def advance(self, nbytes: int) -> None:
        """Count ``nbytes`` more; thread-safe."""
        with self._lock:
            self.done += nbytes
            if not self.enabled:
                return
            now = time.monotonic()
            if now - self._last_draw < self._interval:
                return
            self._last_draw = now
            self._draw(now)

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self._start, 1e-9)
        rate = self.done / elapsed
        parts = [self.label]
        if self.total:
            parts.append(f"{100.0 * min(self.done, self.total) / self.total:5.1f}%")
            parts.append(f"{human_bytes(self.done)} / {human_bytes(self.total)}")
        else:
            parts.append(human_bytes(self.done))
        parts.append(f"{human_bytes(rate)}/s")
        if self.total and rate > 0:
            parts.append(f"ETA {_clock(max(self.total - self.done, 0) / rate)}")
        return "  ".join(parts)

    def _draw(self, now: float) -> None:
        text = self.line(now)
        pad = max(self._width - len(text), 0)
        self._width = len(text)
        self._drawn = True
        try:
            self._stream.write("\r" + text + " " * pad)
            self._stream.flush()
        except (OSError, ValueError):
            self.enabled = False

    def close(self) -> None:
        """Draw the final state and end the line (if a line was started)."""
        with self._lock:
            if not self.enabled or not self._drawn:
                self.enabled = False
                return
            self._draw(time.monotonic())
            self.enabled = False
            try:
                self._stream.write("\n")
                self._stream.flush()
            except (OSError, ValueError):
                pass
