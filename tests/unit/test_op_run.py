"""The OpRun aggregate: lifecycle, refusals, retries, cancel, serialisation."""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gyoza.models import (
    Constraints,
    EventDelivery,
    EventType,
    ExecutionSummary,
    FailureClass,
    InvalidInput,
    InvalidTransition,
    MaxAttemptsReached,
    OpAttempt,
    OpRun,
    OpRunState,
    RetryPolicy,
    StaleAttempt,
)
from gyoza.models import errors as errors_module
from gyoza.models.op_run import OpRunLockedException
from gyoza.models.reports import AgentReport, ReportedEvent
from gyoza.models.resources import is_active_run

T0 = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


class Clock:
    """A controllable stand-in for ``utc_now`` inside the aggregate."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr("gyoza.models.op_run.utc_now", fake)
    return fake


def new_run(**kwargs: Any) -> OpRun:
    return OpRun.create(image="busybox:latest", **kwargs)


def assigned_run(**kwargs: Any) -> OpRun:
    run = new_run(**kwargs)
    run.assign("agent-1", [0])
    return run


def running_run(**kwargs: Any) -> OpRun:
    run = assigned_run(**kwargs)
    run.add_event("STARTED", "started", {"worker_id": "agent-1", "gpu_id": 0})
    return run


def failed_run(failure_class: str = "EXIT_CODE", **kwargs: Any) -> OpRun:
    run = running_run(**kwargs)
    run.add_event("FAILED", "boom", {"failure_class": failure_class, "exit_code": 1})
    return run


def assert_refused(run: OpRun, error: type[BaseException], call: Callable[[], object]) -> None:
    """The call raises *error* and leaves the run exactly as it was."""
    before = run.to_dict()
    snapshot = copy.deepcopy(run)
    with pytest.raises(error):
        call()
    assert run.to_dict() == before
    assert run == snapshot


def event_types(run: OpRun) -> list[str]:
    return [e.type for e in run.events]


# ----------------------------------------------------------------------
# Creation and properties
# ----------------------------------------------------------------------


def test_create_makes_a_pending_run_with_its_first_attempt() -> None:
    run = new_run(priority=5, inputs={"x": 1})
    assert re.fullmatch(r"run_[0-9a-f]{12}", run.id)
    assert run.state is OpRunState.PENDING
    assert run.priority == 5
    assert run.image == "busybox:latest"
    assert run.current_attempt == 1
    assert len(run.attempts) == 1
    attempt = run.attempts[0]
    assert attempt.id == f"{run.id}_att_1"
    assert attempt.op_run_id == run.id
    assert attempt.state is OpRunState.PENDING
    assert attempt.inputs == {"x": 1}
    assert attempt.events == []
    assert attempt.started_at is None
    assert attempt.finished_at is None
    assert run.current_op_attempt is attempt
    assert run.created_at == run.updated_at
    assert run.created_at.tzinfo is not None


def test_create_defaults() -> None:
    run = new_run()
    assert run.priority == 0
    assert run.inputs == {}
    assert run.constraints == Constraints()
    assert run.retry_policy == RetryPolicy()
    assert run.event_delivery == EventDelivery()
    assert run.op_definition is None
    assert run.op_definition_version is None
    assert run.request_id is None
    assert run.cancel_requested is False
    assert run.next_retry_at is None
    assert run.progress == 0
    assert run.events == []
    assert run.outputs == {}
    assert run.execution_summary == ExecutionSummary()
    assert not run.is_locked


def test_create_records_definition_and_request() -> None:
    run = new_run(op_definition="resize", op_definition_version=3, request_id="req-1")
    assert (run.op_definition, run.op_definition_version, run.request_id) == (
        "resize",
        3,
        "req-1",
    )


def test_create_ids_are_unique() -> None:
    assert len({new_run().id for _ in range(200)}) == 200


def test_create_copies_inputs() -> None:
    inputs: dict[str, Any] = {"nested": {"a": 1}}
    run = new_run(inputs=inputs)
    inputs["nested"]["a"] = 2
    assert run.inputs == {"nested": {"a": 1}}


def test_create_collects_every_violation() -> None:
    with pytest.raises(InvalidInput) as caught:
        OpRun.create(
            image=" ",
            priority=-1,
            constraints=Constraints(cpu=-1),
            retry_policy=RetryPolicy(max_attempts=0),
        )
    assert [v.field for v in caught.value.violations] == [
        "image",
        "priority",
        "constraints.cpu",
        "retry_policy.max_attempts",
    ]


def test_run_without_attempts_exposes_empty_views() -> None:
    run = OpRun(id="run_000000000000", state=OpRunState.PENDING, priority=0, image="x")
    assert run.current_attempt == 0
    assert run.progress == 0
    assert run.events == []
    assert run.outputs == {}
    assert run.execution_summary == ExecutionSummary()
    with pytest.raises(ValueError):
        run.set_outputs({"a": 1})
    with pytest.raises(ValueError):
        run.add_event("INFO", "hello")


def test_op_run_locked_exception_is_reexported() -> None:
    assert OpRunLockedException is errors_module.OpRunLockedException


# ----------------------------------------------------------------------
# Direct updates
# ----------------------------------------------------------------------


def test_set_state(clock: Clock) -> None:
    run = new_run()
    clock.advance(1)
    run.set_state(OpRunState.RUNNING)
    assert run.state is OpRunState.RUNNING
    assert run.updated_at == clock.now


def test_set_priority(clock: Clock) -> None:
    run = new_run()
    clock.advance(1)
    run.set_priority(9)
    assert run.priority == 9
    assert run.updated_at == clock.now


@pytest.mark.parametrize("priority", [-1, True])
def test_set_priority_refuses_bad_values(priority: int) -> None:
    run = new_run(priority=2)
    assert_refused(run, ValueError, lambda: run.set_priority(priority))


def test_set_outputs_copies() -> None:
    run = new_run()
    outputs: dict[str, Any] = {"a": [1]}
    run.set_outputs(outputs)
    outputs["a"].append(2)
    assert run.outputs == {"a": [1]}


def test_set_execution_summary_is_partial() -> None:
    run = new_run()
    run.set_execution_summary(worker_id="agent-1", gpu_id=2)
    run.set_execution_summary(duration_ms=10, error_message="oops")
    run.set_execution_summary(gpu_ids=[2, 3], failure_class=FailureClass.OOM, exit_code=137)
    assert run.execution_summary == ExecutionSummary(
        duration_ms=10,
        worker_id="agent-1",
        error_message="oops",
        gpu_id=2,
        gpu_ids=[2, 3],
        failure_class=FailureClass.OOM,
        exit_code=137,
    )


# ----------------------------------------------------------------------
# Assignment
# ----------------------------------------------------------------------


def test_assign_moves_to_assigned_and_records_an_event(clock: Clock) -> None:
    run = new_run()
    clock.advance(1)
    entry = run.assign("agent-7", [2, 3])
    assert run.state is OpRunState.ASSIGNED
    assert run.attempts[0].state is OpRunState.ASSIGNED
    assert entry is run.events[-1]
    assert entry.type == "ASSIGNED"
    assert entry.seq == 1
    assert entry.t == clock.now
    assert entry.payload == {"worker_id": "agent-7", "gpu_ids": [2, 3]}
    summary = run.execution_summary
    assert (summary.worker_id, summary.gpu_ids, summary.gpu_id) == ("agent-7", [2, 3], 2)
    assert run.updated_at == clock.now


def test_assign_without_gpus() -> None:
    run = new_run()
    run.assign("agent-1")
    assert run.execution_summary.gpu_ids == []
    assert run.execution_summary.gpu_id is None
    assert run.events[-1].payload == {"worker_id": "agent-1", "gpu_ids": []}


@pytest.mark.parametrize("make", [assigned_run, running_run])
def test_assign_refuses_active_runs(make: Callable[[], OpRun]) -> None:
    run = make()
    assert_refused(run, InvalidTransition, lambda: run.assign("agent-2"))
    assert_refused(run, ValueError, lambda: run.assign("agent-2"))


def test_assign_refuses_terminal_runs() -> None:
    run = failed_run()
    assert_refused(run, OpRunLockedException, lambda: run.assign("agent-2"))


@pytest.mark.parametrize(
    ("worker", "gpus"),
    [("", None), ("  ", None), ("agent-1", [-1]), ("agent-1", [True]), ("agent-1", ["0"])],
)
def test_assign_refuses_bad_arguments(worker: str, gpus: list[int] | None) -> None:
    run = new_run()
    assert_refused(run, InvalidInput, lambda: run.assign(worker, gpus))


# ----------------------------------------------------------------------
# Events
# ----------------------------------------------------------------------


def test_started_moves_to_running_and_records_worker(clock: Clock) -> None:
    run = assigned_run()
    clock.advance(2)
    entry = run.add_event(EventType.STARTED, "go", {"worker_id": "agent-9", "gpu_id": 1})
    assert entry.type == "STARTED"
    assert type(entry.type) is str
    assert run.state is OpRunState.RUNNING
    assert run.attempts[0].state is OpRunState.RUNNING
    assert run.attempts[0].started_at == clock.now
    assert run.execution_summary.worker_id == "agent-9"
    assert run.execution_summary.gpu_id == 1


def test_started_with_gpu_ids() -> None:
    run = assigned_run()
    run.add_event("STARTED", "go", {"gpu_ids": [4, 5]})
    assert run.execution_summary.gpu_ids == [4, 5]
    assert run.execution_summary.gpu_id == 4
    assert run.execution_summary.worker_id == "agent-1"


@pytest.mark.parametrize("make", [new_run, running_run])
def test_started_requires_assigned(make: Callable[[], OpRun]) -> None:
    run = make()
    assert_refused(run, InvalidTransition, lambda: run.add_event("STARTED", "go"))


def test_events_are_numbered_per_attempt() -> None:
    run = running_run()
    run.add_event("INFO", "hello")
    run.add_event("PROGRESS", 10)
    assert [e.seq for e in run.events] == [1, 2, 3, 4]
    assert event_types(run) == ["ASSIGNED", "STARTED", "INFO", "PROGRESS"]
    assert run.attempts[0].last_seq == 4


def test_progress_updates_the_attempt() -> None:
    run = running_run()
    run.add_event("PROGRESS", 0)
    run.add_event("PROGRESS", 55)
    assert run.progress == 55
    run.add_event("PROGRESS", 100)
    assert run.progress == 100
    assert run.state is OpRunState.RUNNING


@pytest.mark.parametrize("value", [-1, 101, "50", True, 50.0, None])
def test_progress_refuses_bad_values(value: Any) -> None:
    run = running_run()
    assert_refused(run, InvalidInput, lambda: run.add_event("PROGRESS", value))


def test_info_and_error_change_no_state() -> None:
    run = running_run()
    run.add_event("INFO", "note", {"k": "v"})
    run.add_event("ERROR", "warning")
    assert run.state is OpRunState.RUNNING
    assert event_types(run)[-2:] == ["INFO", "ERROR"]
    assert run.events[-2].payload == {"k": "v"}


def test_completed_locks_the_run_with_outputs(clock: Clock) -> None:
    run = running_run()
    clock.advance(3)
    outputs: dict[str, Any] = {"url": "s3://x", "nested": {"a": 1}}
    run.add_event("COMPLETED", "done", {"outputs": outputs})
    outputs["nested"]["a"] = 2
    assert run.state is OpRunState.COMPLETED
    assert run.is_locked
    assert run.outputs == {"url": "s3://x", "nested": {"a": 1}}
    attempt = run.attempts[0]
    assert attempt.state is OpRunState.COMPLETED
    assert attempt.finished_at == clock.now
    assert run.execution_summary.duration_ms == 3000
    assert run.execution_summary.failure_class is None


def test_duration_reported_by_the_agent_wins(clock: Clock) -> None:
    run = running_run()
    clock.advance(3)
    run.add_event("COMPLETED", "done", {"duration_ms": 1234})
    assert run.execution_summary.duration_ms == 1234


def test_duration_of_an_attempt_never_started_counts_from_creation(clock: Clock) -> None:
    run = new_run()
    clock.advance(1.5)
    run.add_event("FAILED", "unschedulable")
    assert run.execution_summary.duration_ms == 1500


def test_failed_records_the_failure(clock: Clock) -> None:
    run = running_run()
    clock.advance(1)
    run.add_event(
        "FAILED",
        "out of memory",
        {"error_message": "killed", "failure_class": "OOM", "exit_code": 137},
    )
    assert run.state is OpRunState.FAILED
    assert run.is_locked
    summary = run.execution_summary
    assert (summary.error_message, summary.failure_class, summary.exit_code) == (
        "killed",
        FailureClass.OOM,
        137,
    )
    assert summary.duration_ms == 1000
    assert run.attempts[0].finished_at == clock.now


def test_failed_without_details_leaves_them_unknown() -> None:
    run = running_run()
    run.add_event("FAILED", "boom")
    assert run.execution_summary.failure_class is None
    assert run.execution_summary.error_message is None


def test_cancelled_event_records_failure_class() -> None:
    run = running_run()
    run.add_event("CANCELLED", "stopped", {"exit_code": 143})
    assert run.state is OpRunState.CANCELLED
    assert run.execution_summary.failure_class is FailureClass.CANCELLED
    assert run.execution_summary.exit_code == 143


def test_assigned_event_behaves_like_assign() -> None:
    run = new_run()
    run.add_event("ASSIGNED", "by hand", {"worker_id": "agent-3", "gpu_ids": [1]})
    assert run.state is OpRunState.ASSIGNED
    assert run.execution_summary.gpu_id == 1
    assert_refused(run, InvalidTransition, lambda: run.add_event("ASSIGNED", "again"))


def test_assigned_event_requires_worker() -> None:
    run = new_run()
    assert_refused(run, InvalidInput, lambda: run.add_event("ASSIGNED", "x", {}))


def test_retried_events_are_refused() -> None:
    run = running_run()
    assert_refused(run, InvalidTransition, lambda: run.add_event("RETRIED", "x"))


@pytest.mark.parametrize("event_type", ["BOGUS", "started", ""])
def test_unknown_event_types_are_refused(event_type: str) -> None:
    run = running_run()
    assert_refused(run, InvalidInput, lambda: run.add_event(event_type, "x"))
    assert_refused(run, ValueError, lambda: run.add_event(event_type, "x"))


@pytest.mark.parametrize(
    ("event_type", "payload"),
    [
        ("COMPLETED", {"outputs": ["not", "an", "object"]}),
        ("COMPLETED", {"duration_ms": -5}),
        ("FAILED", {"failure_class": "SOLAR_FLARE"}),
        ("FAILED", {"exit_code": "1"}),
        ("FAILED", {"error_message": 42}),
        ("STARTED", {"gpu_id": -1}),
        ("CANCELLED", {"outputs": 3}),
    ],
)
def test_malformed_payloads_are_refused(event_type: str, payload: dict[str, Any]) -> None:
    run = running_run() if event_type != "STARTED" else assigned_run()
    assert_refused(run, InvalidInput, lambda: run.add_event(event_type, "x", payload))


def test_payload_that_is_not_an_object_is_refused() -> None:
    run = running_run()
    bad: Any = ["x"]
    assert_refused(run, InvalidInput, lambda: run.add_event("INFO", "x", bad))


def test_malformed_payload_reports_every_violation() -> None:
    run = running_run()
    with pytest.raises(InvalidInput) as caught:
        run.add_event("FAILED", "x", {"failure_class": "NOPE", "exit_code": 1.5})
    assert [v.field for v in caught.value.violations] == [
        "payload.failure_class",
        "payload.exit_code",
    ]


def test_event_payload_is_copied() -> None:
    run = running_run()
    payload: dict[str, Any] = {"list": [1]}
    entry = run.add_event("INFO", "x", payload)
    payload["list"].append(2)
    assert entry.payload == {"list": [1]}


@pytest.mark.parametrize(
    "finish",
    [
        lambda r: r.add_event("COMPLETED", "done"),
        lambda r: r.add_event("FAILED", "boom"),
        lambda r: r.add_event("CANCELLED", "stop"),
    ],
)
@pytest.mark.parametrize("event_type", ["INFO", "PROGRESS", "STARTED", "COMPLETED", "BOGUS"])
def test_terminal_runs_refuse_events(finish: Callable[[OpRun], object], event_type: str) -> None:
    run = running_run()
    finish(run)
    msg: str | int = 5 if event_type == "PROGRESS" else "late"
    assert_refused(run, OpRunLockedException, lambda: run.add_event(event_type, msg))


# ----------------------------------------------------------------------
# Cancel
# ----------------------------------------------------------------------


def test_cancel_pending_run_is_immediate() -> None:
    run = new_run()
    assert run.request_cancel("not needed") is True
    assert run.state is OpRunState.CANCELLED
    assert run.is_locked
    assert run.cancel_requested is True
    assert event_types(run) == ["CANCELLED"]
    assert run.events[0].payload == {"reason": "not needed"}
    assert "not needed" in str(run.events[0].msg)
    assert run.execution_summary.failure_class is FailureClass.CANCELLED
    assert run.attempts[0].finished_at is not None


@pytest.mark.parametrize("make", [assigned_run, running_run])
def test_cancel_active_run_asks_the_agent(make: Callable[[], OpRun]) -> None:
    run = make()
    state = run.state
    assert run.request_cancel("user") is False
    assert run.state is state
    assert run.cancel_requested is True
    assert run.events[-1].type == "INFO"
    assert run.events[-1].msg == "cancel requested: user"


def test_second_cancel_request_is_a_no_op() -> None:
    run = running_run()
    run.request_cancel()
    before = run.to_dict()
    assert run.request_cancel("again") is False
    assert run.to_dict() == before


@pytest.mark.parametrize(
    "finish",
    [
        lambda r: r.add_event("COMPLETED", "done"),
        lambda r: r.add_event("FAILED", "boom"),
        lambda r: r.add_event("CANCELLED", "stop"),
    ],
)
def test_cancel_terminal_run_is_refused(finish: Callable[[OpRun], object]) -> None:
    run = running_run()
    finish(run)
    assert_refused(run, OpRunLockedException, lambda: run.request_cancel())


def test_completed_after_cancel_request_is_recorded_as_cancelled() -> None:
    run = running_run()
    run.request_cancel()
    entry = run.add_event("COMPLETED", "done", {"outputs": {"a": 1}})
    assert entry.type == "CANCELLED"
    assert "completed after cancel was requested" in str(entry.msg)
    assert entry.payload["reported_type"] == "COMPLETED"
    assert run.state is OpRunState.CANCELLED
    assert run.attempts[0].state is OpRunState.CANCELLED
    assert run.outputs == {"a": 1}
    assert run.execution_summary.failure_class is FailureClass.CANCELLED


def test_failed_after_cancel_request_is_recorded_as_cancelled() -> None:
    run = running_run()
    run.request_cancel()
    entry = run.add_event("FAILED", "exit 143", {"exit_code": 143, "failure_class": "EXIT_CODE"})
    assert entry.type == "CANCELLED"
    assert run.state is OpRunState.CANCELLED
    assert run.execution_summary.failure_class is FailureClass.CANCELLED
    assert run.execution_summary.exit_code == 143
    assert run.auto_retry_delay() is None


def test_cancel_calls_off_a_scheduled_automatic_retry(clock: Clock) -> None:
    run = failed_run()
    assert run.schedule_auto_retry() is not None
    assert run.request_cancel() is True
    assert run.next_retry_at is None
    assert run.cancel_requested is True
    assert run.state is OpRunState.FAILED
    assert run.auto_retry_delay() is None


# ----------------------------------------------------------------------
# Retry
# ----------------------------------------------------------------------


def test_retry_starts_a_new_attempt_and_keeps_the_old_one(clock: Clock) -> None:
    run = failed_run()
    first = run.attempts[0]
    first_events = list(first.events)
    clock.advance(5)
    attempt = run.retry(reason="flaky")
    assert run.state is OpRunState.PENDING
    assert run.current_attempt == 2
    assert attempt is run.attempts[1]
    assert attempt.id == f"{run.id}_att_2"
    assert attempt.created_at == clock.now
    assert [e.type for e in attempt.events] == ["RETRIED"]
    retried = attempt.events[0]
    assert retried.seq == 1
    assert retried.payload == {"previous_attempt": 1, "reason": "flaky"}
    assert run.attempts[0] is first
    assert first.events == first_events
    assert first.state is OpRunState.FAILED
    # The run shows the new attempt's data.
    assert run.progress == 0
    assert run.outputs == {}
    assert run.execution_summary == ExecutionSummary()
    assert run.updated_at == clock.now


def test_retry_of_a_cancelled_run_resets_cancel_request() -> None:
    run = running_run()
    run.request_cancel()
    run.add_event("CANCELLED", "stopped")
    run.retry()
    assert run.state is OpRunState.PENDING
    assert run.cancel_requested is False


def test_retried_run_runs_again() -> None:
    run = failed_run()
    run.retry()
    run.assign("agent-2", [1])
    run.add_event("STARTED", "again")
    run.add_event("COMPLETED", "ok", {"outputs": {"r": 2}})
    assert run.state is OpRunState.COMPLETED
    assert [e.seq for e in run.events] == [1, 2, 3, 4]
    assert event_types(run) == ["RETRIED", "ASSIGNED", "STARTED", "COMPLETED"]
    assert run.outputs == {"r": 2}


@pytest.mark.parametrize("make", [new_run, assigned_run, running_run])
def test_retry_refuses_active_runs(make: Callable[[], OpRun]) -> None:
    run = make()
    assert_refused(run, InvalidTransition, lambda: run.retry())
    assert_refused(run, InvalidTransition, lambda: run.retry(force=True))


def test_retry_refuses_completed_runs() -> None:
    run = running_run()
    run.add_event("COMPLETED", "done")
    assert_refused(run, InvalidTransition, lambda: run.retry(force=True))


def test_retry_respects_max_attempts() -> None:
    run = failed_run(retry_policy=RetryPolicy(max_attempts=2))
    assert run.can_retry()
    run.retry()
    run.add_event("FAILED", "again")
    assert not run.can_retry()
    assert_refused(run, MaxAttemptsReached, lambda: run.retry())
    assert_refused(run, InvalidTransition, lambda: run.retry())
    assert_refused(run, ValueError, lambda: run.retry())


def test_forced_retry_ignores_max_attempts() -> None:
    run = failed_run(retry_policy=RetryPolicy(max_attempts=1))
    assert not run.can_retry()
    run.retry(force=True)
    assert run.current_attempt == 2


def test_retry_clears_next_retry_at() -> None:
    run = failed_run()
    run.schedule_auto_retry()
    run.retry()
    assert run.next_retry_at is None


# ----------------------------------------------------------------------
# Automatic retry
# ----------------------------------------------------------------------


def test_auto_retry_backs_off(clock: Clock) -> None:
    policy = RetryPolicy(max_attempts=3, initial_delay_s=2.0, backoff_multiplier=3.0)
    run = failed_run(retry_policy=policy)
    assert run.auto_retry_delay() == 2.0
    assert run.schedule_auto_retry() == T0 + timedelta(seconds=2)
    assert run.next_retry_at == T0 + timedelta(seconds=2)
    run.retry()
    run.add_event("FAILED", "again", {"failure_class": "TIMEOUT"})
    assert run.auto_retry_delay() == 6.0
    run.retry()
    run.add_event("FAILED", "again", {"failure_class": "TIMEOUT"})
    assert run.auto_retry_delay() is None
    assert run.schedule_auto_retry() is None
    assert run.next_retry_at is None


def test_auto_retry_only_for_retried_failure_classes() -> None:
    assert failed_run("IMAGE_MISSING").auto_retry_delay() is None
    assert failed_run("OUTPUT_INVALID").auto_retry_delay() is None
    assert failed_run("OOM").auto_retry_delay() == 1.0


@pytest.mark.parametrize("make", [new_run, assigned_run, running_run])
def test_no_auto_retry_for_runs_that_did_not_fail(make: Callable[[], OpRun]) -> None:
    assert make().auto_retry_delay() is None


def test_schedule_auto_retry_from_a_given_time() -> None:
    run = failed_run()
    assert run.schedule_auto_retry(T0) == T0 + timedelta(seconds=1)


# ----------------------------------------------------------------------
# Released assignments
# ----------------------------------------------------------------------


def test_release_from_assigned_starts_a_new_attempt(clock: Clock) -> None:
    run = assigned_run()
    clock.advance(4)
    run.release_assignment("agent lost")
    assert run.state is OpRunState.PENDING
    assert run.current_attempt == 2
    old, new = run.attempts
    assert old.state is OpRunState.FAILED
    assert old.finished_at == clock.now
    assert [e.type for e in old.events] == ["ASSIGNED", "ERROR"]
    error = old.events[-1]
    assert error.seq == 2
    assert error.payload == {
        "released": True,
        "reason": "agent lost",
        "failure_class": "AGENT_LOST",
    }
    assert old.execution_summary.failure_class is FailureClass.AGENT_LOST
    assert old.execution_summary.error_message == "agent lost"
    assert old.execution_summary.duration_ms == 4000
    assert old.was_released
    assert [e.type for e in new.events] == ["RETRIED"]
    assert new.events[0].payload["previous_attempt"] == 1
    assert new.events[0].payload["reason"] == "agent lost"
    assert not new.was_released
    run.assign("agent-2")
    assert new.state is OpRunState.ASSIGNED


def test_release_from_running_with_a_failure_class() -> None:
    run = running_run()
    run.release_assignment("refused", FailureClass.EXECUTOR_ERROR)
    assert run.attempts[0].execution_summary.failure_class is FailureClass.EXECUTOR_ERROR
    assert run.state is OpRunState.PENDING


@pytest.mark.parametrize("make", [new_run, failed_run])
def test_release_refuses_runs_without_assignment(make: Callable[[], OpRun]) -> None:
    run = make()
    assert_refused(run, InvalidTransition, lambda: run.release_assignment("x"))


def test_release_refuses_unknown_failure_class() -> None:
    run = running_run()
    bad: Any = "SOLAR_FLARE"
    assert_refused(run, InvalidInput, lambda: run.release_assignment("x", bad))


def test_released_attempts_do_not_count_against_max_attempts() -> None:
    run = assigned_run(retry_policy=RetryPolicy(max_attempts=2))
    for _ in range(3):
        run.release_assignment("agent lost")
        run.assign("agent-x")
    assert run.current_attempt == 4
    assert run.attempts_used == 1
    run.add_event("FAILED", "boom")
    assert run.can_retry()
    run.retry()
    assert run.attempts_used == 2
    run.add_event("FAILED", "boom")
    assert not run.can_retry()


def test_release_after_cancel_request_ends_the_run_cancelled() -> None:
    run = running_run()
    run.request_cancel()
    run.release_assignment("agent lost")
    assert run.state is OpRunState.CANCELLED
    assert len(run.attempts) == 1
    assert run.events[-1].type == "CANCELLED"
    assert run.execution_summary.failure_class is FailureClass.CANCELLED
    assert run.execution_summary.error_message == "agent lost"


# ----------------------------------------------------------------------
# Agent reports: fencing and exactly-once
# ----------------------------------------------------------------------


def test_apply_report_moves_the_watermark() -> None:
    run = assigned_run()
    entry = run.apply_report(1, 1, "STARTED", "go")
    assert entry is not None
    assert entry.type == "STARTED"
    assert run.current_op_attempt.reported_seq == 1
    run.apply_report(1, 2, "PROGRESS", 20)
    assert run.current_op_attempt.reported_seq == 2


def test_apply_report_ignores_duplicates() -> None:
    run = assigned_run()
    run.apply_report(1, 1, "STARTED", "go")
    run.apply_report(1, 2, "COMPLETED", "done")
    before = run.to_dict()
    assert run.apply_report(1, 1, "STARTED", "go") is None
    # A resent final report after the run locked is a duplicate, not an error.
    assert run.apply_report(1, 2, "COMPLETED", "done") is None
    assert run.to_dict() == before


def test_apply_report_fences_stale_attempts() -> None:
    run = running_run()
    run.release_assignment("agent lost")
    assert_refused(run, StaleAttempt, lambda: run.apply_report(1, 5, "PROGRESS", 50))
    assert_refused(run, StaleAttempt, lambda: run.apply_report(3, 1, "PROGRESS", 50))
    with pytest.raises(StaleAttempt):
        run.ensure_current_attempt(1)
    run.ensure_current_attempt(2)


def test_refused_report_does_not_move_the_watermark() -> None:
    run = assigned_run()
    assert_refused(run, InvalidInput, lambda: run.apply_report(1, 1, "PROGRESS", 500))
    assert_refused(run, InvalidInput, lambda: run.apply_report(1, 0, "INFO", "x"))
    assert run.current_op_attempt.reported_seq == 0


# ----------------------------------------------------------------------
# Serialisation
# ----------------------------------------------------------------------


def a_run_with_history() -> OpRun:
    run = OpRun.create(
        image="ghcr.io/acme/op:1",
        priority=3,
        inputs={"prompt": "cat", "n": 2},
        constraints=Constraints(cpu=2, ram_mb=1024, vram_mb=4000, timeout_s=60),
        retry_policy=RetryPolicy(max_attempts=4, retry_on=(FailureClass.OOM,)),
        event_delivery=EventDelivery(topic="renders", attributes={"team": "a"}),
        op_definition="render",
        op_definition_version=2,
        request_id="req-9",
    )
    run.assign("agent-1", [0])
    run.apply_report(1, 1, "STARTED", "go", {"worker_id": "agent-1", "gpu_id": 0})
    run.apply_report(1, 2, "PROGRESS", 40)
    run.add_event("FAILED", "oom", {"failure_class": "OOM", "exit_code": 137})
    run.schedule_auto_retry()
    run.retry(reason="auto")
    run.assign("agent-2", [1])
    run.release_assignment("agent lost")
    run.assign("agent-3", [1])
    run.add_event("STARTED", "go")
    run.request_cancel("enough")
    return run


def test_round_trip_is_exact() -> None:
    run = a_run_with_history()
    data = json.loads(json.dumps(run.to_dict()))
    restored = OpRun.from_dict(data)
    assert restored == run
    assert restored.to_dict() == run.to_dict()
    assert len(restored.attempts) == 3
    assert restored.current_attempt == 3
    assert restored.cancel_requested is True


def test_round_trip_of_a_terminal_run_with_outputs() -> None:
    run = running_run()
    run.add_event("COMPLETED", "done", {"outputs": {"x": [1, 2]}})
    assert OpRun.from_dict(json.loads(json.dumps(run.to_dict()))) == run


def test_round_trip_keeps_next_retry_at() -> None:
    run = failed_run()
    run.schedule_auto_retry(T0)
    restored = OpRun.from_dict(run.to_dict())
    assert restored.next_retry_at == T0 + timedelta(seconds=1)


def test_to_dict_has_the_seed_keys_and_extensions() -> None:
    run = a_run_with_history()
    data = run.to_dict()
    assert set(data) == {
        "id",
        "state",
        "priority",
        "progress",
        "current_attempt",
        "image",
        "inputs",
        "outputs",
        "events",
        "execution_summary",
        "constraints",
        "retry_policy",
        "event_delivery",
        "op_definition",
        "opDefinitionVersion",
        "cancelRequested",
        "nextRetryAt",
        "requestId",
        "createdAt",
        "updatedAt",
        "output_specs",
        "attempts",
    }
    assert data["state"] == "RUNNING"
    assert data["current_attempt"] == 3
    assert data["events"] == [e.to_dict() for e in run.attempts[2].events]
    assert data["opDefinitionVersion"] == 2
    assert data["requestId"] == "req-9"
    assert data["cancelRequested"] is True
    assert data["nextRetryAt"] is None
    assert [a["attempt"] for a in data["attempts"]] == [1, 2, 3]


def test_to_dict_is_a_snapshot() -> None:
    run = running_run(inputs={"a": {"b": 1}})
    run.add_event("INFO", "x", {"p": [1]})
    data = run.to_dict()
    data["inputs"]["a"]["b"] = 2
    data["events"][-1]["payload"]["p"].append(2)
    data["attempts"][0]["inputs"]["a"]["b"] = 3
    assert run.inputs == {"a": {"b": 1}}
    assert run.events[-1].payload == {"p": [1]}
    assert run.attempts[0].inputs == {"a": {"b": 1}}


def test_from_dict_accepts_z_timestamps() -> None:
    data = new_run().to_dict()
    data["createdAt"] = "2025-01-01T00:00:00Z"
    data["updatedAt"] = "2025-01-01T00:00:01Z"
    run = OpRun.from_dict(data)
    assert run.created_at == datetime(2025, 1, 1, tzinfo=UTC)
    assert run.updated_at == datetime(2025, 1, 1, 0, 0, 1, tzinfo=UTC)


def seed_format(run: OpRun) -> dict[str, Any]:
    """The seed's serialisation: the run and its current attempt, flat."""
    data = run.to_dict()
    for key in ("attempts", "opDefinitionVersion", "cancelRequested", "nextRetryAt", "requestId"):
        del data[key]
    for event in data["events"]:
        del event["seq"]
    return data


def test_from_dict_of_the_seed_format_rebuilds_the_current_attempt() -> None:
    run = failed_run()
    run.retry()
    run.assign("agent-4", [2])
    run.add_event("STARTED", "go")
    run.add_event("PROGRESS", 70)
    restored = OpRun.from_dict(seed_format(run))
    assert restored.id == run.id
    assert restored.state is OpRunState.RUNNING
    assert len(restored.attempts) == 1
    attempt = restored.attempts[0]
    assert attempt.attempt == 2
    assert attempt.id == f"{run.id}_att_2"
    assert attempt.state is OpRunState.RUNNING
    assert restored.current_attempt == 2
    assert restored.progress == 70
    assert restored.execution_summary.worker_id == "agent-4"
    assert [e.seq for e in restored.events] == [1, 2, 3, 4]
    assert restored.events == run.events
    assert restored.inputs == run.inputs
    assert restored.cancel_requested is False
    # The next event and the next attempt continue the numbering.
    restored.add_event("FAILED", "boom")
    assert restored.events[-1].seq == 5
    restored.retry()
    assert restored.current_attempt == 3


def test_from_dict_seed_format_with_snake_case_and_missing_keys() -> None:
    data = {
        "id": "run_0123456789ab",
        "state": "PENDING",
        "image": "busybox",
        "created_at": "2025-01-01T00:00:00Z",
    }
    run = OpRun.from_dict(data)
    assert run.created_at == datetime(2025, 1, 1, tzinfo=UTC)
    assert run.current_attempt == 1
    assert run.constraints == Constraints()
    assert run.event_delivery == EventDelivery()
    run.assign("agent-1")
    assert run.state is OpRunState.ASSIGNED


def test_from_dict_without_attempt() -> None:
    data = {"id": "run_0123456789ab", "state": "PENDING", "image": "busybox", "current_attempt": 0}
    run = OpRun.from_dict(data)
    assert run.attempts == []
    assert run.current_attempt == 0


# ----------------------------------------------------------------------
# Rehydration
# ----------------------------------------------------------------------


def rehydrate_like(run: OpRun, attempts: list[OpAttempt]) -> OpRun:
    return OpRun.rehydrate(
        id=run.id,
        state=run.state.value,
        priority=run.priority,
        image=run.image,
        attempts=attempts,
        inputs=run.inputs,
        constraints=run.constraints,
        retry_policy=run.retry_policy,
        event_delivery=run.event_delivery,
        op_definition=run.op_definition,
        op_definition_version=run.op_definition_version,
        cancel_requested=run.cancel_requested,
        next_retry_at=run.next_retry_at,
        request_id=run.request_id,
        created_at=run.created_at,
        updated_at=run.updated_at,
    )


def test_rehydrate_rebuilds_every_attempt_in_order() -> None:
    run = a_run_with_history()
    attempts = [OpAttempt.from_dict(a.to_dict()) for a in reversed(run.attempts)]
    restored = rehydrate_like(run, attempts)
    assert restored == run
    assert restored.current_attempt == 3
    restored.add_event("PROGRESS", 10)
    assert restored.events[-1].seq == run.events[-1].seq + 1


def test_rehydrate_refuses_an_empty_or_foreign_history() -> None:
    run = a_run_with_history()
    with pytest.raises(ValueError):
        rehydrate_like(run, [])
    stranger = OpAttempt(id="run_other_att_1", op_run_id="run_other", attempt=1)
    with pytest.raises(ValueError):
        rehydrate_like(run, [*run.attempts, stranger])


# ----------------------------------------------------------------------
# OpAttempt
# ----------------------------------------------------------------------


def test_op_attempt_round_trip() -> None:
    run = a_run_with_history()
    for attempt in run.attempts:
        data = json.loads(json.dumps(attempt.to_dict()))
        assert OpAttempt.from_dict(data) == attempt


def test_op_attempt_defaults() -> None:
    attempt = OpAttempt(id="r_att_1", op_run_id="r", attempt=1)
    assert attempt.state is OpRunState.PENDING
    assert attempt.reported_seq == 0
    assert attempt.last_seq == 0
    assert not attempt.is_finished
    assert not attempt.was_released
    assert attempt.created_at.tzinfo is not None


# ----------------------------------------------------------------------------------------
# Event times: when it happened on the agent, and when the server applied it
# ----------------------------------------------------------------------------------------


def test_a_report_keeps_the_time_it_happened_and_the_time_it_was_applied(clock: Clock) -> None:
    run = assigned_run()
    clock.advance(60)  # the reports arrive a minute late (an outage, say)
    started_at = T0 + timedelta(seconds=1)
    ended_at = T0 + timedelta(seconds=11)
    run.apply_report(1, 1, "STARTED", "started", {"worker_id": "agent-1"}, at=started_at)
    run.apply_report(1, 2, "COMPLETED", "done", {"outputs": {}}, at=ended_at)
    started, completed = run.events[-2:]
    assert (started.t, started.applied) == (started_at, T0 + timedelta(seconds=60))
    assert (completed.t, completed.applied) == (ended_at, T0 + timedelta(seconds=60))
    attempt = run.current_op_attempt
    assert (attempt.started_at, attempt.finished_at) == (started_at, ended_at)
    assert run.execution_summary.duration_ms == 10_000
    assert run.updated_at == T0 + timedelta(seconds=60)


def test_a_report_time_from_the_future_reads_as_now(clock: Clock) -> None:
    run = assigned_run()
    run.apply_report(1, 1, "STARTED", "started", at=T0 + timedelta(hours=1))
    event = run.events[-1]
    assert (event.t, event.applied_at) == (T0, None)


def test_events_the_server_makes_are_applied_when_they_happen(clock: Clock) -> None:
    run = assigned_run()
    assert all(e.applied_at is None and e.applied == e.t for e in run.events)
    data = run.events[-1].to_dict()
    assert "applied_at" not in data


# ----------------------------------------------------------------------
# Agent reports: the run applies the typed event; its payload is data
# ----------------------------------------------------------------------


def report(run: OpRun, seq: int, event: ReportedEvent) -> AgentReport:
    return AgentReport(run.id, run.current_attempt, seq, T0, event=event)


def test_a_reported_payload_does_not_change_where_the_attempt_runs() -> None:
    run = assigned_run()
    started = ReportedEvent(EventType.STARTED, payload={"worker_id": "other", "gpu_ids": [5]})
    run.consume_report(report(run, 1, started), max_outputs_bytes=1024)
    assert run.state is OpRunState.RUNNING
    assert run.execution_summary.worker_id == "agent-1"
    assert run.execution_summary.gpu_ids == [0]
    assert run.events[-1].payload["worker_id"] == "other"  # recorded as it was sent


def test_a_reported_failure_applies_its_typed_fields_not_its_payload_keys() -> None:
    run = running_run()
    failed = ReportedEvent(
        EventType.FAILED,
        "exited with code 3",
        payload={"failure_class": "OOM", "exit_code": 9, "duration_ms": 1},
        failure_class=FailureClass.EXIT_CODE,
        exit_code=3,
        duration_ms=250,
    )
    run.consume_report(report(run, 1, failed), max_outputs_bytes=1024)
    summary = run.execution_summary
    assert summary.failure_class is FailureClass.EXIT_CODE
    assert (summary.exit_code, summary.duration_ms) == (3, 250)
    assert summary.error_message == "exited with code 3"


def test_a_reported_cancel_ignores_outputs_and_exit_code_in_its_payload() -> None:
    run = running_run()
    run.request_cancel("user")
    cancelled = ReportedEvent(
        EventType.CANCELLED, "stopped", payload={"outputs": {"x": 1}, "exit_code": 137}
    )
    run.consume_report(report(run, 1, cancelled), max_outputs_bytes=1024)
    assert run.state is OpRunState.CANCELLED
    assert run.outputs == {}
    assert run.execution_summary.exit_code is None


def test_a_reported_completion_without_outputs_completes_with_none() -> None:
    run = running_run()
    run.consume_report(
        report(run, 1, ReportedEvent(EventType.COMPLETED, "done")), max_outputs_bytes=1024
    )
    assert run.state is OpRunState.COMPLETED
    assert run.outputs == {}
    assert run.events[-1].payload["outputs"] == {}


@pytest.mark.parametrize(
    ("state", "retry_at", "active"),
    [
        (OpRunState.PENDING, None, True),
        (OpRunState.RUNNING, None, True),
        (OpRunState.FAILED, T0, True),
        (OpRunState.FAILED, None, False),
        (OpRunState.COMPLETED, None, False),
        (OpRunState.CANCELLED, None, False),
    ],
)
def test_an_active_run_has_one_definition(
    state: OpRunState, retry_at: datetime | None, active: bool
) -> None:
    run = new_run()
    run.state = state
    run.next_retry_at = retry_at
    assert run.is_active is active
    assert is_active_run(state, retry_at) is active
