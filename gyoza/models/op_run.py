"""OpRun aggregate root: the lifecycle of one execution run and its attempts."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any
from uuid import uuid4

from gyoza.models import event_rules
from gyoza.models.errors import (
    FieldViolation,
    InvalidInput,
    InvalidTransition,
    MalformedReport,
    MaxAttemptsReached,
    NotAssignedToAgent,
    OpRunLockedException,
    ReportGap,
    StaleAttempt,
)
from gyoza.models.op_attempt import OpAttempt, number_events
from gyoza.models.outputs import OutputSpec, output_violations
from gyoza.models.reports import AgentReport, ReportedEvent
from gyoza.models.resources import (
    Constraints,
    EventDelivery,
    EventEntry,
    EventType,
    ExecutionSummary,
    FailureClass,
    OpRunState,
    PendingReason,
    RetryPolicy,
    is_active_run,
)
from gyoza.models.timestamps import (
    elapsed_ms,
    format_optional_timestamp,
    format_timestamp,
    parse_optional_timestamp,
    utc_now,
)

__all__ = ["OpRun", "OpRunLockedException", "RunRequest"]

_RETRYABLE_STATES = frozenset({OpRunState.FAILED, OpRunState.CANCELLED})


@dataclass(frozen=True)
class RunRequest:
    """What a create asked for, as :meth:`OpRun.answers` compares it.

    Parameters
    ----------
    op_definition : str
        Definition name; empty for an ad-hoc run.
    op_definition_version : int | None
        Version asked for; ``None``: the latest.
    image : str
        Image, for an ad-hoc run.
    inputs : Mapping[str, Any]
        Inputs as sent (before defaults are filled in).
    """

    op_definition: str = ""
    op_definition_version: int | None = None
    image: str = ""
    inputs: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, run: OpRun) -> RunRequest:
        """The request *run* answers."""
        return cls(
            op_definition=run.op_definition or "",
            op_definition_version=run.op_definition_version,
            image="" if run.op_definition else run.image,
            inputs=run.inputs,
        )


@dataclass
class OpRun:
    """Aggregate root for execution runs.

    Encapsulates all attempts. Users interact only with the run; the current
    attempt's data (progress, events, outputs, execution summary) is exposed through
    properties. A new run starts with its first attempt; further attempts come from
    :meth:`retry` and :meth:`release_assignment`.

    Every method checks everything before it changes anything: a refused call leaves
    the run exactly as it was.

    Parameters
    ----------
    id : str
        Unique identifier, ``"run_"`` and 12 hex digits.
    state : OpRunState
        Current state of the run (that of its current attempt).
    priority : int
        Scheduling priority; higher runs first, FIFO within a priority.
    image : str
        Docker image reference.
    inputs : dict[str, Any]
        Input parameters.
    constraints : Constraints
        Resources the run needs.
    retry_policy : RetryPolicy
        Failure recovery rules.
    event_delivery : EventDelivery
        Topic publication of the run's events.
    op_definition : str | None
        Name of the OpDefinition it was created from (``None`` for ad-hoc runs).
    op_definition_version : int | None
        Version of that definition.
    cancel_requested : bool
        A cancel was asked for; the run will not end COMPLETED.
    next_retry_at : datetime | None
        When the server will retry the failed run automatically (set by the server).
    request_id : str | None
        Idempotency key of the create request.
    output_specs : list[OutputSpec]
        Outputs its definition declares (empty: any outputs object). A COMPLETED
        report whose outputs break them is recorded as FAILED ``OUTPUT_INVALID``.
    created_at : datetime
        When the run was created.
    updated_at : datetime
        When the run last changed.
    pending_reason : PendingReason | None
        Why a PENDING run waits, as the server's scheduler last saw it. Not stored:
        the scheduler derives it again on each placement pass.
    """

    id: str
    state: OpRunState
    priority: int
    image: str
    inputs: dict[str, Any] = field(default_factory=dict)
    constraints: Constraints = field(default_factory=Constraints)
    retry_policy: RetryPolicy = field(default_factory=RetryPolicy)
    event_delivery: EventDelivery = field(default_factory=EventDelivery)
    op_definition: str | None = None
    op_definition_version: int | None = None
    cancel_requested: bool = False
    next_retry_at: datetime | None = None
    request_id: str | None = None
    output_specs: list[OutputSpec] = field(default_factory=list)
    created_at: datetime = field(default_factory=utc_now)
    updated_at: datetime = field(default_factory=utc_now)
    pending_reason: PendingReason | None = field(default=None, compare=False)
    _attempts: list[OpAttempt] = field(default_factory=list, repr=False)
    _current_attempt_index: int = field(default=-1, repr=False)

    # ------------------------------------------------------------------
    # Factories
    # ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        image: str,
        priority: int = 0,
        inputs: dict[str, Any] | None = None,
        constraints: Constraints | None = None,
        retry_policy: RetryPolicy | None = None,
        event_delivery: EventDelivery | None = None,
        op_definition: str | None = None,
        op_definition_version: int | None = None,
        request_id: str | None = None,
        output_specs: list[OutputSpec] | None = None,
    ) -> OpRun:
        """Create a PENDING run with its first attempt.

        Parameters
        ----------
        image : str
            Docker image reference (non-empty).
        priority : int
            Scheduling priority, >= 0.
        inputs : dict[str, Any] | None
            Input parameters.
        constraints : Constraints | None
            Resources needed.
        retry_policy : RetryPolicy | None
            Failure recovery rules.
        event_delivery : EventDelivery | None
            Topic publication.
        op_definition : str | None
            Parent OpDefinition name.
        op_definition_version : int | None
            Parent OpDefinition version.
        request_id : str | None
            Idempotency key of the create request.
        output_specs : list[OutputSpec] | None
            Declared outputs its outputs must keep.

        Returns
        -------
        OpRun
            The new run.

        Raises
        ------
        InvalidInput
            With every violation: empty image, negative priority, invalid
            constraints or retry policy.
        """
        constraints = constraints if constraints is not None else Constraints()
        retry_policy = retry_policy if retry_policy is not None else RetryPolicy()
        inputs = {} if inputs is None else inputs
        violations = cls.settings_violations(image, priority, constraints, retry_policy)
        if not isinstance(inputs, dict):
            violations.append(FieldViolation("inputs", "must be an object"))
        if violations:
            raise InvalidInput(violations)
        now = utc_now()
        run = cls(
            id=f"run_{uuid4().hex[:12]}",
            state=OpRunState.PENDING,
            priority=priority,
            image=image,
            inputs=copy.deepcopy(inputs),
            constraints=constraints,
            retry_policy=retry_policy,
            event_delivery=event_delivery if event_delivery is not None else EventDelivery(),
            op_definition=op_definition,
            op_definition_version=op_definition_version,
            request_id=request_id,
            output_specs=list(output_specs or []),
            created_at=now,
            updated_at=now,
        )
        run._open_attempt(now)
        return run

    @classmethod
    def rehydrate(
        cls,
        *,
        id: str,
        state: OpRunState | str,
        priority: int,
        image: str,
        attempts: list[OpAttempt],
        inputs: dict[str, Any] | None = None,
        constraints: Constraints | None = None,
        retry_policy: RetryPolicy | None = None,
        event_delivery: EventDelivery | None = None,
        op_definition: str | None = None,
        op_definition_version: int | None = None,
        cancel_requested: bool = False,
        next_retry_at: datetime | None = None,
        request_id: str | None = None,
        output_specs: list[OutputSpec] | None = None,
        created_at: datetime | None = None,
        updated_at: datetime | None = None,
    ) -> OpRun:
        """Rebuild a stored run with all its attempts; the last one is current.

        Meant for repositories: nothing is validated beyond the attempts' shape.

        Raises
        ------
        ValueError
            When *attempts* is empty or holds an attempt of another run.
        """
        if not attempts:
            raise ValueError(f"run {id} needs at least one attempt")
        strangers = [a.id for a in attempts if a.op_run_id != id]
        if strangers:
            raise ValueError(f"attempts {strangers} do not belong to run {id}")
        ordered = sorted(attempts, key=lambda a: a.attempt)
        now = utc_now()
        return cls(
            id=id,
            state=OpRunState(state),
            priority=priority,
            image=image,
            inputs={} if inputs is None else inputs,
            constraints=constraints if constraints is not None else Constraints(),
            retry_policy=retry_policy if retry_policy is not None else RetryPolicy(),
            event_delivery=event_delivery if event_delivery is not None else EventDelivery(),
            op_definition=op_definition,
            op_definition_version=op_definition_version,
            cancel_requested=cancel_requested,
            next_retry_at=next_retry_at,
            request_id=request_id,
            output_specs=list(output_specs or []),
            created_at=created_at or now,
            updated_at=updated_at or now,
            _attempts=ordered,
            _current_attempt_index=len(ordered) - 1,
        )

    @staticmethod
    def settings_violations(
        image: str, priority: int, constraints: Constraints, retry_policy: RetryPolicy
    ) -> list[FieldViolation]:
        """Every problem with the settings a new run would be created with."""
        violations: list[FieldViolation] = []
        if not isinstance(image, str) or not image.strip():
            violations.append(FieldViolation("image", "must not be empty"))
        violations.extend(event_rules.priority_violations(priority))
        violations.extend(
            FieldViolation(f"constraints.{v.field}", v.description) for v in constraints.validate()
        )
        violations.extend(
            FieldViolation(f"retry_policy.{v.field}", v.description)
            for v in retry_policy.validate()
        )
        return violations

    # ------------------------------------------------------------------
    # Properties: the current attempt's data, exposed on the run
    # ------------------------------------------------------------------

    @property
    def current_attempt(self) -> int:
        """Current attempt number (1-based; 0 when the run has no attempt)."""
        if self._current_attempt_index < 0:
            return 0
        return self._attempts[self._current_attempt_index].attempt

    @property
    def current_op_attempt(self) -> OpAttempt:
        """The current attempt itself.

        Raises
        ------
        InvalidTransition
            When the run has no attempt.
        """
        return self._current()

    @property
    def progress(self) -> int:
        """Current progress percentage (0-100)."""
        if self._current_attempt_index < 0:
            return 0
        return self._attempts[self._current_attempt_index].progress

    @property
    def events(self) -> list[EventEntry]:
        """Event timeline of the current attempt."""
        if self._current_attempt_index < 0:
            return []
        return self._attempts[self._current_attempt_index].events

    @property
    def outputs(self) -> dict[str, Any]:
        """Outputs of the current attempt."""
        if self._current_attempt_index < 0:
            return {}
        return self._attempts[self._current_attempt_index].outputs

    @property
    def execution_summary(self) -> ExecutionSummary:
        """Execution metadata of the current attempt."""
        if self._current_attempt_index < 0:
            return ExecutionSummary()
        return self._attempts[self._current_attempt_index].execution_summary

    @property
    def attempts(self) -> list[OpAttempt]:
        """All attempts, oldest first."""
        return self._attempts

    @property
    def attempts_used(self) -> int:
        """Attempts that count against ``max_attempts`` (released ones do not)."""
        return self.current_attempt - sum(1 for a in self._attempts if a.was_released)

    @property
    def is_locked(self) -> bool:
        """True when the run is in a terminal state."""
        return self.state.is_terminal

    @property
    def is_active(self) -> bool:
        """True while the run can still change by itself: not terminal, or FAILED with an
        automatic retry scheduled (:func:`~gyoza.models.resources.is_active_run`). The
        server keeps the active runs in memory."""
        return is_active_run(self.state, self.next_retry_at)

    @property
    def on_agent(self) -> bool:
        """True when an agent holds the current attempt (ASSIGNED or RUNNING)."""
        return self.state.on_agent

    # ------------------------------------------------------------------
    # Direct updates
    # ------------------------------------------------------------------

    def set_state(self, new_state: OpRunState) -> None:
        """Set the run state directly, bypassing the state machine.

        Parameters
        ----------
        new_state : OpRunState
            New state to apply.
        """
        state = OpRunState(new_state)
        self.state = state
        self.updated_at = utc_now()

    def set_priority(self, priority: int) -> None:
        """Change the scheduling priority.

        Parameters
        ----------
        priority : int
            New priority, >= 0.

        Raises
        ------
        InvalidInput
            If *priority* is negative (a ``ValueError``).
        """
        violations = event_rules.priority_violations(priority)
        if violations:
            raise InvalidInput(violations)
        self.priority = priority
        self.updated_at = utc_now()

    def change_priority(self, priority: int) -> EventEntry:
        """Change the priority of a run that is not terminal, and say so in its timeline
        (an INFO event carrying ``{"priority": priority}``).

        Raises
        ------
        InvalidInput
            If *priority* is not an integer >= 0 (checked first).
        OpRunLockedException
            If the run is terminal.
        """
        violations = event_rules.priority_violations(priority)
        if violations:
            raise InvalidInput(violations)
        if self.is_locked:
            raise OpRunLockedException(
                f"OpRun {self.id} is in terminal state {self.state.value}; "
                "its priority cannot change"
            )
        self.set_priority(priority)
        return self.add_event(
            EventType.INFO.value, f"priority set to {priority}", {"priority": priority}
        )

    def answers(self, request: RunRequest) -> bool:
        """Whether this run is what *request* asks for: the idempotency rule of a create
        that reuses this run's ``request_id``.

        The run keeps what its first request led to (inputs with defaults filled in, the
        definition version that was latest then), so a repeat matches when everything
        it asks for is there. The priority is not compared: it may have changed since.
        """
        if (self.op_definition or "") != request.op_definition:
            return False
        if request.op_definition:
            if request.op_definition_version not in (None, self.op_definition_version):
                return False
        elif self.image != request.image:
            return False
        return all(self.inputs.get(key) == value for key, value in request.inputs.items())

    def set_outputs(self, outputs: dict[str, Any]) -> None:
        """Replace the outputs of the current attempt.

        Parameters
        ----------
        outputs : dict[str, Any]
            Output values.
        """
        attempt = self._current()
        if not isinstance(outputs, dict):
            raise InvalidInput([FieldViolation("outputs", "must be an object")])
        attempt.outputs = copy.deepcopy(outputs)
        self.updated_at = utc_now()

    def set_execution_summary(
        self,
        duration_ms: int | None = None,
        worker_id: str | None = None,
        error_message: str | None = None,
        gpu_id: int | None = None,
        gpu_ids: list[int] | None = None,
        failure_class: FailureClass | None = None,
        exit_code: int | None = None,
    ) -> None:
        """Update the current attempt's summary; ``None`` leaves a field as it is.

        Parameters
        ----------
        duration_ms : int | None
            Execution duration in milliseconds.
        worker_id : str | None
            Executing agent.
        error_message : str | None
            Error description.
        gpu_id : int | None
            GPU used.
        gpu_ids : list[int] | None
            GPUs used.
        failure_class : FailureClass | None
            Class of the failure.
        exit_code : int | None
            Container exit code.
        """
        summary = self._current().execution_summary
        resolved_class = None if failure_class is None else FailureClass(failure_class)
        if duration_ms is not None:
            summary.duration_ms = duration_ms
        if worker_id is not None:
            summary.worker_id = worker_id
        if error_message is not None:
            summary.error_message = error_message
        if gpu_id is not None:
            summary.gpu_id = gpu_id
        if gpu_ids is not None:
            summary.gpu_ids = list(gpu_ids)
        if resolved_class is not None:
            summary.failure_class = resolved_class
        if exit_code is not None:
            summary.exit_code = exit_code
        self.updated_at = utc_now()

    # ------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------

    def assign(self, worker_id: str, gpu_ids: list[int] | None = None) -> EventEntry:
        """Hand the PENDING run to an agent: ``PENDING → ASSIGNED``.

        Records an ASSIGNED event and the worker and GPUs in the summary.

        Parameters
        ----------
        worker_id : str
            Agent that will execute the run.
        gpu_ids : list[int] | None
            GPU indexes assigned on that agent.

        Returns
        -------
        EventEntry
            The ASSIGNED event.

        Raises
        ------
        OpRunLockedException
            If the run is in a terminal state.
        InvalidTransition
            If the run is not PENDING (a ``ValueError``).
        InvalidInput
            If *worker_id* is empty or a GPU index is not a non-negative integer.
        """
        ids = [] if gpu_ids is None else list(gpu_ids)
        return self.add_event(
            EventType.ASSIGNED.value,
            f"assigned to {worker_id}",
            {"worker_id": worker_id, "gpu_ids": ids},
        )

    def add_event(
        self,
        event_type: str,
        msg: str | int,
        payload: dict[str, Any] | None = None,
        *,
        at: datetime | None = None,
    ) -> EventEntry:
        """Append an event to the current attempt and react to its type.

        - ``ASSIGNED``: as :meth:`assign` (payload ``worker_id``, ``gpu_ids``).
        - ``STARTED``: requires ASSIGNED → RUNNING; records payload ``worker_id``,
          ``gpu_id``, ``gpu_ids`` and the start time.
        - ``PROGRESS``: msg is the percentage, an integer from 0 to 100.
        - ``COMPLETED``: → COMPLETED; payload ``outputs`` become the outputs.
        - ``FAILED``: → FAILED; payload ``error_message``, ``failure_class`` (a
          :class:`FailureClass` name), ``exit_code`` go to the summary.
        - ``CANCELLED``: → CANCELLED, failure class CANCELLED.
        - ``INFO``, ``ERROR``: recorded only.
        - ``RETRIED``: refused; :meth:`retry` records it.

        An ending event sets ``duration_ms`` (payload ``duration_ms``, else the time
        since the STARTED event, else since the attempt was created). Once a cancel
        was requested, COMPLETED and FAILED reports are recorded as CANCELLED: a
        cancelled run never reads COMPLETED. A COMPLETED report whose outputs break
        the run's :attr:`output_specs` is recorded as FAILED ``OUTPUT_INVALID``.

        The event's time ``t`` is *at*, when it happened (an agent's report time; never
        later than now), else now; ``applied_at`` is when it was applied. The attempt's
        start and end times follow the event's time.

        Parameters
        ----------
        event_type : str
            An :class:`EventType` value.
        msg : str | int
            Human-readable message, or the PROGRESS percentage.
        payload : dict[str, Any] | None
            Event-specific data.
        at : datetime | None
            When the event happened (aware); ``None``: now.

        Returns
        -------
        EventEntry
            The entry appended, its ``seq`` set.

        Raises
        ------
        OpRunLockedException
            If the run is in a terminal state.
        InvalidTransition
            If the event is not allowed in the current state.
        InvalidInput
            If the event type is unknown, or msg or payload are malformed.
        """
        self._ensure_not_locked()
        kind = event_rules.event_type(event_type)
        data: dict[str, Any] = {} if payload is None else payload
        self._check_event(kind, msg, data)
        recorded = copy.deepcopy(data)
        event, placement = _typed_event(kind, msg, recorded)
        return self._apply_at(event, msg, recorded, at, placement)

    def _apply_at(
        self,
        event: ReportedEvent,
        msg: str | int,
        payload: dict[str, Any],
        at: datetime | None,
        placement: _Placement | None = None,
    ) -> EventEntry:
        """Apply a checked *event* to the current attempt as having happened *at*
        (never later than now), recording ``(msg, payload)`` as its timeline entry."""
        now = utc_now()
        happened = now if at is None else min(at, now)
        return self._apply_event(self._current(), event, msg, payload, happened, now, placement)

    def apply_report(
        self,
        attempt: int,
        seq: int,
        event_type: str,
        msg: str | int,
        payload: dict[str, Any] | None = None,
        *,
        at: datetime | None = None,
    ) -> EventEntry | None:
        """Apply an agent's numbered report exactly once.

        The report is fenced by its attempt number; one whose ``seq`` is not past
        the attempt's ``reported_seq`` watermark was applied already and is ignored
        (the caller acknowledges it again). Otherwise it is applied as
        :meth:`add_event` and the watermark moves to ``seq``.

        Parameters
        ----------
        attempt : int
            Attempt number the report is for.
        seq : int
            The agent's sequence number for the report (1-based, per attempt).
        event_type, msg, payload
            As for :meth:`add_event`.
        at : datetime | None
            When the agent says the event happened (its report time).

        Returns
        -------
        EventEntry | None
            The entry appended, or ``None`` for a duplicate.

        Raises
        ------
        StaleAttempt
            If *attempt* is not the current attempt.
        InvalidInput
            If *seq* is below 1, or as :meth:`add_event`.
        OpRunLockedException, InvalidTransition
            As :meth:`add_event`; the watermark does not move.
        """
        self.ensure_current_attempt(attempt)
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise InvalidInput([FieldViolation("seq", "must be an integer >= 1")])
        current = self._current()
        if seq <= current.reported_seq:
            return None
        entry = self.add_event(event_type, msg, payload, at=at)
        current.reported_seq = seq
        return entry

    def fence(self, attempt: int, worker_id: str) -> None:
        """Refuse an agent's message unless it is for the current attempt and that
        attempt is assigned to *worker_id* (the ``(run_id, attempt)`` fencing token).

        Raises
        ------
        StaleAttempt
            If *attempt* is not the current attempt.
        NotAssignedToAgent
            If the current attempt is not assigned to *worker_id*.
        """
        self.ensure_current_attempt(attempt)
        if self.execution_summary.worker_id != worker_id:
            raise NotAssignedToAgent(
                f"run {self.id} attempt {attempt} is not assigned to agent {worker_id}"
            )

    def consume_report(self, report: AgentReport, *, max_outputs_bytes: int) -> bool:
        """Consume an agent's numbered report exactly once, in seq order.

        This is the only writer of the attempt's ``reported_seq`` watermark. A report at
        or below it was consumed before: nothing changes and False is returned (the
        caller acknowledges it again). The next one is consumed: its event is applied
        (held to *max_outputs_bytes*, see :meth:`ReportedEvent.held_to`), log lines
        change nothing here, and the watermark moves to its seq. A report the run
        refuses is consumed too, so that the attempt's later reports still apply: the
        watermark moves and the refusal is raised.

        The caller fences the report first (:meth:`fence`).

        Returns
        -------
        bool
            True when the report was consumed now.

        Raises
        ------
        ReportGap
            If the report is past the next seq; nothing changes.
        MalformedReport
            If the report was malformed (``report.refusal``); consumed.
        OpRunLockedException, InvalidTransition, InvalidInput
            If the run refuses the event; consumed.
        """
        current = self._current()
        if report.seq <= current.reported_seq:
            return False
        if report.seq != current.reported_seq + 1:
            raise ReportGap(
                f"report {report.seq} of run {self.id} attempt {report.attempt} follows "
                f"{current.reported_seq}"
            )
        current.reported_seq = report.seq
        if report.refusal:
            raise MalformedReport(report.refusal)
        if report.event is not None:
            event = report.event.held_to(max_outputs_bytes).as_recorded()
            msg, payload = event.timeline_entry(
                self.execution_summary.worker_id or "", list(self.execution_summary.gpu_ids)
            )
            # The event's time is when it happened on the agent (its report time). The
            # payload is recorded as data; the run applies the event's typed fields.
            self._ensure_not_locked()
            self._check_event(event.type, msg, payload)
            self._apply_at(event, msg, payload, report.time)
        return True

    def ensure_current_attempt(self, attempt: int) -> None:
        """Refuse a message addressed to an attempt other than the current one.

        Raises
        ------
        StaleAttempt
            If *attempt* is not the current attempt number.
        """
        if attempt != self.current_attempt:
            raise StaleAttempt(self.id, attempt, self.current_attempt)

    def request_cancel(self, reason: str = "") -> bool:
        """Ask for the run to be cancelled.

        - PENDING: cancelled at once (CANCELLED event); returns True.
        - ASSIGNED or RUNNING: marks ``cancel_requested`` and records an INFO event;
          the agent must stop the container and report. Returns False.
        - Cancel already requested: nothing changes; returns False.
        - FAILED with an automatic retry scheduled: the retry is called off
          (``next_retry_at`` cleared, ``cancel_requested`` set); returns True.

        Parameters
        ----------
        reason : str
            Why, for the timeline.

        Returns
        -------
        bool
            True when the run is done now, False when the agent has to stop it.

        Raises
        ------
        OpRunLockedException
            If the run is otherwise in a terminal state.
        """
        if self.state is OpRunState.FAILED and self.next_retry_at is not None:
            self.next_retry_at = None
            self.cancel_requested = True
            self.updated_at = utc_now()
            return True
        self._ensure_not_locked()
        attempt = self._current()
        suffix = f": {reason}" if reason else ""
        now = utc_now()
        if self.state is OpRunState.PENDING:
            self.cancel_requested = True
            payload: dict[str, Any] = {"reason": reason}
            self._apply_event(
                attempt,
                ReportedEvent(EventType.CANCELLED, payload=payload),
                f"cancelled{suffix}",
                payload,
                now,
            )
            return True
        if self.cancel_requested:
            return False
        self.cancel_requested = True
        self._record(attempt, EventType.INFO, f"cancel requested{suffix}", {"reason": reason}, now)
        self.updated_at = now
        return False

    def expire_in_queue(self, waited_s: float) -> EventEntry:
        """Fail the current attempt because it waited in the queue past its
        ``constraints.queue_timeout_s``: a FAILED event with failure class
        ``QUEUE_TIMEOUT``; the retry policy then decides as for any failure.

        Raises
        ------
        InvalidTransition
            If the run is not PENDING.
        """
        if self.state is not OpRunState.PENDING:
            raise InvalidTransition(
                f"only PENDING runs time out in the queue; run {self.id} is {self.state.value}"
            )
        limit = self.constraints.queue_timeout_s or 0.0
        message = f"not placed within its queue timeout of {limit:g}s (waited {waited_s:.1f}s)"
        payload: dict[str, Any] = {
            "error_message": message,
            "failure_class": FailureClass.QUEUE_TIMEOUT.value,
        }
        event = ReportedEvent(
            EventType.FAILED,
            message,
            payload=payload,
            failure_class=FailureClass.QUEUE_TIMEOUT,
            error_message=message,
        )
        return self._apply_event(self._current(), event, message, payload, utc_now())

    def queued_since(self) -> datetime:
        """When the current attempt began to wait for an agent (its creation)."""
        return self._current().created_at

    def release_assignment(
        self, reason: str, failure_class: FailureClass = FailureClass.AGENT_LOST
    ) -> None:
        """End the current attempt because its agent was lost or refused it.

        From ASSIGNED or RUNNING: the attempt gets an ERROR event and ends FAILED
        with *failure_class* and *reason* in its summary; a new attempt starts with a
        RETRIED event and the run is PENDING again. Released attempts do not count
        against ``max_attempts``. When a cancel was requested, the run ends
        CANCELLED instead of being queued again.

        Parameters
        ----------
        reason : str
            Why the assignment was released.
        failure_class : FailureClass
            Class recorded on the ended attempt.

        Raises
        ------
        InvalidTransition
            If the run is not ASSIGNED or RUNNING.
        """
        if not self.state.on_agent:
            raise InvalidTransition(
                f"only ASSIGNED or RUNNING runs can be released; run {self.id} is "
                f"{self.state.value}"
            )
        resolved = event_rules.failure_class(failure_class)
        attempt = self._current()
        now = utc_now()
        text = "assignment released" + (f": {reason}" if reason else "")
        details: dict[str, Any] = {
            "released": True,
            "reason": reason,
            "failure_class": resolved.value,
        }
        if self.cancel_requested:
            # The user asked to stop it: queueing it again would run it again.
            cancelled = ReportedEvent(EventType.CANCELLED, payload=details)
            self._apply_event(attempt, cancelled, f"cancelled after {text}", details, now)
            attempt.execution_summary.error_message = reason or None
            return
        self._record(attempt, EventType.ERROR, text, details, now)
        summary = attempt.execution_summary
        summary.failure_class = resolved
        summary.error_message = reason
        self._end(attempt, OpRunState.FAILED, 0, now)
        self._open_attempt(now, previous=attempt.attempt, reason=reason, released=True)
        self.state = OpRunState.PENDING
        self.next_retry_at = None
        self.updated_at = now

    # ------------------------------------------------------------------
    # Retry
    # ------------------------------------------------------------------

    def can_retry(self) -> bool:
        """True when the counted attempts are below ``max_attempts``."""
        return self.attempts_used < self.retry_policy.max_attempts

    def retry(self, force: bool = False, reason: str = "") -> OpAttempt:
        """Start a new attempt of a FAILED or CANCELLED run; the run is PENDING again.

        Earlier attempts are kept with their events. The new attempt's first event
        is RETRIED (payload ``previous_attempt``, ``reason``).

        Parameters
        ----------
        force : bool
            Skip the ``max_attempts`` check.
        reason : str
            Why, for the timeline.

        Returns
        -------
        OpAttempt
            The new attempt.

        Raises
        ------
        InvalidTransition
            If the run is not FAILED or CANCELLED.
        MaxAttemptsReached
            If attempts are exhausted and *force* is False.
        """
        if self.state not in _RETRYABLE_STATES:
            raise InvalidTransition(
                f"only FAILED or CANCELLED runs can be retried; run {self.id} is {self.state.value}"
            )
        if not force and not self.can_retry():
            raise MaxAttemptsReached(
                f"run {self.id} used {self.attempts_used} of "
                f"{self.retry_policy.max_attempts} attempts"
            )
        now = utc_now()
        attempt = self._open_attempt(now, previous=self.current_attempt, reason=reason)
        self.state = OpRunState.PENDING
        self.cancel_requested = False
        self.next_retry_at = None
        self.updated_at = now
        return attempt

    def auto_retry_delay(self) -> float | None:
        """Seconds to wait before retrying automatically, or None when it must not be.

        A run is retried automatically when it FAILED, no cancel was requested,
        attempts remain and the policy retries its failure class.
        """
        if self.state is not OpRunState.FAILED or self.cancel_requested:
            return None
        if not self.can_retry():
            return None
        if not self.retry_policy.retries(self.execution_summary.failure_class):
            return None
        return self.retry_policy.delay_for(self.attempts_used)

    def schedule_auto_retry(self, now: datetime | None = None) -> datetime | None:
        """Set ``next_retry_at`` from :meth:`auto_retry_delay`; return it.

        Parameters
        ----------
        now : datetime | None
            Reference time (default: now).
        """
        delay = self.auto_retry_delay()
        if delay is None:
            return None
        moment = now if now is not None else utc_now()
        self.next_retry_at = moment + timedelta(seconds=delay)
        self.updated_at = utc_now()
        return self.next_retry_at

    # ------------------------------------------------------------------
    # Serialisation
    # ------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-compatible dictionary.

        The seed's flat view of the run and its current attempt, plus every attempt
        in full under ``"attempts"``.
        """
        return {
            "id": self.id,
            "state": self.state.value,
            "priority": self.priority,
            "progress": self.progress,
            "current_attempt": self.current_attempt,
            "image": self.image,
            "inputs": copy.deepcopy(self.inputs),
            "outputs": copy.deepcopy(self.outputs),
            "events": [e.to_dict() for e in self.events],
            "execution_summary": self.execution_summary.to_dict(),
            "constraints": self.constraints.to_dict(),
            "retry_policy": self.retry_policy.to_dict(),
            "event_delivery": self.event_delivery.to_dict(),
            "op_definition": self.op_definition,
            "opDefinitionVersion": self.op_definition_version,
            "cancelRequested": self.cancel_requested,
            "nextRetryAt": format_optional_timestamp(self.next_retry_at),
            "requestId": self.request_id,
            "output_specs": [spec.to_dict() for spec in self.output_specs],
            "createdAt": format_timestamp(self.created_at),
            "updatedAt": format_timestamp(self.updated_at),
            "attempts": [a.to_dict() for a in self._attempts],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OpRun:
        """Deserialise from a dictionary.

        With ``"attempts"`` every attempt is restored and the round trip is exact;
        without it (the seed's format) only the current attempt is rebuilt from the
        flat fields. Timestamps may end in ``Z``; snake_case keys are accepted too.
        """
        now = utc_now()
        created_at = parse_optional_timestamp(_pick(data, "createdAt", "created_at")) or now
        updated_at = parse_optional_timestamp(_pick(data, "updatedAt", "updated_at")) or now
        version = _pick(data, "opDefinitionVersion", "op_definition_version")
        run = cls(
            id=str(data["id"]),
            state=OpRunState(data["state"]),
            priority=int(data.get("priority") or 0),
            image=str(data["image"]),
            inputs=copy.deepcopy(dict(data.get("inputs") or {})),
            constraints=Constraints.from_dict(data.get("constraints") or {}),
            retry_policy=RetryPolicy.from_dict(data.get("retry_policy") or {}),
            event_delivery=EventDelivery.from_dict(data.get("event_delivery") or {}),
            op_definition=data.get("op_definition"),
            op_definition_version=None if version is None else int(version),
            cancel_requested=bool(_pick(data, "cancelRequested", "cancel_requested")),
            next_retry_at=parse_optional_timestamp(_pick(data, "nextRetryAt", "next_retry_at")),
            request_id=_pick(data, "requestId", "request_id"),
            output_specs=[OutputSpec.from_dict(o) for o in data.get("output_specs") or []],
            created_at=created_at,
            updated_at=updated_at,
        )
        stored = data.get("attempts")
        if stored:
            run._attempts = sorted(
                (OpAttempt.from_dict(a) for a in stored), key=lambda a: a.attempt
            )
            run._current_attempt_index = len(run._attempts) - 1
            return run
        number = int(data.get("current_attempt", 1))
        if number > 0:
            run._attempts.append(
                OpAttempt(
                    id=f"{run.id}_att_{number}",
                    op_run_id=run.id,
                    attempt=number,
                    state=run.state,
                    progress=int(data.get("progress") or 0),
                    events=number_events(
                        [EventEntry.from_dict(e) for e in data.get("events") or []]
                    ),
                    inputs=copy.deepcopy(run.inputs),
                    outputs=copy.deepcopy(dict(data.get("outputs") or {})),
                    execution_summary=ExecutionSummary.from_dict(
                        data.get("execution_summary") or {}
                    ),
                    constraints=copy.deepcopy(run.constraints),
                    created_at=created_at,
                )
            )
            run._current_attempt_index = 0
        return run

    # ------------------------------------------------------------------
    # Internal
    # ------------------------------------------------------------------

    def _current(self) -> OpAttempt:
        if self._current_attempt_index < 0:
            raise InvalidTransition(f"run {self.id} has no current attempt")
        return self._attempts[self._current_attempt_index]

    def _ensure_not_locked(self) -> None:
        if self.is_locked:
            raise OpRunLockedException(
                f"run {self.id} is in terminal state {self.state.value} and cannot change"
            )

    def _check_event(self, kind: EventType, msg: Any, payload: Any) -> None:
        """Raise when the event cannot be applied; changes nothing."""
        if kind is EventType.RETRIED:
            raise InvalidTransition(
                "RETRIED events are recorded by retry() and release_assignment()"
            )
        if kind is EventType.ASSIGNED and self.state is not OpRunState.PENDING:
            raise InvalidTransition(
                f"can only assign PENDING runs; run {self.id} is {self.state.value}"
            )
        if kind is EventType.STARTED and self.state is not OpRunState.ASSIGNED:
            raise InvalidTransition(
                f"a STARTED event requires an ASSIGNED run; run {self.id} is {self.state.value}"
            )
        violations = event_rules.event_violations(kind, msg, payload)
        if violations:
            raise InvalidInput(violations)

    def _apply_event(
        self,
        attempt: OpAttempt,
        event: ReportedEvent,
        msg: str | int,
        payload: dict[str, Any],
        now: datetime,
        applied_at: datetime | None = None,
        placement: _Placement | None = None,
    ) -> EventEntry:
        """Record a checked event and apply its effects.

        What the run applies comes from *event*'s typed fields (and *placement*'s, for
        ASSIGNED and STARTED); ``(msg, payload)`` is the timeline entry, recorded as
        data. *now* is when the event happened; *applied_at* when the server applies
        it (``None``: the same), which is when the run changed.
        """
        kind = event.type
        if kind in (EventType.COMPLETED, EventType.FAILED) and self.cancel_requested:
            # A cancel was requested: whatever the attempt reports, the run ends
            # CANCELLED, so it never reads COMPLETED and is not retried by policy.
            payload = {**payload, "reported_type": kind.value}
            text = f"{kind.value.lower()} after cancel was requested"
            msg = f"{text}: {msg}" if msg != "" else text
            event = replace(event, type=EventType.CANCELLED)
        elif kind is EventType.COMPLETED and self.output_specs:
            event, msg, payload = self._check_outputs(event, msg, payload)
        kind = event.type
        entry = self._record(attempt, kind, msg, payload, now, applied_at)
        summary = attempt.execution_summary
        if kind is EventType.ASSIGNED:
            placed = placement or _Placement()
            ids = list(placed.gpu_ids or [])
            self._move(attempt, OpRunState.ASSIGNED)
            summary.worker_id = placed.worker_id or ""
            summary.gpu_ids = ids
            summary.gpu_id = ids[0] if ids else None
        elif kind is EventType.STARTED:
            self._move(attempt, OpRunState.RUNNING)
            attempt.started_at = now
            if placement is not None:
                if placement.worker_id is not None:
                    summary.worker_id = placement.worker_id
                if placement.gpu_ids is not None:
                    summary.gpu_ids = list(placement.gpu_ids)
                    summary.gpu_id = summary.gpu_ids[0] if summary.gpu_ids else summary.gpu_id
                if placement.gpu_id is not None:
                    summary.gpu_id = placement.gpu_id
        elif kind is EventType.PROGRESS:
            attempt.progress = event.progress
        elif kind is EventType.COMPLETED:
            if event.outputs is not None:
                attempt.outputs = copy.deepcopy(event.outputs)
            self._end(attempt, OpRunState.COMPLETED, event.duration_ms, now)
        elif kind is EventType.FAILED:
            self._record_failure(summary, event)
            if event.failure_class is not None:
                summary.failure_class = event.failure_class
            self._end(attempt, OpRunState.FAILED, event.duration_ms, now)
        elif kind is EventType.CANCELLED:
            if event.outputs is not None:
                attempt.outputs = copy.deepcopy(event.outputs)
            self._record_failure(summary, event)
            summary.failure_class = FailureClass.CANCELLED
            self._end(attempt, OpRunState.CANCELLED, event.duration_ms, now)
        self.updated_at = now if applied_at is None else applied_at
        return entry

    def _check_outputs(
        self, event: ReportedEvent, msg: str | int, payload: dict[str, Any]
    ) -> tuple[ReportedEvent, str | int, dict[str, Any]]:
        """A COMPLETED event as it is, or as FAILED ``OUTPUT_INVALID`` naming every
        violation when its outputs break the declared ones (they stay in the payload)."""
        violations = output_violations(self.output_specs, event.outputs or {})
        if not violations:
            return event, msg, payload
        reasons = "; ".join(f"{v.field} {v.description}" for v in violations)
        text = f"the outputs do not match the declared outputs: {reasons}"
        failed = {
            **payload,
            "reported_type": event.type.value,
            "failure_class": FailureClass.OUTPUT_INVALID.value,
            "error_message": text,
            "exit_code": 0,
            "violations": [{"field": v.field, "description": v.description} for v in violations],
        }
        as_failure = replace(
            event,
            type=EventType.FAILED,
            message=text,
            failure_class=FailureClass.OUTPUT_INVALID,
            error_message=text,
            exit_code=0,
        )
        return as_failure, text, failed

    @staticmethod
    def _record_failure(summary: ExecutionSummary, event: ReportedEvent) -> None:
        if event.error_message:
            summary.error_message = event.error_message
        if event.exit_code is not None:
            summary.exit_code = event.exit_code

    @staticmethod
    def _record(
        attempt: OpAttempt,
        kind: EventType,
        msg: str | int,
        payload: dict[str, Any],
        now: datetime,
        applied_at: datetime | None = None,
    ) -> EventEntry:
        entry = EventEntry(
            t=now,
            type=kind.value,
            msg=msg,
            payload=payload,
            seq=attempt.last_seq + 1,
            applied_at=None if applied_at == now else applied_at,
        )
        attempt.events.append(entry)
        return entry

    def _move(self, attempt: OpAttempt, state: OpRunState) -> None:
        attempt.state = state
        self.state = state

    def _end(
        self,
        attempt: OpAttempt,
        state: OpRunState,
        duration_ms: int,
        now: datetime,
    ) -> None:
        """End the attempt in *state*; *duration_ms* as reported (0: measured)."""
        self._move(attempt, state)
        attempt.finished_at = now
        if duration_ms:
            attempt.execution_summary.duration_ms = duration_ms
        else:
            attempt.execution_summary.duration_ms = elapsed_ms(_start_of(attempt), now)

    def _open_attempt(
        self,
        now: datetime,
        previous: int | None = None,
        reason: str = "",
        released: bool = False,
    ) -> OpAttempt:
        number = self._attempts[-1].attempt + 1 if self._attempts else 1
        attempt = OpAttempt(
            id=f"{self.id}_att_{number}",
            op_run_id=self.id,
            attempt=number,
            state=OpRunState.PENDING,
            inputs=copy.deepcopy(self.inputs),
            constraints=copy.deepcopy(self.constraints),
            created_at=now,
        )
        if previous is not None:
            text = f"retry of attempt {previous}" + (f": {reason}" if reason else "")
            payload: dict[str, Any] = {"previous_attempt": previous, "reason": reason}
            if released:
                payload["released"] = True
            self._record(attempt, EventType.RETRIED, text, payload, now)
        self._attempts.append(attempt)
        self._current_attempt_index = len(self._attempts) - 1
        return attempt


# ----------------------------------------------------------------------
# Reading an event given as (type, msg, payload)
# ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Placement:
    """Where an ASSIGNED or STARTED event puts the attempt (``None``: unchanged)."""

    worker_id: str | None = None
    gpu_ids: list[int] | None = None
    gpu_id: int | None = None


def _typed_event(
    kind: EventType, msg: str | int, payload: Mapping[str, Any]
) -> tuple[ReportedEvent, _Placement | None]:
    """The typed event an :meth:`OpRun.add_event` entry stands for (checked by
    :func:`event_rules.event_violations` first): the one place an event's payload
    keys are read, for the fields a run applies."""
    ending = kind in (EventType.COMPLETED, EventType.FAILED, EventType.CANCELLED)
    outputs = payload.get("outputs") if kind in (EventType.COMPLETED, EventType.CANCELLED) else None
    failure = payload.get("failure_class") if kind is EventType.FAILED else None
    fails = kind in (EventType.FAILED, EventType.CANCELLED)
    exit_code = payload.get("exit_code") if fails else None
    error = payload.get("error_message") if fails else None
    duration = payload.get("duration_ms") if ending else None
    event = ReportedEvent(
        kind,
        "" if kind is EventType.PROGRESS else str(msg),
        progress=int(msg) if kind is EventType.PROGRESS else 0,
        payload=payload,
        outputs=None if outputs is None else dict(outputs),
        failure_class=None if failure is None else FailureClass(failure),
        exit_code=None if exit_code is None else int(exit_code),
        error_message="" if error is None else str(error),
        duration_ms=0 if duration is None else int(duration),
    )
    if kind not in (EventType.ASSIGNED, EventType.STARTED):
        return event, None
    worker = payload.get("worker_id")
    ids = payload.get("gpu_ids")
    gpu = payload.get("gpu_id")
    return event, _Placement(
        worker_id=None if worker is None else str(worker),
        gpu_ids=None if ids is None else [int(g) for g in ids],
        gpu_id=None if gpu is None else int(gpu),
    )


# ----------------------------------------------------------------------
# Reading stored data
# ----------------------------------------------------------------------


def _pick(data: Mapping[str, Any], *keys: str) -> Any:
    """The first of *keys* present in *data* with a value that is not null."""
    for key in keys:
        value = data.get(key)
        if value is not None:
            return value
    return None


def _start_of(attempt: OpAttempt) -> datetime:
    """When the attempt started: its STARTED event, else its creation."""
    if attempt.started_at is not None:
        return attempt.started_at
    for event in attempt.events:
        if event.type == EventType.STARTED.value:
            return event.t
    return attempt.created_at
