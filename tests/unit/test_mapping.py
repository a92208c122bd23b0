"""Round trips through gyoza.mapping: domain -> proto -> domain is exact."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from google.protobuf import struct_pb2, timestamp_pb2

from gyoza import mapping
from gyoza.api.v1 import op_definition_pb2, op_run_pb2, resources_pb2
from gyoza.models.errors import InvalidInput
from gyoza.models.op_attempt import OpAttempt
from gyoza.models.op_definition import InputSpec, InputType, OpDefinition
from gyoza.models.op_run import OpRun
from gyoza.models.resources import (
    Constraints,
    EventDelivery,
    EventEntry,
    EventType,
    ExecutionSummary,
    FailureClass,
    OpRunState,
    PendingReason,
    PendingReasonCode,
    RetryPolicy,
)

T0 = datetime(2026, 3, 1, 12, 30, 15, 123456, tzinfo=UTC)


# --- Timestamp ------------------------------------------------------------------------


def test_timestamp_round_trip_keeps_the_instant_and_microseconds() -> None:
    plus_two = datetime(2026, 3, 1, 14, 30, 15, 654321, tzinfo=timezone(timedelta(hours=2)))
    for value in (T0, plus_two, datetime(1970, 1, 1, tzinfo=UTC)):
        back = mapping.timestamp_from_proto(mapping.timestamp_to_proto(value))
        assert back == value
        assert back.tzinfo is UTC


def test_naive_datetime_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        mapping.timestamp_to_proto(datetime(2026, 1, 1))


def test_unset_timestamp_field_reads_as_none() -> None:
    attempt = op_run_pb2.OpAttempt()
    assert mapping.optional_timestamp_from_proto(attempt, "finish_time") is None
    attempt.finish_time.CopyFrom(mapping.timestamp_to_proto(T0))
    assert mapping.optional_timestamp_from_proto(attempt, "finish_time") == T0


# --- Struct / Value ---------------------------------------------------------------------

JSON_DOC: dict[str, Any] = {
    "prompt": "a cat",
    "steps": 30,
    "negative": -7,
    "scale": 7.5,
    "tiny": 1e-300,
    "big": 2**53,
    "flag": True,
    "off": False,
    "nothing": None,
    "empty_text": "",
    "list": [1, "two", 3.25, None, [True], {"k": "v"}],
    "nested": {"a": {"b": {"c": [], "d": {}}}},
    "unicode": "naïve — 寿司",
}


def test_struct_round_trip_is_exact() -> None:
    back = mapping.struct_from_proto(mapping.struct_to_proto(JSON_DOC))
    assert back == JSON_DOC
    # Integers stay integers (not floats), so equality is not just numeric.
    assert type(back["steps"]) is int
    assert type(back["big"]) is int
    assert type(back["scale"]) is float
    assert type(back["flag"]) is bool


def test_integral_double_reads_as_int() -> None:
    struct = struct_pb2.Struct()
    struct.update({"n": 4.0, "x": 4.5})
    back = mapping.struct_from_proto(struct)
    assert back == {"n": 4, "x": 4.5}
    assert type(back["n"]) is int


def test_tuple_is_sent_as_a_list() -> None:
    assert mapping.struct_from_proto(mapping.struct_to_proto({"t": (1, 2)})) == {"t": [1, 2]}


def test_integer_beyond_double_precision_is_refused() -> None:
    with pytest.raises(ValueError, match=r"inputs\.seed: integer"):
        mapping.struct_to_proto({"seed": 2**53 + 1}, "inputs")


def test_non_json_values_are_refused_with_their_path() -> None:
    with pytest.raises(TypeError, match=r"inputs\.a\[1\]: set is not a JSON value"):
        mapping.struct_to_proto({"a": [1, {2}]}, "inputs")
    with pytest.raises(TypeError, match="key 1 is not a string"):
        mapping.struct_to_proto({1: "x"})  # type: ignore[dict-item]


def test_value_round_trip_of_scalars_and_unset_value() -> None:
    values: list[Any] = [None, True, 0, -1, 2.5, "", "s", [], {}, [{"a": [1]}]]
    for value in values:
        assert mapping.value_from_proto(mapping.value_to_proto(value)) == value
    assert mapping.value_from_proto(struct_pb2.Value()) is None


# --- Enums ------------------------------------------------------------------------------


def test_every_state_event_type_and_failure_class_round_trips() -> None:
    for state in OpRunState:
        assert mapping.state_from_proto(mapping.state_to_proto(state)) is state
    for event_type in EventType:
        assert mapping.event_type_from_proto(mapping.event_type_to_proto(event_type)) is event_type
        assert mapping.event_type_to_proto(event_type.value) == mapping.event_type_to_proto(
            event_type
        )
    for failure_class in FailureClass:
        number = mapping.failure_class_to_proto(failure_class)
        assert mapping.failure_class_from_proto(number) is failure_class
    for input_type in InputType:
        assert mapping.input_type_from_proto(mapping.input_type_to_proto(input_type)) is input_type


def test_enum_numbers_match_the_proto_names() -> None:
    assert mapping.state_to_proto(OpRunState.RUNNING) == resources_pb2.OP_RUN_STATE_RUNNING
    assert mapping.event_type_to_proto(EventType.RETRIED) == resources_pb2.EVENT_TYPE_RETRIED
    assert mapping.failure_class_to_proto(FailureClass.OOM) == resources_pb2.FAILURE_CLASS_OOM
    assert mapping.failure_class_to_proto(None) == resources_pb2.FAILURE_CLASS_UNSPECIFIED
    assert mapping.input_type_to_proto(InputType.ARRAY) == resources_pb2.INPUT_TYPE_ARRAY


def test_unspecified_and_unknown_enums_are_invalid_input_naming_the_field() -> None:
    with pytest.raises(InvalidInput) as error:
        mapping.state_from_proto(resources_pb2.OP_RUN_STATE_UNSPECIFIED)
    assert error.value.violations[0].field == "state"
    with pytest.raises(InvalidInput) as error:
        mapping.event_type_from_proto(resources_pb2.EVENT_TYPE_UNSPECIFIED, "event.type")
    assert error.value.violations[0].field == "event.type"
    with pytest.raises(InvalidInput, match="unknown value 99"):
        mapping.state_from_proto(99)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="unknown value 42"):
        mapping.failure_class_from_proto(42)  # type: ignore[arg-type]
    assert mapping.failure_class_from_proto(resources_pb2.FAILURE_CLASS_UNSPECIFIED) is None


def test_unknown_domain_event_type_is_refused() -> None:
    with pytest.raises(ValueError):
        mapping.event_type_to_proto("EXPLODED")


# --- Value objects ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "constraints",
    [
        Constraints(),
        Constraints(cpu=1.5, ram_mb=2048, vram_mb=8000, gpu_count=2, timeout_s=90.5),
        Constraints(vram_mb=100, gpu_id=0),
        Constraints(gpu_id=3, timeout_s=1.0),
        Constraints(gpu_count=1, selector="executor=docker, zone notin (eu-1)", queue_timeout_s=5),
    ],
)
def test_constraints_round_trip(constraints: Constraints) -> None:
    message = mapping.constraints_to_proto(constraints)
    assert mapping.constraints_from_proto(message) == constraints


def test_constraints_gpu_id_zero_keeps_its_presence() -> None:
    message = mapping.constraints_to_proto(Constraints(gpu_id=0))
    assert message.HasField("gpu_id")
    assert not mapping.constraints_to_proto(Constraints()).HasField("gpu_id")
    assert message.timeout_seconds == 0.0


@pytest.mark.parametrize(
    "policy",
    [
        RetryPolicy(),
        RetryPolicy(
            max_attempts=5,
            initial_delay_s=0.0,
            backoff_multiplier=1.0,
            max_delay_s=0.0,
            retry_on=(FailureClass.OOM,),
        ),
        RetryPolicy(max_attempts=1, retry_on=tuple(FailureClass)),
    ],
)
def test_retry_policy_round_trip(policy: RetryPolicy) -> None:
    assert mapping.retry_policy_from_proto(mapping.retry_policy_to_proto(policy)) == policy


def test_retry_policy_zeros_that_are_never_valid_take_the_defaults() -> None:
    defaults = RetryPolicy()
    back = mapping.retry_policy_from_proto(resources_pb2.RetryPolicy(max_delay_seconds=5))
    assert back == RetryPolicy(
        max_attempts=defaults.max_attempts,
        initial_delay_s=0.0,
        backoff_multiplier=defaults.backoff_multiplier,
        max_delay_s=5.0,
        retry_on=defaults.retry_on,
    )


def test_retry_policy_unspecified_class_is_refused() -> None:
    message = resources_pb2.RetryPolicy(
        max_attempts=2,
        retry_on=[resources_pb2.FAILURE_CLASS_OOM, resources_pb2.FAILURE_CLASS_UNSPECIFIED],
    )
    with pytest.raises(InvalidInput) as error:
        mapping.retry_policy_from_proto(message)
    assert error.value.violations[0].field == "retry_policy.retry_on[1]"


@pytest.mark.parametrize(
    "delivery",
    [EventDelivery(), EventDelivery(topic="renders", attributes={"team": "a", "env": "prod"})],
)
def test_event_delivery_round_trip(delivery: EventDelivery) -> None:
    assert mapping.event_delivery_from_proto(mapping.event_delivery_to_proto(delivery)) == delivery


@pytest.mark.parametrize(
    "summary",
    [
        ExecutionSummary(),
        ExecutionSummary(
            duration_ms=1234,
            worker_id="gpu-node-1",
            error_message="exit status 3",
            gpu_id=0,
            gpu_ids=[0, 2],
            failure_class=FailureClass.EXIT_CODE,
            exit_code=3,
        ),
        ExecutionSummary(worker_id="w", exit_code=0, failure_class=FailureClass.OUTPUT_INVALID),
    ],
)
def test_execution_summary_round_trip(summary: ExecutionSummary) -> None:
    message = mapping.execution_summary_to_proto(summary)
    assert mapping.execution_summary_from_proto(message) == summary


def test_exit_code_zero_keeps_its_presence() -> None:
    message = mapping.execution_summary_to_proto(ExecutionSummary(exit_code=0))
    assert message.HasField("exit_code")
    assert not message.HasField("gpu_id")


# --- Events -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    [
        EventEntry(t=T0, type="ASSIGNED", msg="assigned to w", payload={"worker_id": "w"}, seq=1),
        EventEntry(t=T0, type="STARTED", msg="", payload={}, seq=2),
        EventEntry(t=T0, type="PROGRESS", msg=0, seq=3),
        EventEntry(t=T0, type="PROGRESS", msg=100, seq=4),
        EventEntry(t=T0, type="INFO", msg="hello", payload={"k": [1, {"x": None}]}, seq=5),
        EventEntry(t=T0, type="ERROR", msg="oops", seq=6),
        EventEntry(t=T0, type="COMPLETED", msg="done", payload={"outputs": {"a": 1}}, seq=7),
        EventEntry(t=T0, type="FAILED", msg="", payload={"failure_class": "OOM"}, seq=8),
        EventEntry(t=T0, type="CANCELLED", msg="stop", seq=9),
        EventEntry(t=T0, type="RETRIED", msg="retry of attempt 1", seq=1),
        EventEntry(
            t=T0,
            type="PROGRESS",
            msg=50,
            payload={"message": "epoch 2"},
            seq=10,
            applied_at=T0 + timedelta(seconds=30),
        ),
    ],
)
def test_event_round_trip(entry: EventEntry) -> None:
    message = mapping.event_to_proto(entry, attempt=2)
    assert message.attempt == 2
    attempt, back = mapping.event_from_proto(message)
    assert attempt == 2
    assert back == entry


def test_progress_event_uses_the_progress_field() -> None:
    message = mapping.event_to_proto(EventEntry(t=T0, type="PROGRESS", msg=42, seq=1), 1)
    assert message.progress == 42
    assert message.message == ""
    assert message.type == resources_pb2.EVENT_TYPE_PROGRESS


def test_progress_event_message_is_the_ops_words() -> None:
    entry = EventEntry(t=T0, type="PROGRESS", msg=40, payload={"message": "epoch 2 of 5"}, seq=1)
    message = mapping.event_to_proto(entry, 1)
    assert (message.progress, message.message) == (40, "epoch 2 of 5")


def test_event_times_are_when_it_happened_and_when_it_was_applied() -> None:
    late = T0 + timedelta(minutes=5)
    message = mapping.event_to_proto(EventEntry(t=T0, type="INFO", msg="x", applied_at=late), 1)
    assert (message.time.ToDatetime(tzinfo=UTC), message.apply_time.ToDatetime(tzinfo=UTC)) == (
        T0,
        late,
    )
    own = mapping.event_to_proto(EventEntry(t=T0, type="INFO", msg="x"), 1)
    assert own.apply_time == own.time


def test_event_with_unspecified_type_is_refused() -> None:
    with pytest.raises(InvalidInput) as error:
        mapping.event_from_proto(op_run_pb2.OpRunEvent(seq=1), "events[0]")
    assert error.value.violations[0].field == "events[0].type"


# --- Runs and attempts ------------------------------------------------------------------


def _completed_run() -> OpRun:
    run = OpRun.create(
        image="ghcr.io/acme/render:1",
        priority=5,
        inputs={"prompt": "a cat", "steps": 30, "scale": 7.5, "tags": ["a", "b"]},
        constraints=Constraints(cpu=2, ram_mb=4096, vram_mb=8000, gpu_id=1, timeout_s=600),
        retry_policy=RetryPolicy(max_attempts=4, retry_on=(FailureClass.OOM,)),
        event_delivery=EventDelivery(topic="renders", attributes={"team": "vision"}),
        op_definition="render",
        op_definition_version=3,
        request_id="req-1",
    )
    run.assign("gpu-node-1", [1])
    run.add_event("STARTED", "container started", {"worker_id": "gpu-node-1"})
    run.add_event("PROGRESS", 40)
    run.add_event("INFO", "halfway", {"step": 15})
    run.add_event("COMPLETED", "done", {"outputs": {"image": "s3://x.png", "n": 1}})
    return run


def _retried_run() -> OpRun:
    run = OpRun.create(image="busybox", inputs={"a": 1}, retry_policy=RetryPolicy(max_attempts=1))
    run.assign("w1")
    run.add_event("STARTED", "")
    run.add_event(
        "FAILED", "exit 2", {"failure_class": "EXIT_CODE", "exit_code": 2, "error_message": "x"}
    )
    run.retry(force=True, reason="by hand")
    run.assign("w2", [0])
    return run


def _current_attempt_view(run: OpRun) -> dict[str, Any]:
    """What the API can carry: the run with its current attempt only."""
    data = run.to_dict()
    current = copy.deepcopy(run.current_op_attempt.to_dict())
    current["reported_seq"] = 0
    data["attempts"] = [current]
    return data


@pytest.mark.parametrize("make_run", [_completed_run, _retried_run, lambda: OpRun.create("img")])
def test_run_round_trip_is_exact_for_the_current_attempt(make_run: Any) -> None:
    run = make_run()
    message = mapping.run_to_proto(run)
    back = mapping.run_from_proto(message)
    assert back.to_dict() == _current_attempt_view(run)
    assert back.attempts[0].to_dict() == _current_attempt_view(run)["attempts"][0]


def test_run_to_proto_fields() -> None:
    run = _retried_run()
    message = mapping.run_to_proto(run)
    assert message.id == run.id
    assert message.state == resources_pb2.OP_RUN_STATE_ASSIGNED
    assert message.current_attempt == 2
    assert [e.attempt for e in message.events] == [2, 2]
    assert [e.type for e in message.events] == [
        resources_pb2.EVENT_TYPE_RETRIED,
        resources_pb2.EVENT_TYPE_ASSIGNED,
    ]
    # Every event of every attempt: 3 of attempt 1, 2 of attempt 2.
    assert message.event_sequence == 6 - 1
    assert message.op_definition == ""
    assert message.op_definition_version == 0
    assert message.request_id == ""
    assert not message.HasField("next_retry_time")
    assert message.inputs == mapping.struct_to_proto({"a": 1})


def test_run_to_proto_without_events_and_with_a_given_sequence() -> None:
    run = _completed_run()
    message = mapping.run_to_proto(run, events=False, event_sequence=99)
    assert len(message.events) == 0
    assert message.event_sequence == 99


def test_run_next_retry_time_round_trips() -> None:
    run = OpRun.create(image="img", retry_policy=RetryPolicy(initial_delay_s=30))
    run.assign("w")
    run.add_event("FAILED", "boom", {"failure_class": "EXIT_CODE"})
    assert run.schedule_auto_retry(T0) == T0 + timedelta(seconds=30)
    back = mapping.run_from_proto(mapping.run_to_proto(run))
    assert back.next_retry_at == T0 + timedelta(seconds=30)
    assert back.to_dict() == _current_attempt_view(run)


def test_run_cancel_requested_round_trips() -> None:
    run = OpRun.create(image="img")
    run.assign("w")
    run.request_cancel("no longer needed")
    back = mapping.run_from_proto(mapping.run_to_proto(run))
    assert back.cancel_requested is True
    assert back.to_dict() == _current_attempt_view(run)


def test_run_without_attempt_number_is_refused() -> None:
    message = mapping.run_to_proto(OpRun.create("img"))
    message.current_attempt = 0
    with pytest.raises(InvalidInput, match="current_attempt"):
        mapping.run_from_proto(message)


def test_attempt_round_trip() -> None:
    run = _retried_run()
    for attempt in run.attempts:
        message = mapping.attempt_to_proto(attempt)
        assert message.run_id == run.id
        assert all(e.attempt == attempt.attempt for e in message.events)
        back = mapping.attempt_from_proto(message, inputs=run.inputs, constraints=run.constraints)
        expected = attempt.to_dict()
        expected["reported_seq"] = 0
        actual = back.to_dict()
        # created_at is not on the wire: it reads as the start time, or now.
        assert actual.pop("created_at")
        expected.pop("created_at")
        assert actual == expected


def test_attempt_times_and_presence() -> None:
    attempt = OpAttempt(id="run_x_att_1", op_run_id="run_x", attempt=1)
    message = mapping.attempt_to_proto(attempt)
    assert not message.HasField("start_time")
    assert not message.HasField("finish_time")
    attempt.started_at = T0
    attempt.finished_at = T0 + timedelta(seconds=3)
    back = mapping.attempt_from_proto(mapping.attempt_to_proto(attempt))
    assert (back.started_at, back.finished_at, back.created_at) == (
        T0,
        T0 + timedelta(seconds=3),
        T0,
    )
    assert back.id == "run_x_att_1"


# --- Definitions ------------------------------------------------------------------------


def _definition() -> OpDefinition:
    return OpDefinition(
        name="render",
        version=7,
        image="ghcr.io/acme/render:1",
        description="Renders a prompt",
        inputs=[
            InputSpec("prompt", InputType.STRING, required=True, description="what to draw"),
            InputSpec("steps", InputType.INT, default=30),
            InputSpec("scale", InputType.FLOAT, default=7.5),
            InputSpec("upscale", InputType.BOOL, default=False),
            InputSpec("extra", InputType.OBJECT, default={"k": [1, 2]}),
            InputSpec("tags", InputType.ARRAY, default=[]),
            InputSpec("seed", InputType.INT),
            InputSpec("empty", InputType.STRING, default=""),
        ],
        constraints=Constraints(cpu=1, ram_mb=1024, vram_mb=8000, timeout_s=300),
        retry_policy=RetryPolicy(max_attempts=2, initial_delay_s=5),
        event_delivery=EventDelivery(topic="renders", attributes={"a": "b"}),
        created_at=T0,
    )


def test_definition_round_trip_is_exact() -> None:
    definition = _definition()
    back = mapping.definition_from_proto(mapping.definition_to_proto(definition))
    assert back == definition
    assert back.to_dict() == definition.to_dict()
    assert back.inputs[3].default is False
    assert back.inputs[7].default == ""


def test_input_spec_default_presence() -> None:
    message = mapping.input_spec_to_proto(InputSpec("n", InputType.INT))
    assert not message.HasField("default_value")
    message = mapping.input_spec_to_proto(InputSpec("n", InputType.INT, default=0))
    assert message.HasField("default_value")
    assert mapping.input_spec_from_proto(message).default == 0


def test_definition_being_created_takes_defaults_for_unset_fields() -> None:
    message = op_definition_pb2.OpDefinition(name="x", image="busybox")
    before = datetime.now(UTC)
    back = mapping.definition_from_proto(message)
    assert back.retry_policy == RetryPolicy()
    assert back.version == 0
    assert back.created_at >= before


def test_definition_reports_every_malformed_spec_at_once() -> None:
    message = op_definition_pb2.OpDefinition(
        name="x",
        image="busybox",
        inputs=[
            resources_pb2.InputSpec(name="a"),
            resources_pb2.InputSpec(name="b", type=resources_pb2.INPUT_TYPE_INT),
            resources_pb2.InputSpec(name="c", type=77),  # type: ignore[arg-type]
        ],
        retry_policy=resources_pb2.RetryPolicy(retry_on=[resources_pb2.FAILURE_CLASS_UNSPECIFIED]),
    )
    with pytest.raises(InvalidInput) as error:
        mapping.definition_from_proto(message)
    assert [v.field for v in error.value.violations] == [
        "op_definition.inputs[0].type",
        "op_definition.inputs[2].type",
        "op_definition.retry_policy.retry_on[0]",
    ]


def test_timestamp_proto_type() -> None:
    assert isinstance(mapping.timestamp_to_proto(T0), timestamp_pb2.Timestamp)


def test_pending_reason_travels_on_a_pending_run_only() -> None:
    run = OpRun.create(image="busybox")
    reason = PendingReason(
        PendingReasonCode.INSUFFICIENT_CPU, "needs 64 CPU; the largest agent has 2"
    )
    message = mapping.run_to_proto(run, pending_reason=reason)
    assert message.pending_reason.code == resources_pb2.PENDING_REASON_CODE_INSUFFICIENT_CPU
    assert mapping.run_from_proto(message).pending_reason == reason
    for code in PendingReasonCode:
        back = mapping.pending_reason_from_proto(
            mapping.pending_reason_to_proto(PendingReason(code, "x"))
        )
        assert back is not None and back.code is code
    assert not mapping.run_to_proto(run).HasField("pending_reason")
