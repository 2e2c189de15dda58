"""Logging to stderr with sd-daemon priority prefixes, so ``journalctl -p`` works.

The level comes from ``SYSTEMD_LOG_LEVEL`` (debug, info, notice, warning, err, ...) or from
``--debug``. Journald adds timestamps; we add none.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import time
from collections.abc import Iterator

from confinfer.errors import printable

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "notice": logging.INFO,
    "warning": logging.WARNING,
    "err": logging.ERROR,
    "error": logging.ERROR,
    "crit": logging.CRITICAL,
    "alert": logging.CRITICAL,
    "emerg": logging.CRITICAL,
}


class _PriorityFormatter(logging.Formatter):
    def __init__(self, prefix: bool) -> None:
        super().__init__("%(message)s")
        self._prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        # The message may quote what a package or a server said: one printable line, so that
        # it cannot forge a second journal entry ("\n<0>...") or hide in terminal escapes.
        text = printable(record.getMessage(), 4000)
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if not self._prefix:
            return text
        return f"<{_PRIORITY.get(record.levelno, 6)}>{text}"


def level_from_env(default: int = logging.INFO) -> int:
    value = os.environ.get("SYSTEMD_LOG_LEVEL", "").strip().lower()
    if value.isdigit():
        return {7: logging.DEBUG, 6: logging.INFO, 5: logging.INFO, 4: logging.WARNING}.get(
            int(value), logging.ERROR
        )
    return _LEVELS.get(value, default)


def setup(debug: bool = False) -> None:
    """Configure the root logger once for a command or a daemon."""
    # Priority prefixes only when journald reads our stderr (it sets JOURNAL_STREAM).
    prefix = "JOURNAL_STREAM" in os.environ
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PriorityFormatter(prefix))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else level_from_env())
    # The Azure SDK logs every HTTP request at INFO; keep it for --debug only.
    if not debug:
        logging.getLogger("azure").setLevel(logging.WARNING)


# --- step timings ----------------------------------------------------------------------------


class Steps:
    """Exclusive durations of named steps, in the order they ran: a nested step's time is
    not counted in the step around it (``maa`` excludes the vTPM calls made inside it)."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, float]] = []
        self._stack: list[float] = []  # time spent in nested steps, per open step

    def record(self, name: str, seconds: float) -> None:
        self.steps.append((name, seconds))

    def totals(self) -> dict[str, float]:
        """Seconds per step name (repeated steps summed), in first-seen order."""
        out: dict[str, float] = {}
        for name, seconds in self.steps:
            out[name] = out.get(name, 0.0) + seconds
        return out

    def line(self) -> str:
        return " ".join(f"{k}={v * 1000:.1f}ms" for k, v in self.totals().items())


_RECORDER: contextvars.ContextVar[Steps | None] = contextvars.ContextVar(
    "confinfer_steps", default=None
)


@contextlib.contextmanager
def recording(steps: Steps | None = None) -> Iterator[Steps]:
    """Record every :func:`step` run inside the block (this thread/context) into ``steps``."""
    steps = steps if steps is not None else Steps()
    token = _RECORDER.set(steps)
    try:
        yield steps
    finally:
        _RECORDER.reset(token)


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """Time a step of work: recorded when a :func:`recording` is active, else free."""
    steps = _RECORDER.get()
    if steps is None:
        yield
        return
    steps._stack.append(0.0)
    start = time.perf_counter()
    try:
        yield
    finally:
        spent = time.perf_counter() - start
        nested = steps._stack.pop()
        steps.record(name, spent - nested)
        if steps._stack:
            steps._stack[-1] += spent
