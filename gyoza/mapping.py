"""Proto <-> domain mapping: one ``x_to_proto`` / ``x_from_proto`` pair per message.

Every message of ``gyoza.api.v1`` that mirrors a domain object is converted here and
nowhere else: by the server's servicers, by the agent (its reports) and by the Python
client alike, so that the three agree on every value. It imports only the generated
code and the domain. Each enum has one table here.

Conventions
-----------
* Timestamps are aware datetimes in the domain; a naive datetime is refused. An unset
  ``Timestamp`` field is ``None``.
* ``Struct`` is a ``dict[str, Any]`` of JSON values. JSON numbers travel as doubles, so a
  number with an integral value comes back as an ``int`` (``2.0`` reads ``2``; equal in
  Python) and an integer beyond 2**53, which a double cannot hold exactly, is refused.
* Proto3 scalars have no presence: where the domain has ``None`` and the wire has a zero
  meaning "none" (``timeout_seconds``, ``duration_ms``, ``worker_id``...), ``None`` and
  zero are the same value.
* Enums map by name (``OpRunState.RUNNING`` <-> ``OP_RUN_STATE_RUNNING``).
* What a client sends and the domain cannot hold (an unspecified or unknown enum value,
  an attempt number below 1) raises :class:`~gyoza.models.errors.InvalidInput` naming the field,
  so the server's error catalog answers ``INVALID_ARGUMENT`` with a ``BadRequest``.
  Domain objects that cannot be written (a naive datetime, a set in a dict) raise
  ``ValueError`` / ``TypeError``: a programming error, not a user's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from gyoza.api.v1 import agent_service_pb2, op_definition_pb2, op_run_pb2, resources_pb2
from gyoza.models.errors import FieldViolation, InvalidInput, MalformedReport
from gyoza.models.op_attempt import OpAttempt
from gyoza.models.op_definition import InputSpec, InputType, OpDefinition, OutputSpec
from gyoza.models.op_run import OpRun
from gyoza.models.reports import REPORTABLE_EVENTS, AgentReport, LogLine, ReportedEvent
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
from gyoza.models.timestamps import utc_now

# Largest integer a double holds exactly; JSON numbers travel as doubles in a Struct.
_MAX_EXACT_INT = 2**53

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# --------------------------------------------------------------------------------------
# Timestamp <-> aware datetime
# --------------------------------------------------------------------------------------


def timestamp_to_proto(value: datetime) -> timestamp_pb2.Timestamp:
    """Convert an aware datetime to a ``Timestamp``.

    Raises
    ------
    ValueError
        If *value* is naive: its instant is unknown.
    """
    message = timestamp_pb2.Timestamp()
    _fill_timestamp(message, value)
    return message


def _fill_timestamp(message: timestamp_pb2.Timestamp, value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"naive datetime {value.isoformat()} has no time zone")
    # Exact integer arithmetic: the same as ``Timestamp.FromDatetime``, several times faster.
    delta = value - _EPOCH
    message.seconds = delta.days * 86400 + delta.seconds
    message.nanos = delta.microseconds * 1000


def timestamp_from_proto(message: timestamp_pb2.Timestamp) -> datetime:
    """Convert a ``Timestamp`` to an aware UTC datetime (microsecond precision)."""
    return message.ToDatetime(tzinfo=UTC)


def optional_timestamp_from_proto(parent: Any, field: str) -> datetime | None:
    """Read ``parent.<field>`` as a datetime, ``None`` when the field is unset."""
    if not parent.HasField(field):
        return None
    value: timestamp_pb2.Timestamp = getattr(parent, field)
    return timestamp_from_proto(value)


# --------------------------------------------------------------------------------------
# Struct / Value <-> JSON values
# --------------------------------------------------------------------------------------


def value_to_proto(value: Any, path: str = "value") -> struct_pb2.Value:
    """Convert a JSON value (None, bool, int, float, str, list, tuple, dict) to a ``Value``.

    Raises
    ------
    TypeError
        If *value* (or something inside it) is not a JSON value; the message names its
        path.
    ValueError
        If an integer is too large for a double to hold exactly.
    """
    message = struct_pb2.Value()
    _fill_value(message, value, path)
    return message


def _fill_value(message: struct_pb2.Value, value: Any, path: str) -> None:
    """Write the JSON value *value* into *message* in place (no intermediate messages)."""
    kind = type(value)
    if kind is str:
        message.string_value = value
    elif value is None:
        message.null_value = struct_pb2.NULL_VALUE
    elif kind is bool:
        message.bool_value = value
    elif kind is float:
        message.number_value = value
    elif isinstance(value, bool):
        message.bool_value = value
    elif isinstance(value, int):
        if abs(value) > _MAX_EXACT_INT:
            raise ValueError(f"{path}: integer {value} is too large to send exactly (> 2**53)")
        message.number_value = float(value)
    elif isinstance(value, float):
        message.number_value = value
    elif isinstance(value, str):
        message.string_value = value
    elif isinstance(value, Mapping):
        _fill_struct(message.struct_value, value, path)
    elif isinstance(value, list | tuple):
        items = message.list_value
        items.SetInParent()  # an empty list is still a list
        values = items.values
        for index, item in enumerate(value):
            _fill_value(values.add(), item, f"{path}[{index}]")
    else:
        raise TypeError(f"{path}: {type(value).__name__} is not a JSON value")


def _fill_struct(message: struct_pb2.Struct, value: Mapping[str, Any], path: str) -> None:
    message.SetInParent()  # an empty dict is still a dict
    fields = message.fields
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(f"{path}: key {key!r} is not a string")
        _fill_value(fields[key], item, f"{path}.{key}")


def value_from_proto(message: struct_pb2.Value) -> Any:
    """Convert a ``Value`` to a JSON value; integral numbers come back as ``int``.

    A ``Value`` with no kind set reads as ``None``.
    """
    kind = message.WhichOneof("kind")
    if kind == "bool_value":
        return message.bool_value
    if kind == "number_value":
        number = message.number_value
        if math.isfinite(number) and number.is_integer() and abs(number) <= _MAX_EXACT_INT:
            return int(number)
        return number
    if kind == "string_value":
        return message.string_value
    if kind == "struct_value":
        return struct_from_proto(message.struct_value)
    if kind == "list_value":
        return [value_from_proto(item) for item in message.list_value.values]
    return None


def struct_to_proto(value: Mapping[str, Any], path: str = "struct") -> struct_pb2.Struct:
    """Convert a dict of JSON values to a ``Struct``.

    Raises
    ------
    TypeError
        If a key is not a string or a value is not a JSON value.
    ValueError
        If an integer is too large for a double to hold exactly.
    """
    message = struct_pb2.Struct()
    _fill_struct(message, value, path)
    return message


def struct_from_proto(message: struct_pb2.Struct) -> dict[str, Any]:
    """Convert a ``Struct`` to a dict of JSON values."""
    return {key: value_from_proto(item) for key, item in message.fields.items()}


# --------------------------------------------------------------------------------------
# Enums
# --------------------------------------------------------------------------------------


def _unspecified(field: str, what: str) -> InvalidInput:
    return InvalidInput([FieldViolation(field, f"{what} must be set (got UNSPECIFIED)")])


_STATE_NUMBERS: dict[OpRunState, resources_pb2.OpRunState.ValueType] = {
    state: resources_pb2.OpRunState.Value(f"OP_RUN_STATE_{state.value}") for state in OpRunState
}


def state_to_proto(state: OpRunState) -> resources_pb2.OpRunState.ValueType:
    """Convert an :class:`OpRunState` to its enum number."""
    return _STATE_NUMBERS[state]


def state_from_proto(value: resources_pb2.OpRunState.ValueType, field: str = "state") -> OpRunState:
    """Convert an ``OpRunState`` enum number; UNSPECIFIED is refused.

    Raises
    ------
    InvalidInput
        If *value* is UNSPECIFIED or unknown.
    """
    if value == resources_pb2.OP_RUN_STATE_UNSPECIFIED:
        raise _unspecified(field, "a run state")
    return OpRunState(_enum_name(resources_pb2.OpRunState, value, "OP_RUN_STATE_", field))


def event_type_to_proto(event_type: EventType | str) -> resources_pb2.EventType.ValueType:
    """Convert an :class:`EventType` (or its value, as events store it) to its number.

    Raises
    ------
    ValueError
        If *event_type* is not an event type.
    """
    number = _EVENT_TYPE_NUMBERS.get(event_type)
    if number is None:
        return resources_pb2.EventType.Value(f"EVENT_TYPE_{EventType(event_type).value}")
    return number


_EVENT_TYPE_NUMBERS: dict[EventType | str, resources_pb2.EventType.ValueType] = {
    key: resources_pb2.EventType.Value(f"EVENT_TYPE_{event_type.value}")
    for event_type in EventType
    for key in (event_type, event_type.value)
}


def event_type_from_proto(
    value: resources_pb2.EventType.ValueType, field: str = "type"
) -> EventType:
    """Convert an ``EventType`` enum number; UNSPECIFIED is refused.

    Raises
    ------
    InvalidInput
        If *value* is UNSPECIFIED or unknown.
    """
    if value == resources_pb2.EVENT_TYPE_UNSPECIFIED:
        raise _unspecified(field, "an event type")
    return EventType(_enum_name(resources_pb2.EventType, value, "EVENT_TYPE_", field))


def failure_class_to_proto(
    failure_class: FailureClass | None,
) -> resources_pb2.FailureClass.ValueType:
    """Convert a :class:`FailureClass`; ``None`` is FAILURE_CLASS_UNSPECIFIED."""
    if failure_class is None:
        return resources_pb2.FAILURE_CLASS_UNSPECIFIED
    return resources_pb2.FailureClass.Value(f"FAILURE_CLASS_{failure_class.value}")


def failure_class_from_proto(
    value: resources_pb2.FailureClass.ValueType, field: str = "failure_class"
) -> FailureClass | None:
    """Convert a ``FailureClass`` enum number; UNSPECIFIED is ``None``.

    Raises
    ------
    InvalidInput
        If *value* is not a known failure class.
    """
    if value == resources_pb2.FAILURE_CLASS_UNSPECIFIED:
        return None
    return FailureClass(_enum_name(resources_pb2.FailureClass, value, "FAILURE_CLASS_", field))


def _enum_name(enum: Any, value: int, prefix: str, field: str) -> str:
    try:
        name: str = enum.Name(value)
    except ValueError:
        raise InvalidInput([FieldViolation(field, f"unknown value {value}")]) from None
    return name.removeprefix(prefix)


# --------------------------------------------------------------------------------------
# Constraints, RetryPolicy, EventDelivery, ExecutionSummary
# --------------------------------------------------------------------------------------


def constraints_to_proto(constraints: Constraints) -> resources_pb2.Constraints:
    """Convert :class:`Constraints`; ``timeout_s=None`` is ``timeout_seconds=0``."""
    message = resources_pb2.Constraints(
        cpu=constraints.cpu,
        ram_mb=constraints.ram_mb,
        vram_mb=constraints.vram_mb,
        gpu_count=constraints.gpu_count,
        timeout_seconds=constraints.timeout_s or 0.0,
        selector=constraints.selector,
        queue_timeout_seconds=constraints.queue_timeout_s or 0.0,
    )
    if constraints.gpu_id is not None:
        message.gpu_id = constraints.gpu_id
    return message


def constraints_from_proto(message: resources_pb2.Constraints) -> Constraints:
    """Convert a ``Constraints`` message; ``timeout_seconds=0`` is ``timeout_s=None``."""
    return Constraints(
        cpu=message.cpu,
        ram_mb=message.ram_mb,
        vram_mb=message.vram_mb,
        gpu_count=message.gpu_count,
        gpu_id=message.gpu_id if message.HasField("gpu_id") else None,
        timeout_s=message.timeout_seconds or None,
        selector=message.selector.strip(),
        queue_timeout_s=message.queue_timeout_seconds or None,
    )


def pending_reason_from_proto(message: resources_pb2.PendingReason) -> PendingReason | None:
    """Convert a ``PendingReason``; an UNSPECIFIED or unknown code is ``None``."""
    try:
        name = resources_pb2.PendingReasonCode.Name(message.code)
        code = PendingReasonCode(name.removeprefix("PENDING_REASON_CODE_"))
    except ValueError:  # UNSPECIFIED, or a code newer than this client
        return None
    return PendingReason(code, message.message)


def pending_reason_to_proto(reason: PendingReason) -> resources_pb2.PendingReason:
    """Convert a :class:`PendingReason`."""
    return resources_pb2.PendingReason(
        code=resources_pb2.PendingReasonCode.Value(f"PENDING_REASON_CODE_{reason.code.value}"),
        message=reason.message,
    )


def retry_policy_to_proto(policy: RetryPolicy) -> resources_pb2.RetryPolicy:
    """Convert a :class:`RetryPolicy`.

    An empty ``retry_on`` reads back as the default classes: on the wire, empty means
    "the server default". ``max_attempts=1`` is how to say "never retry".
    """
    return resources_pb2.RetryPolicy(
        max_attempts=policy.max_attempts,
        initial_delay_seconds=policy.initial_delay_s,
        backoff_multiplier=policy.backoff_multiplier,
        max_delay_seconds=policy.max_delay_s,
        retry_on=[failure_class_to_proto(fc) for fc in policy.retry_on],
    )


def retry_policy_from_proto(
    message: resources_pb2.RetryPolicy, field: str = "retry_policy"
) -> RetryPolicy:
    """Convert a ``RetryPolicy`` message.

    Zero ``max_attempts`` or ``backoff_multiplier`` (never valid) and an empty
    ``retry_on`` take the domain defaults, so a partly filled message means what a user
    who wrote it would expect; every other field is taken as sent.

    Raises
    ------
    InvalidInput
        If ``retry_on`` holds UNSPECIFIED or an unknown class.
    """
    defaults = RetryPolicy()
    retry_on: list[FailureClass] = []
    for index, value in enumerate(message.retry_on):
        path = f"{field}.retry_on[{index}]"
        failure_class = failure_class_from_proto(value, path)
        if failure_class is None:
            raise _unspecified(path, "a failure class")
        retry_on.append(failure_class)
    return RetryPolicy(
        max_attempts=message.max_attempts or defaults.max_attempts,
        initial_delay_s=message.initial_delay_seconds,
        backoff_multiplier=message.backoff_multiplier or defaults.backoff_multiplier,
        max_delay_s=message.max_delay_seconds,
        retry_on=tuple(retry_on) if retry_on else defaults.retry_on,
    )


def event_delivery_to_proto(delivery: EventDelivery) -> resources_pb2.EventDelivery:
    """Convert an :class:`EventDelivery`."""
    return resources_pb2.EventDelivery(topic=delivery.topic, attributes=dict(delivery.attributes))


def event_delivery_from_proto(message: resources_pb2.EventDelivery) -> EventDelivery:
    """Convert an ``EventDelivery`` message."""
    return EventDelivery(topic=message.topic, attributes=dict(message.attributes))


def execution_summary_to_proto(
    summary: ExecutionSummary,
) -> resources_pb2.ExecutionSummary:
    """Convert an :class:`ExecutionSummary`; ``None`` scalars are written as zero/empty."""
    message = resources_pb2.ExecutionSummary(
        duration_ms=summary.duration_ms or 0,
        worker_id=summary.worker_id or "",
        error_message=summary.error_message or "",
        gpu_ids=list(summary.gpu_ids),
        failure_class=failure_class_to_proto(summary.failure_class),
    )
    if summary.gpu_id is not None:
        message.gpu_id = summary.gpu_id
    if summary.exit_code is not None:
        message.exit_code = summary.exit_code
    return message


def execution_summary_from_proto(
    message: resources_pb2.ExecutionSummary, field: str = "execution_summary"
) -> ExecutionSummary:
    """Convert an ``ExecutionSummary`` message; zero/empty scalars read as ``None``."""
    return ExecutionSummary(
        duration_ms=message.duration_ms or None,
        worker_id=message.worker_id or None,
        error_message=message.error_message or None,
        gpu_id=message.gpu_id if message.HasField("gpu_id") else None,
        gpu_ids=list(message.gpu_ids),
        failure_class=failure_class_from_proto(message.failure_class, f"{field}.failure_class"),
        exit_code=message.exit_code if message.HasField("exit_code") else None,
    )


def _summary_from_proto(
    message: resources_pb2.ExecutionSummary, state: OpRunState
) -> ExecutionSummary:
    """The summary of an attempt in *state*: an ended attempt always has a duration.

    ``duration_ms`` has no presence on the wire; the domain sets it (possibly to 0)
    exactly when an attempt ends.
    """
    summary = execution_summary_from_proto(message)
    if state.is_terminal and summary.duration_ms is None:
        summary.duration_ms = 0
    return summary


# --------------------------------------------------------------------------------------
# Events and attempts
# --------------------------------------------------------------------------------------


def event_to_proto(entry: EventEntry, attempt: int) -> op_run_pb2.OpRunEvent:
    """Convert an :class:`EventEntry` of attempt number *attempt* to an ``OpRunEvent``.

    A PROGRESS event's ``msg`` is its percentage: it goes to ``progress``, and the op's
    words (``payload.message``) to ``message``. Any other ``msg`` is the ``message``.
    ``time`` is when the event happened, ``apply_time`` when the server applied it.
    """
    message = op_run_pb2.OpRunEvent()
    fill_event(message, entry, attempt)
    return message


def fill_event(message: op_run_pb2.OpRunEvent, entry: EventEntry, attempt: int) -> None:
    """Write :func:`event_to_proto` of *entry* into *message* (an event field of another
    message, say) in place, without building a message to copy."""
    message.seq = entry.seq
    message.attempt = attempt
    message.type = event_type_to_proto(entry.type)
    _fill_struct(message.payload, entry.payload, "payload")
    _fill_timestamp(message.time, entry.t)
    _fill_timestamp(message.apply_time, entry.applied)
    if entry.type == EventType.PROGRESS.value and isinstance(entry.msg, int):
        message.progress = entry.msg
        words = entry.payload.get("message")
        if isinstance(words, str):
            message.message = words
    else:
        message.message = str(entry.msg)


def event_from_proto(
    message: op_run_pb2.OpRunEvent, field: str = "event"
) -> tuple[int, EventEntry]:
    """Convert an ``OpRunEvent`` to ``(attempt, EventEntry)``.

    A PROGRESS event's ``msg`` is its ``progress``; any other's is its ``message``. An
    unset ``time`` reads as the epoch; an ``apply_time`` equal to it (or unset) as
    ``applied_at=None``.

    Raises
    ------
    InvalidInput
        If the event type is UNSPECIFIED or unknown.
    """
    event_type = event_type_from_proto(message.type, f"{field}.type")
    msg: str | int = message.progress if event_type is EventType.PROGRESS else message.message
    t = timestamp_from_proto(message.time)
    applied = optional_timestamp_from_proto(message, "apply_time")
    return message.attempt, EventEntry(
        t=t,
        type=event_type.value,
        msg=msg,
        payload=struct_from_proto(message.payload),
        seq=message.seq,
        applied_at=None if applied == t else applied,
    )


def attempt_to_proto(attempt: OpAttempt) -> op_run_pb2.OpAttempt:
    """Convert an :class:`OpAttempt` to its API view.

    The API's attempt carries neither inputs nor constraints (the run has them), nor the
    server's bookkeeping (``reported_seq``, ``created_at``).
    """
    message = op_run_pb2.OpAttempt(
        run_id=attempt.op_run_id,
        attempt=attempt.attempt,
        state=state_to_proto(attempt.state),
        progress=attempt.progress,
        events=[event_to_proto(e, attempt.attempt) for e in attempt.events],
        outputs=struct_to_proto(attempt.outputs, "outputs"),
        execution_summary=execution_summary_to_proto(attempt.execution_summary),
    )
    if attempt.started_at is not None:
        message.start_time.CopyFrom(timestamp_to_proto(attempt.started_at))
    if attempt.finished_at is not None:
        message.finish_time.CopyFrom(timestamp_to_proto(attempt.finished_at))
    return message


def attempt_from_proto(
    message: op_run_pb2.OpAttempt,
    *,
    inputs: Mapping[str, Any] | None = None,
    constraints: Constraints | None = None,
) -> OpAttempt:
    """Convert an ``OpAttempt`` message.

    Parameters
    ----------
    message : op_run_pb2.OpAttempt
        The attempt.
    inputs, constraints
        The run's, which the API's attempt does not repeat.

    Notes
    -----
    ``created_at`` is not on the wire: it reads as ``start_time`` when set, else now.
    ``reported_seq`` reads as 0.
    """
    started_at = optional_timestamp_from_proto(message, "start_time")
    state = state_from_proto(message.state)
    return OpAttempt(
        id=f"{message.run_id}_att_{message.attempt}",
        op_run_id=message.run_id,
        attempt=message.attempt,
        state=state,
        progress=message.progress,
        events=[event_from_proto(e, f"events[{i}]")[1] for i, e in enumerate(message.events)],
        inputs=dict(inputs or {}),
        outputs=struct_from_proto(message.outputs),
        execution_summary=_summary_from_proto(message.execution_summary, state),
        constraints=constraints if constraints is not None else Constraints(),
        started_at=started_at,
        finished_at=optional_timestamp_from_proto(message, "finish_time"),
        created_at=started_at or utc_now(),
    )


# --------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------


def run_to_proto(
    run: OpRun,
    *,
    events: bool = True,
    event_sequence: int | None = None,
    pending_reason: PendingReason | None = None,
) -> op_run_pb2.OpRun:
    """Convert an :class:`OpRun` to its API view: the run and its current attempt.

    Parameters
    ----------
    run : OpRun
        The run, with its attempts.
    events : bool
        Include the current attempt's events (``ListOpRuns`` leaves them out).
    event_sequence : int | None
        The run's event sequence, when the caller knows it better than the attempts
        *run* holds; by default the number of events in all of them.
    pending_reason : PendingReason | None
        Why the run waits, when it is pending (the scheduler knows, not the run).
    """
    current = run.current_attempt
    message = op_run_pb2.OpRun(
        id=run.id,
        state=state_to_proto(run.state),
        priority=run.priority,
        image=run.image,
        progress=run.progress,
        current_attempt=current,
        execution_summary=execution_summary_to_proto(run.execution_summary),
        constraints=constraints_to_proto(run.constraints),
        retry_policy=retry_policy_to_proto(run.retry_policy),
        event_delivery=event_delivery_to_proto(run.event_delivery),
        op_definition=run.op_definition or "",
        op_definition_version=run.op_definition_version or 0,
        cancel_requested=run.cancel_requested,
        request_id=run.request_id or "",
        event_sequence=(
            event_sequence
            if event_sequence is not None
            else sum(len(a.events) for a in run.attempts)
        ),
    )
    # Written in place: no intermediate messages to copy.
    _fill_struct(message.inputs, run.inputs, "inputs")
    _fill_struct(message.outputs, run.outputs, "outputs")
    _fill_timestamp(message.create_time, run.created_at)
    _fill_timestamp(message.update_time, run.updated_at)
    if events:
        added = message.events
        for entry in run.events:
            fill_event(added.add(), entry, current)
    if run.next_retry_at is not None:
        _fill_timestamp(message.next_retry_time, run.next_retry_at)
    pending_reason = pending_reason or run.pending_reason
    if pending_reason is not None and run.state is OpRunState.PENDING:
        message.pending_reason.CopyFrom(pending_reason_to_proto(pending_reason))
    return message


def run_from_proto(message: op_run_pb2.OpRun) -> OpRun:
    """Convert an ``OpRun`` message to a run holding its current attempt only.

    The API shows one attempt, so the run comes back with that one (numbered
    ``current_attempt``); ``ListOpRunAttempts`` has the others. The attempt's
    ``started_at``, ``finished_at`` and ``created_at`` are read from its events (STARTED,
    the terminal event, and RETRIED or the run's creation), as the domain records them.
    ``event_sequence`` is not kept.

    Raises
    ------
    InvalidInput
        If ``current_attempt`` is below 1, the state is UNSPECIFIED or an event is
        malformed.
    """
    if message.current_attempt < 1:
        raise InvalidInput(
            [FieldViolation("current_attempt", f"must be >= 1 (got {message.current_attempt})")]
        )
    state = state_from_proto(message.state)
    inputs = struct_from_proto(message.inputs)
    constraints = constraints_from_proto(message.constraints)
    created_at = timestamp_from_proto(message.create_time)
    entries = [event_from_proto(e, f"events[{i}]")[1] for i, e in enumerate(message.events)]
    attempt = OpAttempt(
        id=f"{message.id}_att_{message.current_attempt}",
        op_run_id=message.id,
        attempt=message.current_attempt,
        state=state,
        progress=message.progress,
        events=entries,
        inputs=dict(inputs),
        outputs=struct_from_proto(message.outputs),
        execution_summary=_summary_from_proto(message.execution_summary, state),
        constraints=constraints_from_proto(message.constraints),
        started_at=_event_time(entries, (EventType.STARTED,)),
        finished_at=_event_time(entries, _TERMINAL_EVENTS) if state.is_terminal else None,
        created_at=(
            created_at
            if message.current_attempt == 1
            else _event_time(entries, (EventType.RETRIED,)) or created_at
        ),
    )
    run = OpRun.rehydrate(
        id=message.id,
        state=state,
        priority=message.priority,
        image=message.image,
        attempts=[attempt],
        inputs=inputs,
        constraints=constraints,
        retry_policy=retry_policy_from_proto(message.retry_policy),
        event_delivery=event_delivery_from_proto(message.event_delivery),
        op_definition=message.op_definition or None,
        op_definition_version=message.op_definition_version or None,
        cancel_requested=message.cancel_requested,
        next_retry_at=optional_timestamp_from_proto(message, "next_retry_time"),
        request_id=message.request_id or None,
        created_at=created_at,
        updated_at=timestamp_from_proto(message.update_time),
    )
    if message.HasField("pending_reason"):
        run.pending_reason = pending_reason_from_proto(message.pending_reason)
    return run


_TERMINAL_EVENTS = (EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED)


def _event_time(entries: list[EventEntry], types: tuple[EventType, ...]) -> datetime | None:
    """Time of the last event of one of *types*, ``None`` when there is none."""
    wanted = {t.value for t in types}
    for entry in reversed(entries):
        if entry.type in wanted:
            return entry.t
    return None


# --------------------------------------------------------------------------------------
# Definitions
# --------------------------------------------------------------------------------------


def input_type_to_proto(input_type: InputType) -> resources_pb2.InputType.ValueType:
    """Convert an :class:`InputType` to its enum number."""
    return resources_pb2.InputType.Value(f"INPUT_TYPE_{input_type.value}")


def input_type_from_proto(
    value: resources_pb2.InputType.ValueType, field: str = "type"
) -> InputType:
    """Convert an ``InputType`` enum number; UNSPECIFIED is refused.

    Raises
    ------
    InvalidInput
        If *value* is UNSPECIFIED or unknown.
    """
    if value == resources_pb2.INPUT_TYPE_UNSPECIFIED:
        raise _unspecified(field, "an input type")
    return InputType(_enum_name(resources_pb2.InputType, value, "INPUT_TYPE_", field))


def input_spec_to_proto(spec: InputSpec) -> resources_pb2.InputSpec:
    """Convert an :class:`InputSpec`; a ``None`` default leaves ``default_value`` unset."""
    message = resources_pb2.InputSpec(
        name=spec.name,
        type=input_type_to_proto(spec.type),
        required=spec.required,
        description=spec.description,
    )
    if spec.default is not None:
        message.default_value.CopyFrom(value_to_proto(spec.default, f"inputs.{spec.name}"))
    return message


def input_spec_from_proto(message: resources_pb2.InputSpec, field: str = "input") -> InputSpec:
    """Convert an ``InputSpec`` message; an unset or null default is ``None``.

    Raises
    ------
    InvalidInput
        If the input type is UNSPECIFIED or unknown.
    """
    return InputSpec(
        name=message.name,
        type=input_type_from_proto(message.type, f"{field}.type"),
        required=message.required,
        default=(
            value_from_proto(message.default_value) if message.HasField("default_value") else None
        ),
        description=message.description,
    )


def output_spec_to_proto(spec: OutputSpec) -> resources_pb2.OutputSpec:
    """Convert an :class:`OutputSpec`."""
    return resources_pb2.OutputSpec(
        name=spec.name,
        type=input_type_to_proto(spec.type),
        required=spec.required,
        description=spec.description,
    )


def output_spec_from_proto(message: resources_pb2.OutputSpec, field: str = "output") -> OutputSpec:
    """Convert an ``OutputSpec`` message.

    Raises
    ------
    InvalidInput
        If the type is UNSPECIFIED or unknown.
    """
    return OutputSpec(
        name=message.name,
        type=input_type_from_proto(message.type, f"{field}.type"),
        required=message.required,
        description=message.description,
    )


def definition_to_proto(definition: OpDefinition) -> op_definition_pb2.OpDefinition:
    """Convert an :class:`OpDefinition`."""
    return op_definition_pb2.OpDefinition(
        name=definition.name,
        version=definition.version,
        image=definition.image,
        description=definition.description,
        inputs=[input_spec_to_proto(spec) for spec in definition.inputs],
        constraints=constraints_to_proto(definition.constraints),
        retry_policy=retry_policy_to_proto(definition.retry_policy),
        event_delivery=event_delivery_to_proto(definition.event_delivery),
        create_time=timestamp_to_proto(definition.created_at),
        outputs=[output_spec_to_proto(spec) for spec in definition.outputs],
    )


def definition_from_proto(
    message: op_definition_pb2.OpDefinition, field: str = "op_definition"
) -> OpDefinition:
    """Convert an ``OpDefinition`` message.

    An unset ``retry_policy`` is the default policy; an unset ``create_time`` (a
    definition being created) reads as now. Every malformed input spec is reported at
    once.

    Raises
    ------
    InvalidInput
        If an input type is UNSPECIFIED or unknown, or a retry class is.
    """
    violations: list[FieldViolation] = []
    inputs: list[InputSpec] = []
    for index, spec in enumerate(message.inputs):
        try:
            inputs.append(input_spec_from_proto(spec, f"{field}.inputs[{index}]"))
        except InvalidInput as error:
            violations.extend(error.violations)
    outputs: list[OutputSpec] = []
    for index, output in enumerate(message.outputs):
        try:
            outputs.append(output_spec_from_proto(output, f"{field}.outputs[{index}]"))
        except InvalidInput as error:
            violations.extend(error.violations)
    retry_policy = RetryPolicy()
    if message.HasField("retry_policy"):
        try:
            retry_policy = retry_policy_from_proto(message.retry_policy, f"{field}.retry_policy")
        except InvalidInput as error:
            violations.extend(error.violations)
    if violations:
        raise InvalidInput(violations)
    return OpDefinition(
        name=message.name,
        version=message.version,
        image=message.image,
        inputs=inputs,
        outputs=outputs,
        constraints=constraints_from_proto(message.constraints),
        retry_policy=retry_policy,
        event_delivery=event_delivery_from_proto(message.event_delivery),
        description=message.description,
        created_at=(
            timestamp_from_proto(message.create_time)
            if message.HasField("create_time")
            else utc_now()
        ),
    )


# --------------------------------------------------------------------------------------
# Log streams
# --------------------------------------------------------------------------------------

_LOG_STREAM_NUMBERS: dict[str, op_run_pb2.LogStream.ValueType] = {
    "stdout": op_run_pb2.LOG_STREAM_STDOUT,
    "stderr": op_run_pb2.LOG_STREAM_STDERR,
}
_LOG_STREAM_NAMES = {number: name for name, number in _LOG_STREAM_NUMBERS.items()}


def log_stream_to_proto(stream: str) -> op_run_pb2.LogStream.ValueType:
    """``"stdout"`` / ``"stderr"`` (any case) to the wire enum; anything else is
    LOG_STREAM_UNSPECIFIED."""
    return _LOG_STREAM_NUMBERS.get(stream.lower(), op_run_pb2.LOG_STREAM_UNSPECIFIED)


def log_stream_from_proto(value: op_run_pb2.LogStream.ValueType, default: str = "stdout") -> str:
    """The wire enum to ``"stdout"`` / ``"stderr"``; unspecified or unknown is *default*."""
    return _LOG_STREAM_NAMES.get(value, default)


# --------------------------------------------------------------------------------------
# Agent reports (the agent writes them, the server reads them)
# --------------------------------------------------------------------------------------


def reported_event_to_proto(event: ReportedEvent) -> agent_service_pb2.ReportedEvent:
    """An executor's event as the agent reports it.

    Raises
    ------
    TypeError, ValueError
        If the payload or the outputs are not JSON that travels exactly (a big integer,
        a set); the message names the path.
    """
    message = agent_service_pb2.ReportedEvent(
        type=event_type_to_proto(event.type),
        message=event.message,
        progress=event.progress,
        failure_class=failure_class_to_proto(event.failure_class),
        error_message=event.error_message,
        duration_ms=event.duration_ms,
    )
    if event.payload:
        _fill_struct(message.payload, event.payload, "payload")
    if event.outputs is not None:
        _fill_struct(message.outputs, event.outputs, "outputs")
    if event.exit_code is not None:
        message.exit_code = event.exit_code
    return message


def reported_event_from_proto(message: agent_service_pb2.ReportedEvent) -> ReportedEvent:
    """The event an agent reported; ``outputs_bytes`` is the outputs' encoded size.

    A failure class this server does not know reads as ``None`` (an agent newer than the
    server still gets its attempt ended).

    Raises
    ------
    InvalidInput
        If the type is unspecified or unknown.
    """
    kind = event_type_from_proto(message.type)
    try:
        failure_class = failure_class_from_proto(message.failure_class)
    except InvalidInput:
        failure_class = None
    return ReportedEvent(
        type=kind,
        message=message.message,
        progress=message.progress,
        payload=struct_from_proto(message.payload) if message.payload.fields else {},
        outputs=struct_from_proto(message.outputs) if message.HasField("outputs") else None,
        failure_class=failure_class,
        exit_code=message.exit_code if message.HasField("exit_code") else None,
        error_message=message.error_message,
        duration_ms=message.duration_ms,
        outputs_bytes=message.outputs.ByteSize() if message.HasField("outputs") else 0,
    )


def log_chunk_to_proto(lines: Sequence[LogLine]) -> agent_service_pb2.LogChunk:
    """Log lines as a LogChunk (line endings stripped)."""
    return agent_service_pb2.LogChunk(
        lines=[
            agent_service_pb2.LogChunkLine(
                text=line.text.rstrip("\r\n"), stream=log_stream_to_proto(line.stream)
            )
            for line in lines
        ]
    )


def report_from_proto(message: agent_service_pb2.Report, max_payload_bytes: int) -> AgentReport:
    """A report as the server reads it off an agent's stream.

    A report that is addressed but malformed (no body, an event type agents may not
    report, a payload over *max_payload_bytes*) comes back with its ``refusal`` set: it
    is refused, and its seq consumed. (The encoded size of a Struct is a close, cheap
    stand-in for its JSON size.)

    Raises
    ------
    MalformedReport
        If the report lacks its address (``run_id``, ``attempt >= 1``, ``seq >= 1``),
        or its time is not a valid timestamp.
    """
    if not message.run_id or message.attempt < 1 or message.seq < 1:
        raise MalformedReport("a report needs run_id, attempt >= 1 and seq >= 1")
    try:
        when = timestamp_from_proto(message.time) if message.HasField("time") else utc_now()
    except (ValueError, OverflowError) as exc:  # seconds past year 9999, bad nanos...
        raise MalformedReport("the report's time is not a valid timestamp") from exc
    address = (message.run_id, message.attempt, message.seq, when)
    body = message.WhichOneof("body")
    if body == "logs":
        lines = tuple(
            LogLine(line.text, log_stream_from_proto(line.stream)) for line in message.logs.lines
        )
        return AgentReport(*address, lines=lines)
    if body != "event":
        return AgentReport(*address, refusal="the report carries neither an event nor log lines")
    wire = message.event
    try:
        kind: EventType | None = event_type_from_proto(wire.type)
    except InvalidInput:
        kind = None
    if kind not in REPORTABLE_EVENTS:
        name = (
            resources_pb2.EventType.Name(wire.type)
            if wire.type in resources_pb2.EventType.values()
            else str(wire.type)
        )
        return AgentReport(*address, refusal=f"agents cannot report events of type {name}")
    if wire.payload.ByteSize() > max_payload_bytes:
        return AgentReport(
            *address,
            refusal=f"the event payload is larger than the server's limit of "
            f"{max_payload_bytes} bytes",
        )
    return AgentReport(*address, event=reported_event_from_proto(wire))
