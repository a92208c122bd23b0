"""Value objects, errors and timestamps of the domain."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest

from gyoza.models import (
    AlreadyExists,
    Constraints,
    EventDelivery,
    EventEntry,
    EventType,
    ExecutionSummary,
    FailureClass,
    FieldViolation,
    GyozaError,
    InvalidInput,
    InvalidTransition,
    MaxAttemptsReached,
    NotFound,
    OpRunLockedException,
    OpRunState,
    RetryPolicy,
    StaleAttempt,
)
from gyoza.models.timestamps import elapsed_ms, parse_optional_timestamp, parse_timestamp

# ----------------------------------------------------------------------
# Enums
# ----------------------------------------------------------------------


@pytest.mark.parametrize("enum", [OpRunState, EventType, FailureClass])
def test_enum_values_equal_names_and_are_strings(enum: type[OpRunState]) -> None:
    for member in enum:
        assert member.value == member.name
        assert member == member.name
        assert isinstance(member, str)


def test_enum_members_are_the_documented_ones() -> None:
    assert [s.value for s in OpRunState] == [
        "PENDING",
        "ASSIGNED",
        "RUNNING",
        "COMPLETED",
        "FAILED",
        "CANCELLED",
    ]
    assert [t.value for t in EventType] == [
        "ASSIGNED",
        "STARTED",
        "INFO",
        "PROGRESS",
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "ERROR",
        "RETRIED",
    ]
    assert {c.value for c in FailureClass} == {
        "EXIT_CODE",
        "OOM",
        "TIMEOUT",
        "IMAGE_MISSING",
        "AGENT_LOST",
        "CANCELLED",
        "OUTPUT_INVALID",
        "EXECUTOR_ERROR",
        "QUEUE_TIMEOUT",
    }


def test_terminal_states() -> None:
    terminal = {s for s in OpRunState if s.is_terminal}
    assert terminal == {OpRunState.COMPLETED, OpRunState.FAILED, OpRunState.CANCELLED}


# ----------------------------------------------------------------------
# Constraints
# ----------------------------------------------------------------------


def test_constraints_defaults() -> None:
    c = Constraints()
    assert (c.cpu, c.ram_mb, c.vram_mb, c.gpu_count, c.gpu_id, c.timeout_s) == (
        0.0,
        0,
        0,
        0,
        None,
        None,
    )
    assert c.validate() == []


@pytest.mark.parametrize(
    ("constraints", "needed"),
    [
        (Constraints(), 0),
        (Constraints(cpu=4, ram_mb=1024), 0),
        (Constraints(vram_mb=8000), 1),
        (Constraints(gpu_id=3), 1),
        (Constraints(gpu_id=0), 1),
        (Constraints(gpu_count=2), 2),
        (Constraints(gpu_count=4, vram_mb=1000), 4),
    ],
)
def test_constraints_gpus_needed(constraints: Constraints, needed: int) -> None:
    assert constraints.gpus_needed == needed


def test_constraints_validate_collects_every_violation() -> None:
    c = Constraints(cpu=-1, ram_mb=-2, vram_mb=-3, gpu_count=-4, gpu_id=-1, timeout_s=-5)
    fields = [v.field for v in c.validate()]
    assert fields == ["cpu", "ram_mb", "vram_mb", "gpu_count", "gpu_id", "timeout_s"]


def test_constraints_gpu_id_implies_one_gpu() -> None:
    assert Constraints(gpu_id=1, gpu_count=1).validate() == []
    violations = Constraints(gpu_id=1, gpu_count=2).validate()
    assert [v.field for v in violations] == ["gpu_count"]


@pytest.mark.parametrize("timeout", [0.0, float("inf"), float("nan")])
def test_constraints_refuse_meaningless_timeouts(timeout: float) -> None:
    assert [v.field for v in Constraints(timeout_s=timeout).validate()] == ["timeout_s"]


def test_constraints_refuse_non_finite_cpu() -> None:
    assert [v.field for v in Constraints(cpu=float("nan")).validate()] == ["cpu"]


def test_constraints_round_trip() -> None:
    c = Constraints(cpu=1.5, ram_mb=2048, vram_mb=4096, gpu_count=1, gpu_id=2, timeout_s=30.0)
    data = json.loads(json.dumps(c.to_dict()))
    assert Constraints.from_dict(data) == c


def test_constraints_from_dict_tolerates_missing_and_null_keys() -> None:
    assert Constraints.from_dict({}) == Constraints()
    assert Constraints.from_dict({"cpu": None, "ram_mb": 512}) == Constraints(ram_mb=512)
    assert Constraints.from_dict({"cpu": 2}).cpu == 2.0


# ----------------------------------------------------------------------
# RetryPolicy
# ----------------------------------------------------------------------


def test_retry_policy_defaults() -> None:
    p = RetryPolicy()
    assert p.max_attempts == 3
    assert p.retry_on == (
        FailureClass.EXIT_CODE,
        FailureClass.OOM,
        FailureClass.TIMEOUT,
        FailureClass.AGENT_LOST,
        FailureClass.EXECUTOR_ERROR,
    )
    assert p.validate() == []


def test_delay_for_is_exponential_and_capped() -> None:
    p = RetryPolicy(initial_delay_s=1.0, backoff_multiplier=2.0, max_delay_s=10.0)
    assert [p.delay_for(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_delay_for_constant_backoff() -> None:
    p = RetryPolicy(initial_delay_s=5.0, backoff_multiplier=1.0, max_delay_s=60.0)
    assert {p.delay_for(n) for n in range(1, 20)} == {5.0}


def test_delay_for_attempts_below_one_count_as_one() -> None:
    p = RetryPolicy(initial_delay_s=3.0)
    assert p.delay_for(0) == 3.0
    assert p.delay_for(-4) == 3.0


def test_delay_for_huge_attempt_does_not_overflow() -> None:
    p = RetryPolicy(initial_delay_s=1.0, backoff_multiplier=10.0, max_delay_s=60.0)
    assert p.delay_for(100_000) == 60.0


def test_delay_for_zero_initial_delay() -> None:
    p = RetryPolicy(initial_delay_s=0.0, backoff_multiplier=10.0)
    assert p.delay_for(100_000) == 0.0


def test_retries_by_failure_class() -> None:
    p = RetryPolicy()
    assert p.retries(FailureClass.OOM)
    assert p.retries(FailureClass.AGENT_LOST)
    assert not p.retries(FailureClass.IMAGE_MISSING)
    assert not p.retries(FailureClass.OUTPUT_INVALID)
    assert not p.retries(FailureClass.CANCELLED)
    # An unclassified failure is an op failure.
    assert p.retries(None)
    assert not RetryPolicy(retry_on=(FailureClass.OOM,)).retries(None)


def test_retries_never_retries_cancelled() -> None:
    assert not RetryPolicy(retry_on=(FailureClass.CANCELLED,)).retries(FailureClass.CANCELLED)


def test_retry_policy_validate_collects_every_violation() -> None:
    p = RetryPolicy(
        max_attempts=0,
        initial_delay_s=-1,
        backoff_multiplier=0.5,
        max_delay_s=-2,
        retry_on=(FailureClass.CANCELLED,),
    )
    fields = [v.field for v in p.validate()]
    assert fields == [
        "max_attempts",
        "initial_delay_s",
        "max_delay_s",
        "backoff_multiplier",
        "retry_on",
    ]


def test_retry_policy_round_trip() -> None:
    p = RetryPolicy(
        max_attempts=5,
        initial_delay_s=0.5,
        backoff_multiplier=3.0,
        max_delay_s=30.0,
        retry_on=(FailureClass.OOM, FailureClass.TIMEOUT),
    )
    data = json.loads(json.dumps(p.to_dict()))
    assert data["retry_on"] == ["OOM", "TIMEOUT"]
    assert RetryPolicy.from_dict(data) == p


def test_retry_policy_from_dict_tolerates_missing_keys() -> None:
    assert RetryPolicy.from_dict({}) == RetryPolicy()
    assert RetryPolicy.from_dict({"retry_on": []}).retry_on == ()
    assert RetryPolicy.from_dict({"max_attempts": 1}) == RetryPolicy(max_attempts=1)


def test_retry_policy_from_dict_refuses_unknown_failure_class() -> None:
    with pytest.raises(ValueError):
        RetryPolicy.from_dict({"retry_on": ["SOLAR_FLARE"]})


# ----------------------------------------------------------------------
# EventDelivery, EventEntry, ExecutionSummary
# ----------------------------------------------------------------------


def test_event_delivery_round_trip() -> None:
    d = EventDelivery(topic="renders", attributes={"team": "vision"})
    assert EventDelivery.from_dict(d.to_dict()) == d
    assert EventDelivery.from_dict({}) == EventDelivery()


def test_event_delivery_to_dict_copies_attributes() -> None:
    d = EventDelivery(topic="t", attributes={"a": "1"})
    d.to_dict()["attributes"]["a"] = "2"
    assert d.attributes == {"a": "1"}


def test_event_entry_round_trip() -> None:
    e = EventEntry(
        t=datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        type=EventType.PROGRESS.value,
        msg=42,
        payload={"note": {"nested": [1, 2]}},
        seq=7,
    )
    data = json.loads(json.dumps(e.to_dict()))
    assert data["t"] == "2025-01-02T03:04:05.678901+00:00"
    assert EventEntry.from_dict(data) == e


def test_event_entry_from_dict_accepts_z_and_defaults() -> None:
    e = EventEntry.from_dict({"t": "2025-01-02T03:04:05Z", "type": "INFO"})
    assert e.t == datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert e.t.tzinfo is not None
    assert (e.msg, e.payload, e.seq) == ("", {}, 0)


def test_execution_summary_round_trip() -> None:
    s = ExecutionSummary(
        duration_ms=1500,
        worker_id="agent-1",
        error_message="boom",
        gpu_id=1,
        gpu_ids=[1, 3],
        failure_class=FailureClass.OOM,
        exit_code=137,
    )
    data = json.loads(json.dumps(s.to_dict()))
    assert data["failure_class"] == "OOM"
    assert ExecutionSummary.from_dict(data) == s
    assert ExecutionSummary.from_dict({}) == ExecutionSummary()


# ----------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------


def test_error_reasons_and_hierarchy() -> None:
    assert OpRunLockedException.reason == "RUN_LOCKED"
    assert InvalidTransition.reason == "INVALID_TRANSITION"
    assert InvalidInput.reason == "INVALID_INPUT"
    assert MaxAttemptsReached.reason == "MAX_ATTEMPTS_REACHED"
    assert StaleAttempt.reason == "STALE_ATTEMPT"
    assert NotFound.reason == "NOT_FOUND"
    assert AlreadyExists.reason == "ALREADY_EXISTS"
    for error in (
        OpRunLockedException,
        InvalidTransition,
        InvalidInput,
        StaleAttempt,
        NotFound,
        AlreadyExists,
    ):
        assert issubclass(error, GyozaError)
    assert issubclass(InvalidTransition, ValueError)
    assert issubclass(InvalidInput, ValueError)
    assert issubclass(MaxAttemptsReached, InvalidTransition)


def test_error_reasons_are_upper_snake() -> None:
    for error in (
        GyozaError,
        OpRunLockedException,
        InvalidTransition,
        InvalidInput,
        MaxAttemptsReached,
        StaleAttempt,
        NotFound,
        AlreadyExists,
    ):
        assert error.reason.replace("_", "").isalpha()
        assert error.reason == error.reason.upper()


def test_invalid_input_lists_every_violation() -> None:
    error = InvalidInput([FieldViolation("a", "is required"), FieldViolation("b.c", "too big")])
    assert error.violations == [
        FieldViolation("a", "is required"),
        FieldViolation("b.c", "too big"),
    ]
    assert str(error) == "invalid input: a: is required; b.c: too big"


def test_field_violation_is_frozen() -> None:
    v = FieldViolation("a", "b")
    with pytest.raises(dataclasses.FrozenInstanceError):
        v.field = "c"  # type: ignore[misc]


def test_stale_attempt_names_both_attempts() -> None:
    error = StaleAttempt("run_abc", 1, 2)
    assert (error.run_id, error.attempt, error.current_attempt) == ("run_abc", 1, 2)
    assert "attempt 1" in str(error)
    assert "current attempt is 2" in str(error)


# ----------------------------------------------------------------------
# Timestamps
# ----------------------------------------------------------------------


def test_parse_timestamp_variants() -> None:
    expected = datetime(2025, 5, 6, 7, 8, 9, tzinfo=UTC)
    assert parse_timestamp("2025-05-06T07:08:09Z") == expected
    assert parse_timestamp("2025-05-06T07:08:09+00:00") == expected
    assert parse_timestamp("2025-05-06T09:08:09+02:00") == expected
    # Without an offset, UTC is assumed: the domain holds aware datetimes only.
    assert parse_timestamp("2025-05-06T07:08:09") == expected
    assert parse_timestamp(datetime(2025, 5, 6, 7, 8, 9)) == expected
    other = datetime(2025, 5, 6, 9, 8, 9, tzinfo=timezone(timedelta(hours=2)))
    assert parse_timestamp(other) == expected
    assert parse_optional_timestamp(None) is None
    assert parse_optional_timestamp("") is None


def test_elapsed_ms_is_never_negative() -> None:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    assert elapsed_ms(start, start + timedelta(seconds=1.5)) == 1500
    assert elapsed_ms(start + timedelta(seconds=1), start) == 0
