"""WatchOpRun, SubscribeEvents and GetOpRunLogs against the real server.

Runs end by cancel (no agent needed) or through a scripted agent on the real
AgentService stream, which reports events and log lines like a real one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from gyoza.api.v1 import op_run_service_pb2 as pb
from gyoza.api.v1 import resources_pb2

ExpectError = Callable[[Callable[[], Any]], Any]

PENDING = resources_pb2.OP_RUN_STATE_PENDING
CANCELLED = resources_pb2.OP_RUN_STATE_CANCELLED
COMPLETED = resources_pb2.OP_RUN_STATE_COMPLETED
TIMEOUT_S = 15


def adhoc(stubs: Any, topic: str = "", **attributes: str) -> Any:
    return stubs.runs.CreateOpRun(
        pb.CreateOpRunRequest(
            image="busybox:latest",
            event_delivery=resources_pb2.EventDelivery(topic=topic, attributes=attributes),
        )
    ).op_run


def drain(stream: Iterator[Any]) -> list[Any]:
    return list(stream)


# -- WatchOpRun -------------------------------------------------------------------------


def test_watch_sends_snapshot_then_changes_and_ends_when_terminal(stubs: Any) -> None:
    run = adhoc(stubs)
    stream = stubs.runs.WatchOpRun(pb.WatchOpRunRequest(run_id=run.id), timeout=TIMEOUT_S)
    snapshot = next(stream)
    assert not snapshot.HasField("event")
    assert snapshot.op_run.id == run.id
    assert snapshot.op_run.state == PENDING
    start = snapshot.sequence
    # History before the watch began (after_sequence 0 means every event) comes first.
    history = [next(stream) for _ in range(start)]
    assert [m.sequence for m in history] == list(range(1, start + 1))

    stubs.runs.UpdateOpRunPriority(pb.UpdateOpRunPriorityRequest(run_id=run.id, priority=4))
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=run.id, reason="enough"))
    rest = drain(stream)  # ends by itself once the run is CANCELLED
    assert rest, "no change arrived"
    assert all(m.HasField("event") for m in rest)
    assert [m.sequence for m in rest] == list(range(start + 1, start + 1 + len(rest)))
    assert rest[0].op_run.priority == 4
    assert rest[-1].event.type == resources_pb2.EVENT_TYPE_CANCELLED
    assert rest[-1].op_run.state == CANCELLED
    assert rest[-1].sequence == rest[-1].op_run.event_sequence


def test_watch_resumes_after_a_sequence_without_gaps_or_repeats(stubs: Any) -> None:
    run = adhoc(stubs)
    for priority in (1, 2, 3):
        stubs.runs.UpdateOpRunPriority(
            pb.UpdateOpRunPriorityRequest(run_id=run.id, priority=priority)
        )
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=run.id))
    full = drain(stubs.runs.WatchOpRun(pb.WatchOpRunRequest(run_id=run.id), timeout=TIMEOUT_S))
    total = full[0].sequence
    assert [m.sequence for m in full[1:]] == list(range(1, total + 1))

    resumed = drain(
        stubs.runs.WatchOpRun(
            pb.WatchOpRunRequest(run_id=run.id, after_sequence=2), timeout=TIMEOUT_S
        )
    )
    assert not resumed[0].HasField("event")  # a fresh snapshot first
    assert [m.sequence for m in resumed[1:]] == list(range(3, total + 1))
    assert [m.event for m in resumed[1:]] == [m.event for m in full[3:]]


def test_watch_of_a_retried_run_follows_its_new_attempt(stubs: Any) -> None:
    run = adhoc(stubs)
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=run.id))
    stubs.runs.RetryOpRun(pb.RetryOpRunRequest(run_id=run.id))
    stream = stubs.runs.WatchOpRun(pb.WatchOpRunRequest(run_id=run.id), timeout=TIMEOUT_S)
    snapshot = next(stream)
    assert snapshot.op_run.current_attempt == 2
    history = [next(stream) for _ in range(snapshot.sequence)]
    assert {m.event.attempt for m in history} == {1, 2}
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=run.id))
    rest = drain(stream)
    assert rest[-1].op_run.state == CANCELLED
    assert rest[-1].event.attempt == 2


def test_watch_errors(stubs: Any, expect_error: ExpectError) -> None:
    missing = expect_error(
        lambda: stubs.runs.WatchOpRun(pb.WatchOpRunRequest(run_id="run_000000000000"))
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
    empty = expect_error(lambda: stubs.runs.WatchOpRun(pb.WatchOpRunRequest()))
    assert empty.code == grpc.StatusCode.INVALID_ARGUMENT


# -- SubscribeEvents --------------------------------------------------------------------


def test_subscribe_reads_the_topic_log_then_live_events(stubs: Any) -> None:
    first = adhoc(stubs, "jobs", team="search")
    second = adhoc(stubs, "jobs", team="ads")
    other = adhoc(stubs, "elsewhere")
    stubs.runs.UpdateOpRunPriority(pb.UpdateOpRunPriorityRequest(run_id=first.id, priority=2))
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=other.id))
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=first.id))

    stream = stubs.runs.SubscribeEvents(pb.SubscribeEventsRequest(topic="jobs"), timeout=TIMEOUT_S)
    backlog = []
    while not backlog or backlog[-1].event.type != resources_pb2.EVENT_TYPE_CANCELLED:
        backlog.append(next(stream))
    assert {m.run_id for m in backlog} <= {first.id, second.id}
    assert all(m.topic == "jobs" for m in backlog)
    offsets = [m.offset for m in backlog]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    cancelled = backlog[-1]
    assert cancelled.run_id == first.id
    assert cancelled.run_state == CANCELLED
    assert dict(cancelled.attributes) == {"team": "search"}

    # Live: an event committed now arrives on the open stream.
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=second.id))
    live = next(stream)
    while live.run_id != second.id or live.event.type != resources_pb2.EVENT_TYPE_CANCELLED:
        live = next(stream)
    assert live.offset > cancelled.offset
    assert dict(live.attributes) == {"team": "ads"}
    stream.cancel()

    # Resuming from an offset sends exactly what came after it.
    resumed = stubs.runs.SubscribeEvents(
        pb.SubscribeEventsRequest(topic="jobs", after_offset=cancelled.offset), timeout=TIMEOUT_S
    )
    again = next(resumed)
    assert again.offset > cancelled.offset
    assert again.offset <= live.offset
    resumed.cancel()


def test_subscribe_from_latest_skips_the_backlog(stubs: Any) -> None:
    old = adhoc(stubs, "latest")
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=old.id))
    stream = stubs.runs.SubscribeEvents(
        pb.SubscribeEventsRequest(topic="latest", from_latest=True), timeout=TIMEOUT_S
    )
    # The subscription is open once the server answered with headers.
    stream.initial_metadata()
    new = adhoc(stubs, "latest")
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=new.id))
    received = next(stream)
    assert received.run_id == new.id
    stream.cancel()


def test_subscribe_needs_a_topic(stubs: Any, expect_error: ExpectError) -> None:
    empty = expect_error(lambda: stubs.runs.SubscribeEvents(pb.SubscribeEventsRequest()))
    assert empty.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "topic" in empty.violations


def _records(stream: Iterator[Any], count: int) -> tuple[list[Any], list[int]]:
    """*count* topic records off *stream* (each message's own and its ``more``), and how
    many records each message carried."""
    records: list[Any] = []
    sizes: list[int] = []
    while len(records) < count:
        message = next(stream)
        records.extend([message, *message.more])
        sizes.append(1 + len(message.more))
    return records, sizes


def test_subscribe_with_max_batch_sends_the_backlog_in_few_messages(stubs: Any) -> None:
    runs = [adhoc(stubs, "batched") for _ in range(6)]
    for run in runs:
        stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=run.id))
    plain = stubs.runs.SubscribeEvents(
        pb.SubscribeEventsRequest(topic="batched"), timeout=TIMEOUT_S
    )
    one_each = [next(plain)]
    while one_each[-1].run_id != runs[-1].id or one_each[-1].run_state != CANCELLED:
        one_each.append(next(plain))
    plain.cancel()
    assert not any(m.more for m in one_each)  # without max_batch: one record a response
    count = len(one_each)
    assert count >= 6  # at least each run's CANCELLED

    batched = stubs.runs.SubscribeEvents(
        pb.SubscribeEventsRequest(topic="batched", max_batch=4), timeout=TIMEOUT_S
    )
    together, sizes = _records(batched, count)
    assert sizes == [4] * (count // 4) + ([count % 4] if count % 4 else [])  # read at once
    assert [m.offset for m in together] == [m.offset for m in one_each]
    assert [m.run_id for m in together] == [m.run_id for m in one_each]

    # Live records keep coming on the batched stream, in order, each once.
    late = adhoc(stubs, "batched")
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=late.id))
    live: list[Any] = []
    while not live or live[-1].run_state != CANCELLED:
        message = next(batched)
        live.extend([message, *message.more])
    batched.cancel()
    assert {m.run_id for m in live} == {late.id}
    assert live[0].offset > together[-1].offset


def test_subscribe_max_batch_out_of_range(stubs: Any, expect_error: ExpectError) -> None:
    for value in (-1, 1001):
        error = expect_error(
            lambda value=value: stubs.runs.SubscribeEvents(
                pb.SubscribeEventsRequest(topic="t", max_batch=value), timeout=TIMEOUT_S
            )
        )
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_batch" in error.violations


# -- with a scripted agent: events and logs -----------------------------------------------


def test_run_on_an_agent_streams_events_and_logs(
    sqlite_server: Any, fake_agent: Callable[..., Any]
) -> None:
    stubs = sqlite_server.stubs()
    agent = fake_agent(sqlite_server.channel())
    run = adhoc(stubs, "agent-topic", node="gpu-1")
    assignment = agent.receive("assignment").assignment
    assert assignment.run_id == run.id
    agent.accept(assignment)

    watch = stubs.runs.WatchOpRun(pb.WatchOpRunRequest(run_id=run.id), timeout=TIMEOUT_S)
    snapshot = next(watch)
    follow = stubs.runs.GetOpRunLogs(
        pb.GetOpRunLogsRequest(run_id=run.id, follow=True), timeout=TIMEOUT_S
    )

    agent.event(run.id, 1, resources_pb2.EVENT_TYPE_STARTED)
    agent.logs(run.id, 1, "hello", "world")
    first_lines = next(follow)
    assert [line.text for line in first_lines.lines] == ["hello", "world"]
    assert [line.number for line in first_lines.lines] == [1, 2]
    assert first_lines.attempt == 1
    agent.logs(run.id, 1, "more")
    outputs = struct_pb2.Struct()
    outputs.update({"answer": 42})
    agent.event(run.id, 1, resources_pb2.EVENT_TYPE_COMPLETED, outputs=outputs)

    rest = list(follow)  # ends once the attempt has ended
    assert [line.text for m in rest for line in m.lines] == ["more"]

    changes = [m for m in watch if m.HasField("event")]
    assert changes[-1].op_run.state == COMPLETED
    assert changes[-1].op_run.outputs["answer"] == 42
    types = [m.event.type for m in changes]
    assert resources_pb2.EVENT_TYPE_STARTED in types
    assert types[-1] == resources_pb2.EVENT_TYPE_COMPLETED
    assert snapshot.sequence < changes[-1].sequence

    # The whole log afterwards, without follow; and from a line number on.
    whole = list(stubs.runs.GetOpRunLogs(pb.GetOpRunLogsRequest(run_id=run.id)))
    assert [line.text for m in whole for line in m.lines] == ["hello", "world", "more"]
    tail = list(stubs.runs.GetOpRunLogs(pb.GetOpRunLogsRequest(run_id=run.id, after_line=2)))
    assert [line.text for m in tail for line in m.lines] == ["more"]

    topic = stubs.runs.SubscribeEvents(
        pb.SubscribeEventsRequest(topic="agent-topic"), timeout=TIMEOUT_S
    )
    delivered = []
    while not delivered or delivered[-1].event.type != resources_pb2.EVENT_TYPE_COMPLETED:
        delivered.append(next(topic))
    topic.cancel()
    assert delivered[-1].run_state == COMPLETED
    assert all(dict(m.attributes) == {"node": "gpu-1"} for m in delivered)


def test_logs_of_a_pending_run(stubs: Any, expect_error: ExpectError) -> None:
    run = adhoc(stubs)
    assert list(stubs.runs.GetOpRunLogs(pb.GetOpRunLogsRequest(run_id=run.id))) == []
    follow = stubs.runs.GetOpRunLogs(
        pb.GetOpRunLogsRequest(run_id=run.id, follow=True), timeout=TIMEOUT_S
    )
    follow.initial_metadata()
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=run.id))
    assert list(follow) == []  # ends with the attempt, having nothing to send
    missing = expect_error(
        lambda: stubs.runs.GetOpRunLogs(pb.GetOpRunLogsRequest(run_id="run_000000000000"))
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
    no_attempt = expect_error(
        lambda: stubs.runs.GetOpRunLogs(pb.GetOpRunLogsRequest(run_id=run.id, attempt=5))
    )
    assert no_attempt.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("count", [30])
def test_many_watchers_all_see_every_event(stubs: Any, count: int) -> None:
    run = adhoc(stubs)
    streams = [
        stubs.runs.WatchOpRun(pb.WatchOpRunRequest(run_id=run.id), timeout=TIMEOUT_S)
        for _ in range(count)
    ]
    for stream in streams:
        snapshot = next(stream)
        for _ in range(snapshot.sequence):
            next(stream)
    for priority in range(20):
        stubs.runs.UpdateOpRunPriority(
            pb.UpdateOpRunPriorityRequest(run_id=run.id, priority=priority)
        )
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=run.id))
    seen = [[m.sequence for m in stream] for stream in streams]
    assert all(s == seen[0] for s in seen)
    assert len(seen[0]) == 21
