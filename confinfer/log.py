"""Logging to stderr with sd-daemon priority prefixes, so ``journalctl -p`` works.

The level comes from ``SYSTEMD_LOG_LEVEL`` (debug, info, notice, warning, err, ...) or from
``--debug``. Journald adds timestamps; we add none.
"""

from __future__ import annotations

import logging
import os
import sys

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
        text = super().format(record)
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
