"""The hub and the streams built on it, in process, on a real SQLite store.

A watcher that falls behind is dropped by the hub; the streams resubscribe and catch up
from the store, so the client sees every event once, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gyoza.models.op_run import OpRun
from gyoza.models.resources import EventDelivery, EventEntry
from gyoza.models.timestamps import utc_now
from gyoza.server.bootstrap import build_core
from gyoza.server.hub import Hub, HubClosed, SubscriptionDropped
from gyoza.server.services import run_streams
from gyoza.server.store.records import TopicRecord
from gyoza.server.store.store import Store
from gyoza.server.topic_order import PublishedOffsets, TopicFollower

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
        controller = build_core(store, hub=hub).controller
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
        controller = build_core(store, hub=hub).controller
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


def test_published_offsets_track_ranges_given_in_any_order() -> None:
    published = PublishedOffsets(max_ranges=3)
    assert published.contiguous_end(0) == 0
    for offset in (1, 2, 3, 5, 7, 6):
        published.add(offset)
    assert published.contiguous_end(0) == 3  # 4 is missing
    assert published.contiguous_end(2) == 3
    assert published.contiguous_end(3) == 3
    assert published.contiguous_end(4) == 7
    published.add(4)  # joins both neighbours
    assert published.contiguous_end(0) == 7
    published.add(4)  # again: nothing changes
    for offset in (10, 20, 30):  # four ranges: the oldest is forgotten
        published.add(offset)
    assert published.contiguous_end(0) == 0
    assert published.contiguous_end(9) == 10
    assert published.contiguous_end(29) == 30


class FakeTopicStore:
    """The topic log of a store: committed records, and how often it was read."""

    def __init__(self) -> None:
        self.records: list[TopicRecord] = []
        self.reads = 0

    def commit(self, topic: str, count: int = 1) -> list[TopicRecord]:
        new = [
            TopicRecord(
                offset=len(self.records) + 1 + i,
                topic=topic,
                run_id="r",
                attempt=1,
                event=EventEntry(t=utc_now(), type="PROGRESS", msg=i, seq=i + 1),
            )
            for i in range(count)
        ]
        self.records.extend(new)
        return new

    async def read_topic(
        self, topic: str, *, after_offset: int = 0, limit: int = 500
    ) -> list[TopicRecord]:
        self.reads += 1
        found = [r for r in self.records if r.topic == topic and r.offset > after_offset]
        return found[:limit]

    async def latest_offset(self) -> int:
        return len(self.records)


async def _ready() -> None:
    return None


def test_a_topic_stream_sends_live_records_without_reading_the_store() -> None:
    async def main() -> None:
        hub = Hub()
        store = FakeTopicStore()
        stream: Any = run_streams.subscribe_topic(store, hub, "t", 0, False, _ready)
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        assert store.reads == 1  # the backlog
        for _ in range(3):
            hub.publish_topic(store.commit("t", 2))
            store.commit("other")
            hub.publish_topic(store.records[-1:])
        received = [(await first).offset, *[m.offset for m in await take(stream, 5)]]
        assert received == [1, 2, 4, 5, 7, 8]
        assert store.reads == 1
        await stream.aclose()

    asyncio.run(main())


def test_a_topic_stream_reorders_records_published_out_of_order() -> None:
    async def main() -> None:
        hub = Hub()
        store = FakeTopicStore()
        hub.publish_topic(store.commit("t"))
        stream: Any = run_streams.subscribe_topic(store, hub, "t", 0, False, _ready)
        assert (await take(stream, 1))[0].offset == 1
        a, b, c = store.commit("t", 3)
        for record in (c, a, b):
            hub.publish_topic([record])
        assert [m.offset for m in await take(stream, 3)] == [2, 3, 4]
        assert store.reads == 1
        # One still unpublished when the stream runs: the store has it, once.
        d, e = store.commit("t", 2)
        hub.publish_topic([e])
        assert [m.offset for m in await take(stream, 2)] == [5, 6]
        assert store.reads == 2
        hub.publish_topic([d])
        hub.publish_topic(store.commit("t"))
        assert [m.offset for m in await take(stream, 1)] == [7]
        assert store.reads == 2
        await stream.aclose()

    asyncio.run(main())


def test_a_topic_stream_reads_the_store_for_a_record_never_published() -> None:
    async def main() -> None:
        hub = Hub()
        store = FakeTopicStore()
        stream: Any = run_streams.subscribe_topic(store, hub, "t", 0, False, _ready)
        pending = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        hub.publish_topic(store.commit("t"))
        assert (await pending).offset == 1
        store.commit("t")  # committed by someone who does not publish
        hub.publish_topic(store.commit("t"))
        received = [m.offset for m in await take(stream, 2)]
        assert received == [2, 3]
        assert store.reads == 2
        # The gap is filled for good: later records need no read.
        hub.publish_topic(store.commit("t"))
        assert (await take(stream, 1))[0].offset == 4
        assert store.reads == 2
        await stream.aclose()

    asyncio.run(main())


def test_a_topic_stream_from_latest_needs_no_backlog_read() -> None:
    async def main() -> None:
        hub = Hub()
        store = FakeTopicStore()
        store.commit("t", 3)
        stream: Any = run_streams.subscribe_topic(store, hub, "t", 0, True, _ready)
        pending = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        hub.publish_topic(store.commit("t"))
        assert (await pending).offset == 4
        assert store.reads == 0
        await stream.aclose()

    asyncio.run(main())


def test_topic_messages_are_built_once_for_every_subscriber() -> None:
    async def main() -> None:
        hub = Hub()
        store = FakeTopicStore()
        streams: list[Any] = [
            run_streams.subscribe_topic(store, hub, "t", 0, True, _ready) for _ in range(3)
        ]
        pending = [asyncio.ensure_future(anext(s)) for s in streams]
        await asyncio.sleep(0)
        hub.publish_topic(store.commit("t"))
        messages = [await p for p in pending]
        assert all(m is messages[0] for m in messages)
        assert messages[0].offset == 1 and messages[0].event.progress == 0
        for stream in streams:
            await stream.aclose()

    asyncio.run(main())


def test_run_changes_are_converted_once_and_only_when_watched() -> None:
    async def main() -> None:
        hub = Hub()
        run = OpRun.create(image="busybox")
        event = EventEntry(t=utc_now(), type="PROGRESS", msg=5, seq=1)
        run.current_op_attempt.events.append(event)
        calls: list[str] = []
        hub.add_run_listener(lambda r: calls.append(r.id))
        hub.publish_run(run, [(1, event)])  # nobody watches: a listener call only
        assert calls == [run.id]
        first, second = hub.subscribe_run(run.id), hub.subscribe_run(run.id)
        hub.publish_run(run, [(1, event)])
        a, b = await first.get(), await second.get()
        assert a is b
        assert a.responses()[0] is b.responses()[0]
        assert a.responses()[0].sequence == 1 and a.responses()[0].op_run.id == run.id
        assert a.snapshot() is b.snapshot()
        first.close()
        second.close()

    asyncio.run(main())


@pytest.mark.parametrize("seed", range(20))
def test_a_topic_stream_sends_every_record_once_in_order_whatever_the_publish_order(
    seed: int,
) -> None:
    """Groups committed together and published in any order, records never published,
    a queue small enough to drop the subscriber: the stream still sends the topic's log."""
    rng = random.Random(seed)

    async def main() -> None:
        hub = Hub(queue_size=rng.choice([2, 8, 1024]))
        store = FakeTopicStore()
        store.commit("t", rng.randrange(4))  # a backlog
        stream: Any = run_streams.subscribe_topic(store, hub, "t", 0, False, _ready)
        received: list[int] = []

        async def consume() -> None:
            async for message in stream:
                received.append(message.offset)

        consumer = asyncio.ensure_future(consume())
        await asyncio.sleep(0)
        for _ in range(40):
            group = [
                record
                for _ in range(rng.randrange(1, 5))
                for record in store.commit(rng.choice(["t", "t", "other"]))
            ]
            rng.shuffle(group)
            unpublished = rng.random() < 0.1
            for record in group[1:] if unpublished else group:
                hub.publish_topic([record])
                if rng.random() < 0.3:
                    await asyncio.sleep(0)
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
        last = store.commit("t")
        hub.publish_topic(last)
        expected = [r.offset for r in store.records if r.topic == "t"]
        for _ in range(1000):
            if received[-1:] == [last[0].offset]:
                break
            await asyncio.sleep(0)
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        await stream.aclose()
        assert received == expected

    asyncio.run(main())


def test_a_topic_follower_ends_when_the_hub_closes() -> None:
    # HubClosed is a SubscriptionDropped: the follower must not resubscribe to it.
    async def main() -> None:
        hub = Hub()
        store = FakeTopicStore()
        hub.publish_topic(store.commit("t"))
        follower = TopicFollower(store, hub, "t", 0)  # type: ignore[arg-type]
        stream = follower.follow(from_latest=False, ready=_ready)
        assert [entry.offset for entry in await anext(stream)] == [1]
        waiting = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        hub.close()
        with pytest.raises(HubClosed):
            await waiting
        assert follower.position == 1

    asyncio.run(main())
