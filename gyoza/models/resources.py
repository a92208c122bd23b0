"""Value objects of the run domain: states, event types, constraints, policies."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from gyoza.models.errors import FieldViolation
from gyoza.models.selectors import LabelSelector, SelectorError
from gyoza.models.timestamps import format_timestamp, parse_timestamp


class OpRunState(StrEnum):
    """Lifecycle state of a run and of each of its attempts.

    ``PENDING → ASSIGNED → RUNNING → COMPLETED | FAILED | CANCELLED``; the last
    three are terminal and lock the run.
    """

    PENDING = "PENDING"
    ASSIGNED = "ASSIGNED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_terminal(self) -> bool:
        """True for COMPLETED, FAILED and CANCELLED."""
        return self in TERMINAL_STATES

    @property
    def on_agent(self) -> bool:
        """True for ASSIGNED and RUNNING: an agent holds the run's current attempt."""
        return self in ON_AGENT_STATES


TERMINAL_STATES = frozenset({OpRunState.COMPLETED, OpRunState.FAILED, OpRunState.CANCELLED})
"""The states that end a run and lock it."""

ON_AGENT_STATES = frozenset({OpRunState.ASSIGNED, OpRunState.RUNNING})
"""The states in which an agent holds the run's current attempt."""

LIVE_STATES = (OpRunState.PENDING, OpRunState.ASSIGNED, OpRunState.RUNNING)
"""The states that are not terminal. An *active* run is in one of them, or waiting for an
automatic retry (:func:`is_active_run`)."""

RETRY_WAIT_STATES = frozenset({OpRunState.FAILED})
"""The terminal states a run waits for an automatic retry in (its ``next_retry_at`` set)."""


def is_active_run(state: OpRunState, next_retry_at: object | None) -> bool:
    """The one definition of an *active* run, one that can still change by itself: in
    one of :data:`LIVE_STATES`, or in one of :data:`RETRY_WAIT_STATES` with an automatic
    retry scheduled (*next_retry_at* not ``None``). The server keeps the active runs in
    memory; the stores select them by the same two sets."""
    return state in LIVE_STATES or (state in RETRY_WAIT_STATES and next_retry_at is not None)


class EventType(StrEnum):
    """Kind of an entry in an attempt's event timeline."""

    ASSIGNED = "ASSIGNED"
    STARTED = "STARTED"
    INFO = "INFO"
    PROGRESS = "PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    ERROR = "ERROR"
    RETRIED = "RETRIED"


class FailureClass(StrEnum):
    """Why an attempt did not complete; the retry policy decides on it."""

    EXIT_CODE = "EXIT_CODE"
    OOM = "OOM"
    TIMEOUT = "TIMEOUT"
    IMAGE_MISSING = "IMAGE_MISSING"
    AGENT_LOST = "AGENT_LOST"
    CANCELLED = "CANCELLED"
    OUTPUT_INVALID = "OUTPUT_INVALID"
    EXECUTOR_ERROR = "EXECUTOR_ERROR"
    QUEUE_TIMEOUT = "QUEUE_TIMEOUT"


def _get(data: Mapping[str, Any], key: str, default: Any) -> Any:
    """``data[key]``, or *default* when the key is missing or null."""
    value = data.get(key)
    return default if value is None else value


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _check_non_negative(violations: list[FieldViolation], name: str, value: float) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        violations.append(FieldViolation(name, "must be a finite number"))
    elif value < 0:
        violations.append(FieldViolation(name, f"must be >= 0 (got {value})"))


@dataclass
class Constraints:
    """Resources a run needs; it holds them from assignment to its end.

    Parameters
    ----------
    cpu : float
        CPU cores (fractions allowed).
    ram_mb : int
        Memory in MiB.
    vram_mb : int
        GPU memory in MiB needed on *each* assigned GPU. VRAM is a budget consumed
        per GPU, not a filter.
    gpu_count : int
        Number of GPUs. ``0`` with ``vram_mb > 0`` or a ``gpu_id`` means one. A run
        that needs GPUs and states no ``vram_mb`` holds each GPU it gets whole: no
        other run is placed on that GPU while it holds it.
    gpu_id : int | None
        Pin the run to this GPU index (implies exactly one GPU).
    timeout_s : float | None
        Run-time limit in seconds; ``None`` means no limit.
    selector : str
        Label selector (:mod:`gyoza.models.selectors`) the agent's labels must match;
        ``""`` matches every agent.
    queue_timeout_s : float | None
        How long an attempt may wait in the queue before it fails as
        ``QUEUE_TIMEOUT``; ``None`` means it waits as long as it takes.
    """

    cpu: float = 0.0
    ram_mb: int = 0
    vram_mb: int = 0
    gpu_count: int = 0
    gpu_id: int | None = None
    timeout_s: float | None = None
    selector: str = ""
    queue_timeout_s: float | None = None

    @property
    def holds_whole_gpu(self) -> bool:
        """True when the run holds each of its GPUs whole (it needs GPUs and states
        no VRAM figure to share them by)."""
        return self.vram_mb == 0 and self.gpus_needed > 0

    def label_selector(self) -> LabelSelector:
        """The parsed selector.

        Raises
        ------
        SelectorError
            When the selector cannot be parsed (``validate`` reports it first).
        """
        return LabelSelector.parse(self.selector)

    @property
    def gpus_needed(self) -> int:
        """How many GPUs the run occupies."""
        if self.gpu_count > 0:
            return self.gpu_count
        if self.vram_mb > 0 or self.gpu_id is not None:
            return 1
        return 0

    def validate(self) -> list[FieldViolation]:
        """Return every problem with these constraints (empty when valid)."""
        violations: list[FieldViolation] = []
        _check_non_negative(violations, "cpu", self.cpu)
        _check_non_negative(violations, "ram_mb", self.ram_mb)
        _check_non_negative(violations, "vram_mb", self.vram_mb)
        _check_non_negative(violations, "gpu_count", self.gpu_count)
        if self.gpu_id is not None:
            _check_non_negative(violations, "gpu_id", self.gpu_id)
            if self.gpu_count > 1:
                violations.append(
                    FieldViolation("gpu_count", "must be 0 or 1 when gpu_id pins one GPU")
                )
        if self.timeout_s is not None:
            if not math.isfinite(self.timeout_s):
                violations.append(FieldViolation("timeout_s", "must be a finite number"))
            elif self.timeout_s <= 0:
                violations.append(
                    FieldViolation("timeout_s", f"must be > 0 when set (got {self.timeout_s})")
                )
        if self.queue_timeout_s is not None:
            if not math.isfinite(self.queue_timeout_s):
                violations.append(FieldViolation("queue_timeout_s", "must be a finite number"))
            elif self.queue_timeout_s <= 0:
                violations.append(
                    FieldViolation(
                        "queue_timeout_s",
                        f"must be > 0 when set (got {self.queue_timeout_s})",
                    )
                )
        try:
            self.label_selector()
        except SelectorError as error:
            violations.append(FieldViolation("selector", str(error)))
        return violations

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-compatible dictionary."""
        return {
            "cpu": self.cpu,
            "ram_mb": self.ram_mb,
            "vram_mb": self.vram_mb,
            "gpu_count": self.gpu_count,
            "gpu_id": self.gpu_id,
            "timeout_s": self.timeout_s,
            "selector": self.selector,
            "queue_timeout_s": self.queue_timeout_s,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Constraints:
        """Deserialise; missing keys take their defaults."""
        return cls(
            cpu=float(_get(data, "cpu", 0.0)),
            ram_mb=int(_get(data, "ram_mb", 0)),
            vram_mb=int(_get(data, "vram_mb", 0)),
            gpu_count=int(_get(data, "gpu_count", 0)),
            gpu_id=_optional_int(data.get("gpu_id")),
            timeout_s=_optional_float(data.get("timeout_s")),
            selector=str(_get(data, "selector", "")),
            queue_timeout_s=_optional_float(data.get("queue_timeout_s")),
        )


class PendingReasonCode(StrEnum):
    """Why a pending run has not been placed, as a machine-readable code.

    ``AGENTS_BUSY`` and ``MAKING_ROOM`` mean the run will start once room frees up;
    every other code means no connected agent could take it even if idle
    (the run is *unschedulable* until the fleet changes).
    """

    NO_AGENT = "NO_AGENT"
    SELECTOR_UNMATCHED = "SELECTOR_UNMATCHED"
    INSUFFICIENT_CPU = "INSUFFICIENT_CPU"
    INSUFFICIENT_RAM = "INSUFFICIENT_RAM"
    INSUFFICIENT_GPU = "INSUFFICIENT_GPU"
    INSUFFICIENT_VRAM = "INSUFFICIENT_VRAM"
    GPU_NOT_FOUND = "GPU_NOT_FOUND"
    NO_SINGLE_AGENT_FITS = "NO_SINGLE_AGENT_FITS"
    AGENTS_BUSY = "AGENTS_BUSY"
    MAKING_ROOM = "MAKING_ROOM"

    @property
    def unschedulable(self) -> bool:
        """True when no connected agent could take the run even if it were idle."""
        return self not in (PendingReasonCode.AGENTS_BUSY, PendingReasonCode.MAKING_ROOM)


@dataclass(frozen=True)
class PendingReason:
    """Why a pending run waits: a code and the same in words."""

    code: PendingReasonCode
    message: str


_DEFAULT_RETRY_ON: tuple[FailureClass, ...] = (
    FailureClass.EXIT_CODE,
    FailureClass.OOM,
    FailureClass.TIMEOUT,
    FailureClass.AGENT_LOST,
    FailureClass.EXECUTOR_ERROR,
)


@dataclass
class RetryPolicy:
    """When and how soon a failed run is tried again.

    Parameters
    ----------
    max_attempts : int
        Attempts allowed in all, the first included. Attempts ended by a released
        assignment (a lost agent, a refusal) do not count.
    initial_delay_s : float
        Delay before the second attempt.
    backoff_multiplier : float
        Factor applied to the delay after each further attempt.
    max_delay_s : float
        Upper bound of any delay.
    retry_on : tuple[FailureClass, ...]
        Failure classes that are retried automatically. ``CANCELLED`` never is.
    """

    max_attempts: int = 3
    initial_delay_s: float = 1.0
    backoff_multiplier: float = 2.0
    max_delay_s: float = 60.0
    retry_on: tuple[FailureClass, ...] = _DEFAULT_RETRY_ON

    def delay_for(self, attempt: int) -> float:
        """Seconds to wait before the attempt that follows attempt number *attempt*.

        ``initial_delay_s * backoff_multiplier ** (attempt - 1)``, capped at
        ``max_delay_s``; attempts below 1 count as 1.
        """
        if self.initial_delay_s <= 0:
            return 0.0
        exponent = max(attempt, 1) - 1
        try:
            delay = self.initial_delay_s * self.backoff_multiplier**exponent
        except OverflowError:
            return self.max_delay_s
        return min(delay, self.max_delay_s)

    def retries(self, failure_class: FailureClass | None) -> bool:
        """Whether a failure of this class is retried automatically.

        An unclassified failure (``None``) is treated as ``EXIT_CODE``: the op
        failed. A cancellation is never retried automatically.
        """
        if failure_class is FailureClass.CANCELLED:
            return False
        return (failure_class or FailureClass.EXIT_CODE) in self.retry_on

    def validate(self) -> list[FieldViolation]:
        """Return every problem with this policy (empty when valid)."""
        violations: list[FieldViolation] = []
        if self.max_attempts < 1:
            violations.append(
                FieldViolation("max_attempts", f"must be >= 1 (got {self.max_attempts})")
            )
        _check_non_negative(violations, "initial_delay_s", self.initial_delay_s)
        _check_non_negative(violations, "max_delay_s", self.max_delay_s)
        if not math.isfinite(self.backoff_multiplier):
            violations.append(FieldViolation("backoff_multiplier", "must be a finite number"))
        elif self.backoff_multiplier < 1:
            violations.append(
                FieldViolation(
                    "backoff_multiplier", f"must be >= 1 (got {self.backoff_multiplier})"
                )
            )
        if FailureClass.CANCELLED in self.retry_on:
            violations.append(
                FieldViolation("retry_on", "CANCELLED cannot be retried automatically")
            )
        return violations

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-compatible dictionary (``retry_on`` as names)."""
        return {
            "max_attempts": self.max_attempts,
            "initial_delay_s": self.initial_delay_s,
            "backoff_multiplier": self.backoff_multiplier,
            "max_delay_s": self.max_delay_s,
            "retry_on": [fc.value for fc in self.retry_on],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RetryPolicy:
        """Deserialise; missing keys take their defaults."""
        retry_on = data.get("retry_on")
        return cls(
            max_attempts=int(_get(data, "max_attempts", 3)),
            initial_delay_s=float(_get(data, "initial_delay_s", 1.0)),
            backoff_multiplier=float(_get(data, "backoff_multiplier", 2.0)),
            max_delay_s=float(_get(data, "max_delay_s", 60.0)),
            retry_on=(
                _DEFAULT_RETRY_ON
                if retry_on is None
                else tuple(FailureClass(name) for name in retry_on)
            ),
        )


@dataclass
class EventDelivery:
    """Where a run's events are published besides its own watchers.

    Parameters
    ----------
    topic : str
        Topic whose subscribers receive the run's events (``""``: none).
    attributes : dict[str, str]
        Attributes attached to every event published on the topic.
    """

    topic: str = ""
    attributes: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-compatible dictionary."""
        return {"topic": self.topic, "attributes": dict(self.attributes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EventDelivery:
        """Deserialise; missing keys take their defaults."""
        attributes = _get(data, "attributes", {})
        return cls(
            topic=str(_get(data, "topic", "")),
            attributes={str(k): str(v) for k, v in attributes.items()},
        )


@dataclass
class EventEntry:
    """One entry of an attempt's event timeline.

    Parameters
    ----------
    t : datetime
        When the event happened (aware, UTC): for an agent's report, the time the agent
        gives it; for the server's own events, when the server made them.
    type : str
        An :class:`EventType` value.
    msg : str | int
        Human-readable message, or the percentage of a PROGRESS event.
    payload : dict[str, Any]
        Event-specific data.
    seq : int
        1-based position in its attempt's timeline, set by the aggregate.
    applied_at : datetime | None
        When the server applied it, when that differs from ``t`` (a report that
        travelled, say after an outage); ``None``: at ``t``.
    """

    t: datetime
    type: str
    msg: str | int
    payload: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    applied_at: datetime | None = None

    @property
    def applied(self) -> datetime:
        """When the server applied the event."""
        return self.t if self.applied_at is None else self.applied_at

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-compatible dictionary (times as ISO 8601)."""
        data: dict[str, Any] = {
            "seq": self.seq,
            "t": format_timestamp(self.t),
            "type": self.type,
            "msg": self.msg,
            "payload": copy.deepcopy(self.payload),
        }
        if self.applied_at is not None:
            data["applied_at"] = format_timestamp(self.applied_at)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EventEntry:
        """Deserialise; times may end in ``Z``."""
        applied = data.get("applied_at")
        return cls(
            t=parse_timestamp(data["t"]),
            type=str(data["type"]),
            msg=_get(data, "msg", ""),
            payload=copy.deepcopy(dict(_get(data, "payload", {}))),
            seq=int(_get(data, "seq", 0)),
            applied_at=None if applied is None else parse_timestamp(applied),
        )


@dataclass
class ExecutionSummary:
    """What is known about how an attempt ran.

    Parameters
    ----------
    duration_ms : int | None
        Run time from start (or creation, when never started) to end.
    worker_id : str | None
        Agent that ran the attempt.
    error_message : str | None
        Why the attempt failed or was released.
    gpu_id : int | None
        First GPU used (kept for the seed's single-GPU view).
    gpu_ids : list[int]
        Every GPU assigned.
    failure_class : FailureClass | None
        Class of the failure; ``None`` while not failed or when unknown.
    exit_code : int | None
        Container exit code, when it exited.
    """

    duration_ms: int | None = None
    worker_id: str | None = None
    error_message: str | None = None
    gpu_id: int | None = None
    gpu_ids: list[int] = field(default_factory=list)
    failure_class: FailureClass | None = None
    exit_code: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-compatible dictionary."""
        return {
            "duration_ms": self.duration_ms,
            "worker_id": self.worker_id,
            "error_message": self.error_message,
            "gpu_id": self.gpu_id,
            "gpu_ids": list(self.gpu_ids),
            "failure_class": None if self.failure_class is None else self.failure_class.value,
            "exit_code": self.exit_code,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ExecutionSummary:
        """Deserialise; missing keys take their defaults."""
        failure_class = data.get("failure_class")
        return cls(
            duration_ms=_optional_int(data.get("duration_ms")),
            worker_id=data.get("worker_id"),
            error_message=data.get("error_message"),
            gpu_id=_optional_int(data.get("gpu_id")),
            gpu_ids=[int(g) for g in _get(data, "gpu_ids", [])],
            failure_class=None if failure_class is None else FailureClass(failure_class),
            exit_code=_optional_int(data.get("exit_code")),
        )
