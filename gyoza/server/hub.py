"""Fan-out of committed changes to in-process watchers (WatchOpRun, SubscribeEvents, logs).

The run controller calls the ``publish_*`` methods after each commit; streaming RPCs
subscribe here. Publishing never blocks and never fails the writer: a watcher that falls
too far behind is dropped (its next read raises :class:`SubscriptionDropped`) and must
resume from its last sequence or offset, which the durable store always allows.

All methods run on the event loop thread: the controller publishes from its coroutines.

A streaming RPC subscribes *before* it reads its starting point (a run snapshot, a topic
backlog, the log lines so far) from the store, then skips what that read covered: so no
change committed in between is missed and none is sent twice.

What subscribers send is converted to its message once per publish, on first use, and
shared by every subscriber (:class:`TopicEntry`, :class:`RunChange`): a published change
costs one conversion however many streams follow it. The hub also remembers which topic
offsets it was given (:class:`~gyoza.server.topic_order.PublishedOffsets`), so that a
topic stream can tell when the records it holds follow the last one it sent with nothing
missing in between (:mod:`gyoza.server.topic_order`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from gyoza import mapping
from gyoza.api.v1 import op_run_pb2
from gyoza.api.v1 import op_run_service_pb2 as service_pb
from gyoza.models.op_run import OpRun
from gyoza.models.resources import EventEntry
from gyoza.server import metrics
from gyoza.server.topic_order import PublishedOffsets

if TYPE_CHECKING:
    from gyoza.server.store.records import TopicRecord

log = logging.getLogger("gyoza.server.hub")

DEFAULT_QUEUE_SIZE = 1024
"""Changes a watcher may have waiting before it is dropped as too slow."""

T = TypeVar("T")


class SubscriptionDropped(Exception):
    """The subscriber fell behind (or the hub closed); resume from the last position."""


class HubClosed(SubscriptionDropped):
    """The hub was closed because the server is shutting down."""


@dataclass(frozen=True)
class SequencedEvent:
    """An event with its place in the run's whole history.

    Attributes
    ----------
    sequence : int
        Position of the event among every event of every attempt (1-based): the
        ``sequence`` of WatchOpRun.
    event : op_run_pb2.OpRunEvent
        The event.
    """

    sequence: int
    event: op_run_pb2.OpRunEvent


class RunChange:
    """One committed change of a run, as watchers receive it.

    Attributes
    ----------
    run : op_run_pb2.OpRun
        The run after the change (shared by every watcher: do not modify).
    events : tuple[SequencedEvent, ...]
        The events the change committed, in order; empty for a change without events
        (a new priority, for one).
    """

    __slots__ = ("_responses", "_snapshot", "events", "run")

    def __init__(self, run: op_run_pb2.OpRun, events: tuple[SequencedEvent, ...]) -> None:
        self.run = run
        self.events = events
        self._responses: tuple[service_pb.WatchOpRunResponse, ...] | None = None
        self._snapshot: service_pb.WatchOpRunResponse | None = None

    def responses(self) -> tuple[service_pb.WatchOpRunResponse, ...]:
        """One WatchOpRun message per event, built once and shared: do not modify."""
        if self._responses is None:
            self._responses = tuple(
                service_pb.WatchOpRunResponse(
                    sequence=item.sequence, op_run=self.run, event=item.event
                )
                for item in self.events
            )
        return self._responses

    def snapshot(self) -> service_pb.WatchOpRunResponse:
        """The WatchOpRun message of the run alone, built once and shared."""
        if self._snapshot is None:
            self._snapshot = service_pb.WatchOpRunResponse(
                sequence=self.run.event_sequence, op_run=self.run
            )
        return self._snapshot


class TopicEntry:
    """A published topic record and its SubscribeEvents message, built once on first use.

    Attributes
    ----------
    record : TopicRecord
        The committed record.
    offset : int
        Its offset.
    """

    __slots__ = ("_response", "_size", "offset", "record")

    def __init__(self, record: TopicRecord) -> None:
        self.record = record
        self.offset = record.offset
        self._response: service_pb.SubscribeEventsResponse | None = None
        self._size = -1

    def size(self) -> int:
        """The encoded size of :meth:`response`, in bytes (computed once)."""
        if self._size < 0:
            self._size = self.response().ByteSize()
        return self._size

    def response(self) -> service_pb.SubscribeEventsResponse:
        """The message every subscriber sends (shared: do not modify)."""
        if self._response is None:
            self._response = topic_response(self.record)
        return self._response

    def __lt__(self, other: TopicEntry) -> bool:
        return self.offset < other.offset


def topic_response(record: TopicRecord) -> service_pb.SubscribeEventsResponse:
    """The SubscribeEvents message of one topic record."""
    message = service_pb.SubscribeEventsResponse(
        offset=record.offset,
        topic=record.topic,
        run_id=record.run_id,
        run_state=mapping.state_to_proto(record.run_state),
        op_definition=record.op_definition or "",
    )
    mapping.fill_event(message.event, record.event, record.attempt)
    if record.attributes:
        message.attributes.update(record.attributes)
    return message


class Subscription(Generic[T]):
    """A bounded queue of published items for one watcher.

    Use it as an async context manager (so it is removed from the hub when done) and
    read it with :meth:`get` or ``async for``.
    """

    def __init__(self, remove: Callable[[Subscription[T]], None], maxsize: int) -> None:
        self._queue: asyncio.Queue[T] = asyncio.Queue(maxsize)
        self._remove = remove
        self._failure: SubscriptionDropped | None = None
        self._wakeup = asyncio.Event()

    @property
    def dropped(self) -> bool:
        """True once the subscription was dropped or closed by the hub."""
        return self._failure is not None

    def offer(self, item: T) -> None:
        """Queue *item*, or drop the subscription when its queue is full."""
        if self._failure is not None:
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            metrics.HUB_DROPPED_SUBSCRIBERS.inc()
            self.fail(SubscriptionDropped("the subscriber fell behind and was dropped"))
        else:
            self._wakeup.set()

    def fail(self, failure: SubscriptionDropped) -> None:
        """End the subscription: the next read raises *failure*."""
        if self._failure is None:
            self._failure = failure
            self._remove(self)
            self._wakeup.set()

    def get_nowait(self) -> T | None:
        """The next queued item, or ``None`` when there is none right now.

        Raises
        ------
        SubscriptionDropped
            When the subscription was dropped; queued items are then discarded.
        """
        if self._failure is not None:
            raise self._failure
        try:
            return self._queue.get_nowait()
        except asyncio.QueueEmpty:
            return None

    async def get(self) -> T:
        """Wait for the next item.

        Raises
        ------
        SubscriptionDropped
            When the subscription was dropped or the hub closed.
        """
        while True:
            item = self.get_nowait()
            if item is not None:
                return item
            self._wakeup.clear()
            await self._wakeup.wait()

    def close(self) -> None:
        """Stop receiving items."""
        self._remove(self)

    async def __aenter__(self) -> Subscription[T]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __aiter__(self) -> Subscription[T]:
        return self

    async def __anext__(self) -> T:
        return await self.get()


class LogSignal:
    """Wakes a log follower of one attempt: new lines were committed, or its run changed.

    A change of the run wakes it too, so that it notices when its attempt ends.
    Notifications coalesce: a follower that is slow simply reads more lines at once,
    so a log signal is never dropped.
    """

    def __init__(self, attempt: int, remove: Callable[[LogSignal], None]) -> None:
        self.attempt = attempt
        self._remove = remove
        self._event = asyncio.Event()
        self._closed = False
        self.last_number = 0

    def notify(self, last_number: int = 0) -> None:
        """Lines up to *last_number* are committed (0: only the run changed)."""
        self.last_number = max(self.last_number, last_number)
        self._event.set()

    def close_by_hub(self) -> None:
        """The hub is closing: wake the follower so it ends."""
        self._closed = True
        self._event.set()

    async def wait(self) -> int:
        """Wait until new lines may exist; return the newest line number known.

        Raises
        ------
        HubClosed
            When the server is shutting down.
        """
        await self._event.wait()
        if self._closed:
            raise HubClosed("the server is shutting down")
        self._event.clear()
        return self.last_number

    def close(self) -> None:
        """Stop receiving notifications."""
        self._remove(self)

    async def __aenter__(self) -> LogSignal:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class Hub:
    """In-process publish/subscribe of run changes, topic events and log lines.

    Parameters
    ----------
    queue_size : int
        Items a watcher may have waiting before it is dropped.
    """

    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        self._queue_size = queue_size
        self._runs: dict[str, set[Subscription[RunChange]]] = {}
        self._topics: dict[str, set[Subscription[TopicEntry]]] = {}
        self.published_offsets = PublishedOffsets()
        """Every topic offset published here (the newest ranges)."""
        self._logs: dict[str, set[LogSignal]] = {}
        self._run_listeners: list[Callable[[OpRun], None]] = []
        self._closed = False

    def add_run_listener(self, listener: Callable[[OpRun], None]) -> None:
        """Call *listener* with every published run, synchronously (metrics use it).

        The run is the controller's live object: a listener must read what it needs at
        once and keep no reference.
        """
        self._run_listeners.append(listener)

    # -- publishing (called by the run controller after each commit) ---------------------

    def publish_run(self, run: OpRun, new_events: Sequence[tuple[int, EventEntry]]) -> None:
        """A run changed; ``new_events`` are the ``(attempt, event)`` pairs it committed.

        The run is converted once, here, for every watcher, so the controller may keep
        changing its live object afterwards.
        """
        for listener in self._run_listeners:
            try:
                listener(run)
            except Exception:  # a metrics bug must not fail the commit path
                log.exception("run listener failed", extra={"run_id": run.id})
        for signal in list(self._logs.get(run.id, ())):
            signal.notify()
        watchers = self._runs.get(run.id)
        if not watchers:
            return
        try:
            change = RunChange(
                run=mapping.run_to_proto(run),
                events=tuple(_sequenced(run, attempt, entry) for attempt, entry in new_events),
            )
        except Exception:
            # Never fail the writer: the watchers start over from the store instead.
            log.exception("cannot publish a run change", extra={"run_id": run.id})
            for watcher in list(watchers):
                watcher.fail(SubscriptionDropped("a change could not be published"))
            return
        for watcher in list(watchers):
            watcher.offer(change)

    def publish_topic(self, records: Sequence[TopicRecord]) -> None:
        """Events were committed to the durable topic log.

        Each record reaches its topic's subscribers as one :class:`TopicEntry`, whose
        message is built once, by the first subscriber that sends it.
        """
        published = self.published_offsets
        topics = self._topics
        for record in records:
            published.add(record.offset)
            subscribers = topics.get(record.topic)
            if subscribers:
                entry = TopicEntry(record)
                for subscriber in list(subscribers):
                    subscriber.offer(entry)

    def publish_logs(self, run_id: str, attempt: int, last_number: int) -> None:
        """Log lines up to ``last_number`` were committed for an attempt."""
        for signal in list(self._logs.get(run_id, ())):
            if signal.attempt == attempt:
                signal.notify(last_number)

    # -- subscribing ---------------------------------------------------------------------

    def subscribe_run(self, run_id: str) -> Subscription[RunChange]:
        """Receive every change of one run committed from now on."""
        return self._subscribe(self._runs, run_id)

    def subscribe_topic(self, topic: str) -> Subscription[TopicEntry]:
        """Receive every topic record of *topic* committed from now on."""
        return self._subscribe(self._topics, topic)

    def subscribe_logs(self, run_id: str, attempt: int) -> LogSignal:
        """Be woken when log lines of one attempt are committed or its run changes."""

        def remove(signal: LogSignal) -> None:
            signals = self._logs.get(run_id)
            if signals is not None:
                signals.discard(signal)
                if not signals:
                    del self._logs[run_id]

        signal = LogSignal(attempt, remove)
        if self._closed:
            signal.close_by_hub()
        else:
            self._logs.setdefault(run_id, set()).add(signal)
        return signal

    def _subscribe(self, table: dict[str, set[Subscription[T]]], key: str) -> Subscription[T]:
        def remove(subscription: Subscription[T]) -> None:
            subscribers = table.get(key)
            if subscribers is not None and subscription in subscribers:
                subscribers.discard(subscription)
                metrics.HUB_SUBSCRIBERS.dec()
                if not subscribers:
                    del table[key]

        subscription: Subscription[T] = Subscription(remove, self._queue_size)
        table.setdefault(key, set()).add(subscription)
        metrics.HUB_SUBSCRIBERS.inc()
        if self._closed:
            subscription.fail(HubClosed("the server is shutting down"))
        return subscription

    def close(self) -> None:
        """End every subscription: the server is shutting down."""
        self._closed = True
        closing: list[Subscription[RunChange] | Subscription[TopicEntry]] = [
            *(s for subscribers in self._runs.values() for s in subscribers),
            *(s for subscribers in self._topics.values() for s in subscribers),
        ]
        for subscription in closing:
            subscription.fail(HubClosed("the server is shutting down"))
        for signals in list(self._logs.values()):
            for signal in list(signals):
                signal.close_by_hub()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._closed


def _sequenced(run: OpRun, attempt: int, entry: EventEntry) -> SequencedEvent:
    """The event with its position among every event of every attempt of *run*."""
    return SequencedEvent(
        sequence=history_sequence(run, attempt, entry.seq),
        event=mapping.event_to_proto(entry, attempt),
    )


def history_sequence(run: OpRun, attempt: int, seq: int) -> int:
    """Position of event *seq* of *attempt* among every event of every attempt of *run*."""
    before = sum(len(a.events) for a in run.attempts if a.attempt < attempt)
    return before + seq
