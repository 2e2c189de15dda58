"""The event hub: order, fan-out, closing, and the subscriber that falls behind."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from attestd.events import EventHub, Subscription
from confinfer.attestd_api import Event, State
from confinfer.errors import Reason

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

T = TypeVar("T")

CURRENT = Event(State.HEALTHY, Reason.ATTESTD_HEALTHY, "attested", 100.0, None)


def change(n: int) -> Event:
    return Event(State.DEGRADED, Reason.MAA_UNAVAILABLE, f"MAA unreachable ({n})", 200.0 + n, None)


def run(body: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await body()

    return asyncio.run(main())


async def take(subscription: Subscription, count: int) -> list[Event]:
    out = []
    async for event in subscription:
        out.append(event)
        if len(out) == count:
            break
    return out


async def drained(subscription: Subscription) -> list[Event]:
    return [event async for event in subscription]


def test_current_state_first_then_published_in_order() -> None:
    async def body() -> None:
        hub = EventHub()
        subscription = hub.subscribe(CURRENT)
        for n in range(5):
            hub.publish(change(n))
        assert await take(subscription, 6) == [CURRENT, *map(change, range(5))]

    run(body)


def test_each_subscriber_gets_every_event_from_when_it_subscribed() -> None:
    async def body() -> None:
        hub = EventHub()
        early = hub.subscribe(CURRENT)
        hub.publish(change(1))
        late = hub.subscribe(change(1))
        hub.publish(change(2))
        assert hub.subscribers == 2
        assert await take(early, 3) == [CURRENT, change(1), change(2)]
        assert await take(late, 2) == [change(1), change(2)]

    run(body)


def test_a_waiting_subscriber_wakes_on_publish() -> None:
    async def body() -> None:
        hub = EventHub()
        subscription = hub.subscribe(CURRENT)
        assert await take(subscription, 1) == [CURRENT]
        waiting = asyncio.create_task(take(subscription, 1))
        await asyncio.sleep(0)
        assert not waiting.done()
        hub.publish(change(1))
        assert await waiting == [change(1)]

    run(body)


def test_close_ends_a_waiting_iteration_and_unsubscribes() -> None:
    async def body() -> None:
        hub = EventHub()
        subscription = hub.subscribe(CURRENT)
        assert await take(subscription, 1) == [CURRENT]
        waiting = asyncio.create_task(drained(subscription))
        await asyncio.sleep(0)
        subscription.close()
        subscription.close()  # idempotent
        assert await waiting == []
        assert subscription.closed
        assert not subscription.overflowed
        assert hub.subscribers == 0
        hub.publish(change(1))  # nobody left: nothing happens
        assert await drained(subscription) == []

    run(body)


def test_hub_close_ends_every_subscription() -> None:
    async def body() -> None:
        hub = EventHub()
        subscriptions = [hub.subscribe(CURRENT) for _ in range(3)]
        hub.close()
        assert hub.subscribers == 0
        for subscription in subscriptions:
            assert await drained(subscription) == []

    run(body)


def test_a_subscriber_that_falls_behind_is_closed_and_the_rest_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        hub = EventHub(queue_size=3)
        slow = hub.subscribe(CURRENT)
        fast = hub.subscribe(CURRENT)
        hub.publish(change(1))
        hub.publish(change(2))
        assert await take(fast, 3) == [CURRENT, change(1), change(2)]
        hub.publish(change(3))  # slow holds three already: it is closed, fast is not
        assert slow.closed and slow.overflowed
        assert hub.subscribers == 1
        # What slow had queued is dropped: it must reconnect rather than read a gap.
        assert await drained(slow) == []
        hub.publish(change(4))
        assert await take(fast, 2) == [change(3), change(4)]
        assert not fast.closed

    run(body)
    assert any("fell 3 events behind" in r.getMessage() for r in caplog.records)


def test_a_timed_out_wait_loses_no_event() -> None:
    async def body() -> None:
        hub = EventHub()
        subscription = hub.subscribe(CURRENT)
        events = aiter(subscription)
        assert await anext(events) == CURRENT
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(events), 0.001)
        hub.publish(change(1))
        assert await anext(events) == change(1)

    run(body)


def test_queue_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EventHub(queue_size=0)
