"""Following attestd's event stream from another daemon (model-loader, vllm-supervisor).

A :class:`Follower` thread keeps one ``/v1/events`` stream open, hands every event to its
:class:`Listener`, reports a lost stream (attestd restarting, gone, or silent past
:data:`EVENTS_IDLE_S`) and reconnects with backoff. What an event means is the listener's
business: the loader's guard weighs revocations and the grace, the supervisor kills the engine
on a revocation.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Protocol

from confinfer.attestd_api import Event
from confinfer.errors import ConfinferError

# attestd sends a keep-alive line every 15 s on an idle stream: three missed ones is a dead peer.
EVENTS_IDLE_S = 45.0
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 2.0


class Listener(Protocol):
    """What a :class:`Follower` reports to. Called from the follower's thread."""

    def on_event(self, event: Event) -> None: ...

    def on_lost(self, why: str) -> None: ...

    def check(self) -> None:
        """Called between reconnects: a chance to act on time passing without events."""
        ...


class EventSource(Protocol):
    """What the feed needs of :class:`~confinfer.attestd_api.Client`: a stream of events that
    has a ``close()``, callable from another thread."""

    def events(self, *, idle_timeout: float | None = None) -> Iterable[Event]: ...


class Follower:
    """A thread that keeps one event stream open to attestd, reconnecting with backoff, and
    reports what it sees to a :class:`Listener`."""

    def __init__(
        self,
        client: EventSource,
        listener: Listener,
        *,
        backoff: tuple[float, float] = (BACKOFF_FIRST_S, BACKOFF_MAX_S),
    ) -> None:
        self._client = client
        self._guard = listener
        self._backoff = backoff
        self._stop = threading.Event()
        self._stream: Iterable[Event] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="attestd-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        delay = self._backoff[0]
        while not self._stop.is_set():
            try:
                stream = self._client.events(idle_timeout=EVENTS_IDLE_S)
            except ConfinferError as exc:
                self._guard.on_lost(exc.message)
            else:
                with self._lock:
                    self._stream = stream
                try:
                    for event in stream:
                        if self._stop.is_set():
                            break
                        self._guard.on_event(event)
                        delay = self._backoff[0]
                    else:
                        if not self._stop.is_set():
                            self._guard.on_lost("the event stream ended")
                except ConfinferError as exc:
                    if not self._stop.is_set():
                        self._guard.on_lost(exc.message)
                finally:
                    self._close_stream()
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self._backoff[1])
            self._guard.check()

    def _close_stream(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        close = getattr(stream, "close", None)
        if close is not None:
            close()

    def close(self) -> None:
        self._stop.set()
        self._close_stream()
        self._thread.join(5.0)
