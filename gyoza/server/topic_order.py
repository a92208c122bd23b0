"""Topic records in commit order: where that guarantee is kept.

Two halves make it. The store gives offsets in commit order
(:class:`~gyoza.server.store.protocol.RunStore`; on PostgreSQL every transaction that
appends to the topic log holds one advisory lock, so offsets become visible in the order
they were taken, even across replicas). The hub publishes what commits, but not always
in offset order (two runs of one group commit resume in either order) and not always
everything (records written by another process, or while nobody listened): this module
turns that into a gap-free, in-order stream per subscriber, reading the store only when
it must.
"""

from __future__ import annotations

import heapq
from bisect import bisect_right
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gyoza.server.hub import Hub, Subscription, TopicEntry
    from gyoza.server.store.protocol import RunStore

#: Topic records read from the store at once.
TOPIC_READ_LIMIT = 500


class PublishedOffsets:
    """The topic offsets (of every topic) the hub was given, as disjoint ranges.

    Offsets are given in commit order but not always published in it (two runs of one
    group commit resume in either order), and some committed records are never published
    here (written by another process, or by a call that did not publish them). A topic
    stream that has sent everything of its topic up to offset ``a`` may send a record at
    offset ``b`` straight away when every offset between them was published: a record of
    its topic among them would have reached it.

    Only the newest ``max_ranges`` ranges are kept: forgetting older ones is safe (a
    stream then reads the store instead).
    """

    def __init__(self, max_ranges: int = 256) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._max_ranges = max_ranges

    def add(self, offset: int) -> None:
        """Offset *offset* was published."""
        starts, ends = self._starts, self._ends
        if ends and offset == ends[-1] + 1:
            ends[-1] = offset  # the usual case: the next offset
            return
        index = bisect_right(starts, offset)
        if index and offset <= ends[index - 1]:
            return  # known already
        joins_left = index > 0 and ends[index - 1] == offset - 1
        joins_right = index < len(starts) and starts[index] == offset + 1
        if joins_left and joins_right:
            ends[index - 1] = ends[index]
            del starts[index], ends[index]
        elif joins_left:
            ends[index - 1] = offset
        elif joins_right:
            starts[index] = offset
        else:
            starts.insert(index, offset)
            ends.insert(index, offset)
            if len(starts) > self._max_ranges:
                del starts[0], ends[0]

    def contiguous_end(self, after: int) -> int:
        """The highest offset ``b >= after`` such that every offset in ``(after, b]`` was
        published; *after* itself when ``after + 1`` was not."""
        index = bisect_right(self._starts, after + 1)
        if index and self._ends[index - 1] > after:
            return self._ends[index - 1]
        return after


class TopicFollower:
    """One subscriber's view of a topic: every record after an offset, in offset
    (commit) order, each once.

    Parameters
    ----------
    store : RunStore
        The durable topic log.
    hub : Hub
        Live records.
    topic : str
        The topic.
    after_offset : int
        Records up to this offset are not wanted.

    Attributes
    ----------
    position : int
        The last offset handed out (or skipped, when following from the latest).
    """

    def __init__(self, store: RunStore, hub: Hub, topic: str, after_offset: int) -> None:
        self.store = store
        self.hub = hub
        self.topic = topic
        self.position = after_offset

    async def follow(
        self, *, from_latest: bool, ready: Callable[[], Awaitable[None]]
    ) -> AsyncIterator[list[TopicEntry]]:
        """The records, backlog then live, in lists of those ready at once (never
        empty); runs until the hub closes.

        *ready* is awaited once the subscription is in place. With *from_latest* the
        backlog is skipped: only records committed from then on come.

        Records go out in offset (commit) order, each once. The follower keeps ``covered``:
        every record of its topic at or below it was sent. Live records come from the hub,
        which may publish them out of offset order (two runs committed in one group resume
        in either order); it holds them sorted and sends those below the first
        offset the hub has not published (:meth:`PublishedOffsets.contiguous_end`): a record
        of this topic before them would have reached it. When a held record waits on an
        offset the hub never got (a record another caller did not publish, or one published
        while this follower was not subscribed), it reads the store: every offset below
        a published one is committed, so that read fills the gap.

        It reads the store at the start, after being dropped for falling behind, and to fill
        such a gap; never for a record the hub handed it in order.

        Raises
        ------
        HubClosed
            When the hub closes (the server is stopping); :attr:`position` says where
            to resume.
        """
        # The hub imports PublishedOffsets from here: import it back at call time.
        from gyoza.server.hub import HubClosed, SubscriptionDropped, TopicEntry

        store, hub, topic = self.store, self.hub, self.topic
        position = self.position
        first = True
        while True:
            try:
                async with hub.subscribe_topic(topic) as subscription:
                    must_read = True
                    if first:
                        if from_latest:
                            self.position = position = await store.latest_offset()
                            must_read = False  # later records reach the subscription
                        await ready()
                        first = False
                    covered = position
                    held: list[TopicEntry] = []  # live records not sent yet, a heap by offset
                    while True:
                        if must_read:
                            # Every held record is committed, and so is everything before it.
                            high = max((entry.offset for entry in held), default=position)
                            while True:
                                records = await store.read_topic(
                                    topic, after_offset=position, limit=TOPIC_READ_LIMIT
                                )
                                if records:
                                    yield [TopicEntry(record) for record in records]
                                    self.position = position = records[-1].offset
                                if len(records) < TOPIC_READ_LIMIT:
                                    break
                            covered = max(position, high)
                            held.clear()
                            must_read = False
                        _take_queued(subscription, held, covered)
                        while held:
                            end = hub.published_offsets.contiguous_end(covered)
                            if held[0].offset > end:
                                break  # an offset before it was never published here
                            ready_now: list[TopicEntry] = []
                            while held and held[0].offset <= end:
                                ready_now.append(heapq.heappop(held))
                            yield ready_now
                            self.position = position = ready_now[-1].offset
                            # What was queued meanwhile is above end: all below was held.
                            _take_queued(subscription, held, end)
                            covered = end
                        if held:
                            must_read = True
                            continue
                        covered = hub.published_offsets.contiguous_end(covered)
                        entry = await subscription.get()
                        if entry.offset > covered:
                            heapq.heappush(held, entry)
            except HubClosed:
                raise  # a SubscriptionDropped too, but there is nothing to resubscribe to
            except SubscriptionDropped:
                continue  # resubscribe, then catch up from the store


def _take_queued(
    subscription: Subscription[TopicEntry], held: list[TopicEntry], covered: int
) -> None:
    """Move the subscription's queued records above *covered* into the *held* heap."""
    while (entry := subscription.get_nowait()) is not None:
        if entry.offset > covered:
            heapq.heappush(held, entry)
