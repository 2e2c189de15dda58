"""Holding SIGTERM/SIGINT back while cleanup runs.

``confinfer`` turns SIGTERM and SIGINT into an :class:`~confinfer.errors.Interrupted` exception.
A second signal arriving while a wipe or a worker shutdown is under way would abort that cleanup
half-done; :func:`deferred` records such a signal instead and delivers it once the cleanup has
finished.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def deferred() -> Iterator[None]:
    """Run the body with SIGTERM/SIGINT held; re-deliver the first one that came, afterwards.

    Only the main thread can change handlers (and only it runs them); elsewhere this is a no-op.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        pending.append(signum)

    previous = {}
    for sig in _SIGNALS:
        handler = signal.getsignal(sig)
        if handler is None:  # installed outside Python: leave it alone
            continue
        previous[sig] = handler
        signal.signal(sig, hold)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            signal.raise_signal(pending[0])
