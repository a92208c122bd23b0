"""OpRunService's unary calls against the real server, on SQLite and PostgreSQL.

No agent is connected, so every run stays PENDING until a test cancels it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from gyoza.api.v1 import definition_service_pb2 as dpb
from gyoza.api.v1 import op_definition_pb2, resources_pb2
from gyoza.api.v1 import op_run_service_pb2 as pb
from gyoza.server.store import RunFilter, paging

ExpectError = Callable[[Callable[[], Any]], Any]

PENDING = resources_pb2.OP_RUN_STATE_PENDING
CANCELLED = resources_pb2.OP_RUN_STATE_CANCELLED


def struct(**values: Any) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(values)
    return message


def create_definition(stubs: Any) -> None:
    stubs.definitions.CreateOpDefinition(
        dpb.CreateOpDefinitionRequest(
            op_definition=op_definition_pb2.OpDefinition(
                name="embed",
                image="busybox:latest",
                inputs=[
                    resources_pb2.InputSpec(
                        name="text", type=resources_pb2.INPUT_TYPE_STRING, required=True
                    ),
                    resources_pb2.InputSpec(
                        name="dims",
                        type=resources_pb2.INPUT_TYPE_INT,
                        default_value=struct_pb2.Value(number_value=384),
                    ),
                    resources_pb2.InputSpec(name="normalize", type=resources_pb2.INPUT_TYPE_BOOL),
                ],
                constraints=resources_pb2.Constraints(cpu=2, ram_mb=512),
                event_delivery=resources_pb2.EventDelivery(
                    topic="embeddings", attributes={"team": "search"}
                ),
            )
        )
    )


def adhoc(stubs: Any, image: str = "busybox:latest", **kwargs: Any) -> Any:
    return stubs.runs.CreateOpRun(pb.CreateOpRunRequest(image=image, **kwargs)).op_run


def test_create_adhoc_run_and_get_it(stubs: Any) -> None:
    run = adhoc(stubs, inputs=struct(n=3), priority=5)
    assert run.id.startswith("run_")
    assert run.state == PENDING
    assert run.priority == 5
    assert run.image == "busybox:latest"
    assert run.current_attempt == 1
    assert dict(run.inputs) == {"n": 3}
    assert run.op_definition == ""
    got = stubs.runs.GetOpRun(pb.GetOpRunRequest(run_id=run.id)).op_run
    assert got.id == run.id
    assert got.state == PENDING
    assert got.create_time == run.create_time


def test_create_from_definition_fills_defaults_and_takes_settings(stubs: Any) -> None:
    create_definition(stubs)
    run = stubs.runs.CreateOpRun(
        pb.CreateOpRunRequest(op_definition="embed", inputs=struct(text="hello"))
    ).op_run
    assert run.op_definition == "embed"
    assert run.op_definition_version == 1
    assert run.image == "busybox:latest"
    assert dict(run.inputs) == {"text": "hello", "dims": 384}
    assert run.constraints.cpu == 2
    assert run.event_delivery.topic == "embeddings"
    # Overrides win over the definition's settings.
    other = stubs.runs.CreateOpRun(
        pb.CreateOpRunRequest(
            op_definition="embed",
            op_definition_version=1,
            inputs=struct(text="x", dims=8),
            constraints=resources_pb2.Constraints(cpu=0.5),
        )
    ).op_run
    assert other.constraints.cpu == 0.5
    assert other.inputs["dims"] == 8


def test_create_from_definition_lists_every_input_violation(
    stubs: Any, expect_error: ExpectError
) -> None:
    create_definition(stubs)
    error = expect_error(
        lambda: stubs.runs.CreateOpRun(
            pb.CreateOpRunRequest(
                op_definition="embed",
                inputs=struct(dims="many", normalize=1, extra=True),
                priority=-1,
            )
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "INVALID_INPUT"
    assert set(error.violations) >= {
        "inputs.text",
        "inputs.dims",
        "inputs.normalize",
        "inputs.extra",
        "priority",
    }
    assert "required" in error.violations["inputs.text"]


def test_create_refuses_bad_requests(stubs: Any, expect_error: ExpectError) -> None:
    neither = expect_error(lambda: stubs.runs.CreateOpRun(pb.CreateOpRunRequest()))
    assert neither.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {"op_definition", "image"} <= set(neither.violations)
    both = expect_error(
        lambda: stubs.runs.CreateOpRun(pb.CreateOpRunRequest(op_definition="embed", image="x"))
    )
    assert both.code == grpc.StatusCode.INVALID_ARGUMENT
    no_definition = expect_error(
        lambda: stubs.runs.CreateOpRun(pb.CreateOpRunRequest(op_definition="nope"))
    )
    assert no_definition.code == grpc.StatusCode.NOT_FOUND
    bad_settings = expect_error(
        lambda: stubs.runs.CreateOpRun(
            pb.CreateOpRunRequest(
                image="busybox",
                constraints=resources_pb2.Constraints(ram_mb=-5, timeout_seconds=-1),
                retry_policy=resources_pb2.RetryPolicy(
                    max_attempts=2, retry_on=[resources_pb2.FAILURE_CLASS_UNSPECIFIED]
                ),
            )
        )
    )
    assert bad_settings.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {
        "constraints.ram_mb",
        "constraints.timeout_seconds",
        "retry_policy.retry_on[0]",
    } <= set(bad_settings.violations)


def test_repeated_request_id_returns_the_first_run(stubs: Any, expect_error: ExpectError) -> None:
    first = adhoc(stubs, inputs=struct(a=1), request_id="req-1")
    again = adhoc(stubs, inputs=struct(a=1), request_id="req-1")
    assert again.id == first.id
    assert again.request_id == "req-1"
    conflict = expect_error(lambda: adhoc(stubs, inputs=struct(a=2), request_id="req-1"))
    assert conflict.code == grpc.StatusCode.ALREADY_EXISTS
    assert conflict.reason == "ALREADY_EXISTS"
    listed = stubs.runs.ListOpRuns(pb.ListOpRunsRequest())
    assert [r.id for r in listed.op_runs] == [first.id]
    # A retried create still gets the first run after its priority was changed.
    stubs.runs.UpdateOpRunPriority(pb.UpdateOpRunPriorityRequest(run_id=first.id, priority=8))
    assert adhoc(stubs, inputs=struct(a=1), request_id="req-1").priority == 8


def test_repeated_request_id_survives_definition_changes(stubs: Any) -> None:
    create_definition(stubs)
    request = pb.CreateOpRunRequest(
        op_definition="embed", inputs=struct(text="hi"), request_id="req-def"
    )
    first = stubs.runs.CreateOpRun(request).op_run
    # The definition gets a new version, then goes away: the retry still gets its run.
    create_definition(stubs)
    assert stubs.runs.CreateOpRun(request).op_run.id == first.id
    stubs.definitions.DeleteOpDefinition(dpb.DeleteOpDefinitionRequest(name="embed"))
    again = stubs.runs.CreateOpRun(request).op_run
    assert again.id == first.id
    assert again.op_definition_version == 1


def test_get_errors(stubs: Any, expect_error: ExpectError) -> None:
    missing = expect_error(
        lambda: stubs.runs.GetOpRun(pb.GetOpRunRequest(run_id="run_000000000000"))
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
    empty = expect_error(lambda: stubs.runs.GetOpRun(pb.GetOpRunRequest()))
    assert empty.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "run_id" in empty.violations


def test_list_newest_first_filters_and_pages(stubs: Any) -> None:
    create_definition(stubs)
    a = adhoc(stubs, image="img-a")
    b = adhoc(stubs, image="img-b")
    c = stubs.runs.CreateOpRun(
        pb.CreateOpRunRequest(op_definition="embed", inputs=struct(text="t"))
    ).op_run
    d = adhoc(stubs, image="img-a")
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=b.id))

    everything = stubs.runs.ListOpRuns(pb.ListOpRunsRequest()).op_runs
    assert [r.id for r in everything] == [d.id, c.id, b.id, a.id]
    assert all(len(r.events) == 0 for r in everything)
    oldest = stubs.runs.ListOpRuns(pb.ListOpRunsRequest(oldest_first=True)).op_runs
    assert [r.id for r in oldest] == [a.id, b.id, c.id, d.id]

    by_image = stubs.runs.ListOpRuns(pb.ListOpRunsRequest(image="img-a")).op_runs
    assert [r.id for r in by_image] == [d.id, a.id]
    by_definition = stubs.runs.ListOpRuns(pb.ListOpRunsRequest(op_definition="embed")).op_runs
    assert [r.id for r in by_definition] == [c.id]
    cancelled = stubs.runs.ListOpRuns(pb.ListOpRunsRequest(states=[CANCELLED])).op_runs
    assert [r.id for r in cancelled] == [b.id]
    pending = stubs.runs.ListOpRuns(pb.ListOpRunsRequest(states=[PENDING], image="img-a"))
    assert [r.id for r in pending.op_runs] == [d.id, a.id]

    after_b = timestamp_pb2.Timestamp()
    after_b.CopyFrom(c.create_time)
    recent = stubs.runs.ListOpRuns(pb.ListOpRunsRequest(created_after=after_b)).op_runs
    assert [r.id for r in recent] == [d.id, c.id]
    older = stubs.runs.ListOpRuns(pb.ListOpRunsRequest(created_before=after_b)).op_runs
    assert [r.id for r in older] == [b.id, a.id]


def test_page_tokens_stay_correct_while_runs_are_created(stubs: Any) -> None:
    created = [adhoc(stubs, image="pager").id for _ in range(5)]
    first = stubs.runs.ListOpRuns(pb.ListOpRunsRequest(page_size=2, image="pager"))
    assert [r.id for r in first.op_runs] == [created[4], created[3]]
    # New runs arrive between pages: the listing goes on where it was, without repeats.
    for _ in range(3):
        adhoc(stubs, image="pager")
    seen = [r.id for r in first.op_runs]
    token = first.next_page_token
    while token:
        page = stubs.runs.ListOpRuns(
            pb.ListOpRunsRequest(page_size=2, image="pager", page_token=token)
        )
        seen += [r.id for r in page.op_runs]
        token = page.next_page_token
    assert seen == list(reversed(created))


def test_list_refuses_bad_arguments(stubs: Any, expect_error: ExpectError) -> None:
    adhoc(stubs)
    adhoc(stubs)
    page = stubs.runs.ListOpRuns(pb.ListOpRunsRequest(page_size=1))
    assert page.next_page_token
    other_filters = expect_error(
        lambda: stubs.runs.ListOpRuns(
            pb.ListOpRunsRequest(page_size=1, image="x", page_token=page.next_page_token)
        )
    )
    assert other_filters.code == grpc.StatusCode.INVALID_ARGUMENT
    garbage = expect_error(
        lambda: stubs.runs.ListOpRuns(pb.ListOpRunsRequest(page_token="garbage!"))
    )
    assert garbage.code == grpc.StatusCode.INVALID_ARGUMENT
    negative = expect_error(lambda: stubs.runs.ListOpRuns(pb.ListOpRunsRequest(page_size=-3)))
    assert negative.code == grpc.StatusCode.INVALID_ARGUMENT
    unspecified = expect_error(
        lambda: stubs.runs.ListOpRuns(
            pb.ListOpRunsRequest(states=[resources_pb2.OP_RUN_STATE_UNSPECIFIED])
        )
    )
    assert unspecified.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "states[0]" in unspecified.violations


def test_cancel_pending_then_locked(stubs: Any, expect_error: ExpectError) -> None:
    run = adhoc(stubs)
    cancelled = stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=run.id, reason="not needed"))
    assert cancelled.op_run.state == CANCELLED
    assert stubs.runs.GetOpRun(pb.GetOpRunRequest(run_id=run.id)).op_run.state == CANCELLED
    again = expect_error(lambda: stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=run.id)))
    assert again.code == grpc.StatusCode.FAILED_PRECONDITION
    assert again.reason == "RUN_LOCKED"
    missing = expect_error(
        lambda: stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id="run_000000000000"))
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND


def test_retry_cancelled_run_starts_a_new_attempt(stubs: Any, expect_error: ExpectError) -> None:
    run = adhoc(stubs)
    pending_retry = expect_error(lambda: stubs.runs.RetryOpRun(pb.RetryOpRunRequest(run_id=run.id)))
    assert pending_retry.code == grpc.StatusCode.FAILED_PRECONDITION
    assert pending_retry.reason == "INVALID_TRANSITION"
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=run.id))
    retried = stubs.runs.RetryOpRun(pb.RetryOpRunRequest(run_id=run.id)).op_run
    assert retried.state == PENDING
    assert retried.current_attempt == 2
    attempts = stubs.runs.ListOpRunAttempts(pb.ListOpRunAttemptsRequest(run_id=run.id)).attempts
    assert [(a.attempt, a.state) for a in attempts] == [(1, CANCELLED), (2, PENDING)]
    assert attempts[0].events[-1].type == resources_pb2.EVENT_TYPE_CANCELLED
    assert attempts[1].events[0].type == resources_pb2.EVENT_TYPE_RETRIED
    missing = expect_error(
        lambda: stubs.runs.RetryOpRun(pb.RetryOpRunRequest(run_id="run_000000000000"))
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND


def test_update_priority(stubs: Any, expect_error: ExpectError) -> None:
    run = adhoc(stubs, priority=1)
    updated = stubs.runs.UpdateOpRunPriority(
        pb.UpdateOpRunPriorityRequest(run_id=run.id, priority=7)
    ).op_run
    assert updated.priority == 7
    assert stubs.runs.GetOpRun(pb.GetOpRunRequest(run_id=run.id)).op_run.priority == 7
    negative = expect_error(
        lambda: stubs.runs.UpdateOpRunPriority(
            pb.UpdateOpRunPriorityRequest(run_id=run.id, priority=-1)
        )
    )
    assert negative.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "priority" in negative.violations
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=run.id))
    locked = expect_error(
        lambda: stubs.runs.UpdateOpRunPriority(
            pb.UpdateOpRunPriorityRequest(run_id=run.id, priority=3)
        )
    )
    assert locked.code == grpc.StatusCode.FAILED_PRECONDITION
    assert locked.reason == "RUN_LOCKED"
    missing = expect_error(
        lambda: stubs.runs.UpdateOpRunPriority(
            pb.UpdateOpRunPriorityRequest(run_id="run_000000000000", priority=3)
        )
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND


def test_list_events_of_all_attempts_or_one_paged(stubs: Any, expect_error: ExpectError) -> None:
    run = adhoc(stubs)
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=run.id))
    stubs.runs.RetryOpRun(pb.RetryOpRunRequest(run_id=run.id))
    stubs.runs.UpdateOpRunPriority(pb.UpdateOpRunPriorityRequest(run_id=run.id, priority=2))

    everything = stubs.runs.ListOpRunEvents(pb.ListOpRunEventsRequest(run_id=run.id)).events
    keys = [(e.attempt, e.seq) for e in everything]
    assert keys == sorted(keys)
    assert {e.attempt for e in everything} == {1, 2}
    second = stubs.runs.ListOpRunEvents(pb.ListOpRunEventsRequest(run_id=run.id, attempt=2)).events
    assert {e.attempt for e in second} == {2}

    paged: list[tuple[int, int]] = []
    token = ""
    while True:
        page = stubs.runs.ListOpRunEvents(
            pb.ListOpRunEventsRequest(run_id=run.id, page_size=1, page_token=token)
        )
        paged += [(e.attempt, e.seq) for e in page.events]
        token = page.next_page_token
        if not token:
            break
    assert paged == keys

    missing = expect_error(
        lambda: stubs.runs.ListOpRunEvents(pb.ListOpRunEventsRequest(run_id="run_000000000000"))
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND
    no_attempt = expect_error(
        lambda: stubs.runs.ListOpRunEvents(pb.ListOpRunEventsRequest(run_id=run.id, attempt=9))
    )
    assert no_attempt.code == grpc.StatusCode.NOT_FOUND
    bad_token = expect_error(
        lambda: stubs.runs.ListOpRunEvents(
            pb.ListOpRunEventsRequest(run_id=run.id, page_token="zzz")
        )
    )
    assert bad_token.code == grpc.StatusCode.INVALID_ARGUMENT


def test_list_attempts_of_unknown_run(stubs: Any, expect_error: ExpectError) -> None:
    missing = expect_error(
        lambda: stubs.runs.ListOpRunAttempts(pb.ListOpRunAttemptsRequest(run_id="run_000000000000"))
    )
    assert missing.code == grpc.StatusCode.NOT_FOUND


def test_listed_runs_carry_the_event_sequence_that_get_returns(stubs: Any) -> None:
    quiet = stubs.runs.CreateOpRun(pb.CreateOpRunRequest(image="busybox:latest")).op_run
    busy = stubs.runs.CreateOpRun(pb.CreateOpRunRequest(image="busybox:latest")).op_run
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=busy.id))
    stubs.runs.RetryOpRun(pb.RetryOpRunRequest(run_id=busy.id))
    listed = {r.id: r.event_sequence for r in stubs.runs.ListOpRuns(pb.ListOpRunsRequest()).op_runs}
    for run in (quiet, busy):
        got = stubs.runs.GetOpRun(pb.GetOpRunRequest(run_id=run.id)).op_run
        assert listed[run.id] == got.event_sequence
    assert listed[busy.id] > 0


@pytest.mark.parametrize(
    "position",
    [
        ["0001-01-01T00:00:00+05:00", "run_x"],
        ["9999-12-31T23:59:59-05:00", "run_x"],
        ["2026-01-01T00:00:00+00:00", "run_\x00"],
        ["2026-01-01T00:00:00+00:00", "r" * 10_000],
    ],
)
def test_page_tokens_with_out_of_range_cursors_are_invalid_arguments(
    stubs: Any, expect_error: ExpectError, position: list[Any]
) -> None:
    adhoc(stubs)
    fingerprint = paging.run_filter_fingerprint(RunFilter())
    token = paging.encode_token("runs", fingerprint, position)
    error = expect_error(lambda: stubs.runs.ListOpRuns(pb.ListOpRunsRequest(page_token=token)))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


@pytest.mark.parametrize("big", [2**63, 2**64 + 5, -(2**63) - 1])
def test_integer_cursors_beyond_any_column_are_invalid_arguments(
    stubs: Any, expect_error: ExpectError, big: int
) -> None:
    create_definition(stubs)
    run = adhoc(stubs)
    versions = paging.encode_token("def_versions", "embed", [big])
    error = expect_error(
        lambda: stubs.definitions.ListOpDefinitions(
            dpb.ListOpDefinitionsRequest(name="embed", page_token=versions)
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    events = paging.encode_token("events", f"{run.id}/0", [1, big])
    error = expect_error(
        lambda: stubs.runs.ListOpRunEvents(
            pb.ListOpRunEventsRequest(run_id=run.id, page_token=events)
        )
    )
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
