"""The streaming reads of OpRunService: watching a run, a topic, an attempt's log.

Each stream follows the same rule so that nothing is missed and nothing is sent twice:
subscribe to the hub *first*, then read the starting point from the store (which holds
everything committed before the subscription), then take live changes from the hub,
skipping what the read already covered (by sequence, offset or line number). When the hub
drops a subscriber that fell behind, the stream resubscribes and catches up from the
store by itself; the client sees no gap. When the server shuts down, the stream ends with
UNAVAILABLE and the position to resume from.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc

from gyoza import mapping
from gyoza.api.v1 import op_run_pb2, resources_pb2
from gyoza.api.v1 import op_run_service_pb2 as pb
from gyoza.models.op_run import OpRun
from gyoza.server.control import RunController
from gyoza.server.errors import ApiError
from gyoza.server.hub import Hub, HubClosed, SubscriptionDropped, TopicEntry
from gyoza.server.store.protocol import RunStore
from gyoza.server.store.records import LogRecord
from gyoza.server.topic_order import TopicFollower

Ready = Callable[[], Awaitable[None]]
"""Awaited by a stream once its subscription is in place."""

LOG_READ_LIMIT = 1000
"""Log lines read from the store at once."""

LOG_BATCH_BYTES = 1024 * 1024
"""Text per GetOpRunLogs message, well under the message size limit."""

_TERMINAL = frozenset(
    {
        resources_pb2.OP_RUN_STATE_COMPLETED,
        resources_pb2.OP_RUN_STATE_FAILED,
        resources_pb2.OP_RUN_STATE_CANCELLED,
    }
)


def watch_is_over(run: op_run_pb2.OpRun) -> bool:
    """True when the run is terminal for good: not a FAILED run waiting for a retry."""
    return run.state in _TERMINAL and not run.HasField("next_retry_time")


def _shutting_down(position_field: str, position: int) -> ApiError:
    return ApiError(
        grpc.StatusCode.UNAVAILABLE,
        "SERVER_SHUTTING_DOWN",
        f"the server is shutting down; resume with {position_field}={position}",
        {position_field: str(position)},
    )


def _history(run: OpRun, after: int) -> list[tuple[int, op_run_pb2.OpRunEvent]]:
    """Every event of *run* whose sequence is above *after*, in order, as messages."""
    found: list[tuple[int, op_run_pb2.OpRunEvent]] = []
    sequence = 0
    for attempt in run.attempts:
        for entry in attempt.events:
            sequence += 1
            if sequence > after:
                found.append((sequence, mapping.event_to_proto(entry, attempt.attempt)))
    return found


async def watch_run(
    store: RunStore, hub: Hub, run_id: str, after_sequence: int
) -> AsyncIterator[pb.WatchOpRunResponse]:
    """WatchOpRun: the snapshot, the events after *after_sequence*, then live changes.

    The snapshot is the committed run (read from the store, never the controller's
    in-memory copy, which may hold a change still being written).
    """
    sent = after_sequence  # highest event sequence the client has
    last_update = None  # update time of the last run sent, for changes without events
    first = True
    while True:
        try:
            async with hub.subscribe_run(run_id) as subscription:
                run = await store.get_run(run_id)
                snapshot = mapping.run_to_proto(run)
                history = _history(run, sent)
                if first:
                    first = False
                    yield pb.WatchOpRunResponse(sequence=snapshot.event_sequence, op_run=snapshot)
                    last_update = snapshot.update_time.ToNanoseconds()
                for sequence, event in history:
                    yield pb.WatchOpRunResponse(sequence=sequence, op_run=snapshot, event=event)
                    sent = sequence
                if watch_is_over(snapshot):
                    return
                async for change in subscription:
                    # The messages are built once per change and shared by its watchers.
                    updated = change.run.update_time.ToNanoseconds()
                    if not change.events and last_update is not None and updated > last_update:
                        yield change.snapshot()
                    if change.events and change.events[-1].sequence > sent:
                        for item, response in zip(change.events, change.responses(), strict=True):
                            if item.sequence > sent:
                                yield response
                                sent = item.sequence
                    last_update = max(last_update or 0, updated)
                    if watch_is_over(change.run):
                        return
        except HubClosed:
            raise _shutting_down("after_sequence", sent) from None
        except SubscriptionDropped:
            continue  # fell behind: resubscribe and catch up from the store


async def subscribe_topic(
    store: RunStore,
    hub: Hub,
    topic: str,
    after_offset: int,
    from_latest: bool,
    ready: Ready,
    *,
    max_batch: int = 1,
) -> AsyncIterator[pb.SubscribeEventsResponse]:
    """SubscribeEvents: the topic's durable log after the offset, then live records, in
    offset (commit) order, each once (:class:`~gyoza.server.topic_order.TopicFollower`).

    *ready* is awaited once the subscription is in place (the servicer sends the
    response headers then, so a client can tell that later events will reach it).
    With *max_batch* above 1, records ready at once share a response (the first in its
    own fields, the others in ``more``), up to *max_batch* records and about
    :data:`TOPIC_BATCH_BYTES` each.
    """
    follower = TopicFollower(store, hub, topic, after_offset)
    try:
        async for entries in follower.follow(from_latest=from_latest, ready=ready):
            if max_batch <= 1 or len(entries) == 1:
                for entry in entries:
                    yield entry.response()
            else:
                for response in _topic_batches(entries, max_batch):
                    yield response
    except HubClosed:
        raise _shutting_down("after_offset", follower.position) from None


TOPIC_BATCH_BYTES = 1024 * 1024
"""Encoded size after which a batched SubscribeEvents response takes no more records."""


def _topic_batches(
    entries: list[TopicEntry], max_batch: int
) -> Iterator[pb.SubscribeEventsResponse]:
    """*entries* as responses of up to *max_batch* records (the shared message alone when
    a response has one record)."""
    index, count = 0, len(entries)
    while index < count:
        first = entries[index]
        index += 1
        size = first.size()
        end = index
        while end < count and end - index + 1 < max_batch and size < TOPIC_BATCH_BYTES:
            size += entries[end].size()
            end += 1
        if end == index:
            yield first.response()
            continue
        response = pb.SubscribeEventsResponse()
        response.CopyFrom(first.response())
        response.more.extend([entry.response() for entry in entries[index:end]])
        index = end
        yield response


def _log_responses(
    records: list[LogRecord], attempt: int, dropped: int
) -> list[pb.GetOpRunLogsResponse]:
    """Lines as messages of at most about :data:`LOG_BATCH_BYTES` of text each."""
    responses: list[pb.GetOpRunLogsResponse] = []
    current = pb.GetOpRunLogsResponse(attempt=attempt, dropped_lines=dropped)
    size = 0
    for record in records:
        if current.lines and size + len(record.text) > LOG_BATCH_BYTES:
            responses.append(current)
            current = pb.GetOpRunLogsResponse(attempt=attempt)
            size = 0
        current.lines.append(
            op_run_pb2.LogLine(
                number=record.number,
                text=record.text,
                stream=mapping.log_stream_to_proto(record.stream),
                time=mapping.timestamp_to_proto(record.t),
            )
        )
        size += len(record.text)
    if current.lines or current.dropped_lines:
        responses.append(current)
    return responses


async def _attempt_over(controller: RunController, run_id: str, attempt: int) -> bool:
    run = await controller.get_run(run_id)
    return run.current_attempt != attempt or run.state.is_terminal


async def read_logs(
    controller: RunController,
    store: RunStore,
    hub: Hub,
    run_id: str,
    attempt: int,
    after_line: int,
    follow: bool,
    ready: Ready,
) -> AsyncIterator[pb.GetOpRunLogsResponse]:
    """GetOpRunLogs: the attempt's lines after *after_line*; with *follow*, until it ends.

    *ready* is awaited once a follower is subscribed.

    The follower checks whether the attempt is over *before* each read, so the last read
    after the end gets every line committed before it.
    """
    position = after_line
    signal = hub.subscribe_logs(run_id, attempt) if follow else None
    try:
        if signal is not None:
            await ready()
        while True:
            over = not follow or await _attempt_over(controller, run_id, attempt)
            while True:
                records, dropped = await store.read_logs(
                    run_id, attempt, after_line=position, limit=LOG_READ_LIMIT
                )
                for response in _log_responses(records, attempt, dropped):
                    yield response
                if records:
                    position = records[-1].number
                if len(records) < LOG_READ_LIMIT:
                    break
            if over or signal is None:
                return
            try:
                await signal.wait()
            except HubClosed:
                raise _shutting_down("after_line", position) from None
    finally:
        if signal is not None:
            signal.close()
