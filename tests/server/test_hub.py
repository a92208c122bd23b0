"""The hub and the streams built on it, in process, on a real SQLite store.

A watcher that falls behind is dropped by the hub; the streams resubscribe and catch up
from the store, so the client sees every event once, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gyoza.models.op_run import OpRun
from gyoza.models.resources import EventDelivery
from gyoza.server.control import RunController
from gyoza.server.hub import Hub, HubClosed, SubscriptionDropped
from gyoza.server.services import run_streams
from gyoza.server.store.store import Store

T = TypeVar("T")


def run_async(test: Callable[[Store], Awaitable[None]], tmp_path: Path) -> None:
    async def main() -> None:
        store = await asyncio.to_thread(Store.open, f"sqlite:///{tmp_path / 'hub.db'}")
        try:
            await test(store)
        finally:
            await store.close()

    asyncio.run(main())


async def take(stream: AsyncIterator[T], count: int) -> list[T]:
    return [await asyncio.wait_for(anext(stream), 5) for _ in range(count)]


def test_a_full_queue_drops_the_subscriber() -> None:
    async def main() -> None:
        hub = Hub(queue_size=2)
        subscription = hub.subscribe_topic("t")
        record: Any = type("Record", (), {"topic": "t", "offset": 1})()
        for _ in range(3):
            hub.publish_topic([record])
        with pytest.raises(SubscriptionDropped):
            await subscription.get()
        assert subscription.dropped
        # It is no longer subscribed: publishing more costs it nothing.
        hub.publish_topic([record])
        hub.close()
        with pytest.raises(HubClosed):
            await hub.subscribe_run("r").get()

    asyncio.run(main())


def test_a_dropped_watch_catches_up_from_the_store(tmp_path: Path) -> None:
    async def main(store: Store) -> None:
        hub = Hub(queue_size=2)
        controller = RunController(store, hub)
        await controller.start()
        try:
            run = await controller.create_run(OpRun.create(image="busybox"))
            stream = run_streams.watch_run(store, hub, run.id, 0)
            snapshot = (await take(stream, 1))[0]
            history = await take(stream, snapshot.sequence)
            # Ten changes while the watcher does not read: its queue of 2 overflows.
            for priority in range(10):
                await controller.set_priority(run.id, priority)
            await controller.cancel_run(run.id)
            rest = [m async for m in stream]
            sequences = [m.sequence for m in (*history, *rest)]
            assert sequences == list(range(1, len(sequences) + 1))
            assert run_streams.watch_is_over(rest[-1].op_run)
        finally:
            await controller.stop()

    run_async(main, tmp_path)


def test_a_dropped_topic_subscriber_catches_up_from_the_store(tmp_path: Path) -> None:
    async def main(store: Store) -> None:
        hub = Hub(queue_size=1)
        controller = RunController(store, hub)
        await controller.start()

        async def ready() -> None:
            return None

        try:
            delivery = EventDelivery(topic="lagging", attributes={"a": "1"})
            runs = [
                await controller.create_run(OpRun.create(image="busybox", event_delivery=delivery))
                for _ in range(3)
            ]
            stream = run_streams.subscribe_topic(store, hub, "lagging", 0, False, ready)
            await controller.cancel_run(runs[0].id)
            first = (await take(stream, 1))[0]
            for run in runs[1:]:
                await controller.set_priority(run.id, 3)
                await controller.cancel_run(run.id)
            rest = await take(stream, 4)
            offsets = [first.offset, *(m.offset for m in rest)]
            assert offsets == sorted(set(offsets))
            assert [m.run_id for m in rest] == [runs[1].id] * 2 + [runs[2].id] * 2
            await stream.aclose()
        finally:
            await controller.stop()

    run_async(main, tmp_path)
