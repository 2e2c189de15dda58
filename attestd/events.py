"""The event hub: attestd's state changes, fanned out to every ``/v1/events`` stream.

The daemon publishes one :class:`~confinfer.attestd_api.Event` per state change; each stream
holds a :class:`Subscription`, an async iterator that yields the state at the time it
subscribed, then every event published after, in order.

A subscriber never slows the publisher down, and never silently misses an event: one whose
queue is full when an event comes is closed (``overflowed``), so its stream ends and its client
must reconnect, and the first line it then reads is the state as it is. A consumer that acts on
revocation therefore either sees every change or sees its stream end, never a gap.

Everything here runs on the event loop's thread; nothing is thread-safe.
"""

from __future__ import annotations

import asyncio
import collections
import logging

from confinfer.attestd_api import Event

LOG = logging.getLogger("attestd.events")


class Subscription:
    """One subscriber's queue: ``async for event in subscription``. It ends when closed (by
    :meth:`close`, by the hub, or on overflow); whatever was queued then is dropped."""

    def __init__(self, hub: EventHub, current: Event, queue_size: int) -> None:
        self._hub = hub
        self._queue: collections.deque[Event] = collections.deque([current])
        self._queue_size = queue_size
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._overflowed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def overflowed(self) -> bool:
        """Closed because an event came while its queue was full."""
        return self._overflowed

    def _offer(self, event: Event) -> None:
        if self._closed:
            return
        if len(self._queue) >= self._queue_size:
            self._overflowed = True
            self.close()
            return
        self._queue.append(event)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        """End the iteration (idempotent); a waiting ``__anext__`` stops at once."""
        if self._closed:
            return
        self._closed = True
        self._queue.clear()
        self._hub._forget(self)
        self._wake()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while not self._closed:
            if self._queue:
                return self._queue.popleft()
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        raise StopAsyncIteration


class EventHub:
    """Fan-out of published events to the current subscribers, each with its own queue of at
    most ``queue_size`` events."""

    def __init__(self, *, queue_size: int = 64) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, not {queue_size!r}")
        self._queue_size = queue_size
        self._subscriptions: set[Subscription] = set()

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    def subscribe(self, current: Event) -> Subscription:
        """A new subscription whose first event is ``current``, the state as it is now."""
        subscription = Subscription(self, current, self._queue_size)
        self._subscriptions.add(subscription)
        return subscription

    def publish(self, event: Event) -> None:
        """Queue ``event`` for every subscriber; never blocks. A subscriber whose queue is full
        is closed instead."""
        for subscription in list(self._subscriptions):
            subscription._offer(event)
            if subscription.overflowed:
                LOG.warning(
                    "an event stream fell %d events behind and was closed; its client must "
                    "reconnect",
                    self._queue_size,
                )

    def close(self) -> None:
        """Close every subscription: each stream ends."""
        for subscription in list(self._subscriptions):
            subscription.close()

    def _forget(self, subscription: Subscription) -> None:
        self._subscriptions.discard(subscription)


__all__ = ["EventHub", "Subscription"]
