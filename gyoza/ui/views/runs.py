"""The runs list's and the run page's values: rows, attempts, timelines, summaries."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from gyoza.models.op_attempt import OpAttempt
from gyoza.models.op_run import OpRun
from gyoza.models.resources import EventEntry, OpRunState
from gyoza.models.timestamps import utc_now
from gyoza.ui.views.formatting import format_age, format_duration, format_mb, pretty_json

__all__ = [
    "TIMELINE_LIMIT",
    "AttemptView",
    "EventView",
    "RunRow",
    "RunView",
    "SummaryItem",
    "attempt_view",
    "pending_reason",
    "run_row",
    "run_view",
]

#: Events of one attempt shown on the run page; older ones are summarised by a count.
TIMELINE_LIMIT = 200

_STATE_TONES = {
    OpRunState.PENDING: "waiting",
    OpRunState.ASSIGNED: "active",
    OpRunState.RUNNING: "active",
    OpRunState.COMPLETED: "good",
    OpRunState.FAILED: "bad",
    OpRunState.CANCELLED: "muted",
}


def pending_reason(run: OpRun) -> str | None:
    """Why a pending run waits, as the server explains it; ``None`` when it does not.

    The server's own reason (``OpRun.pending_reason``: no agent matches, not enough
    VRAM, every agent busy, room being made) comes first; a run waiting for its retry
    backoff says so.
    """
    if run.state is not OpRunState.PENDING:
        return None
    if run.pending_reason is not None:
        return run.pending_reason.message
    if run.next_retry_at is not None:
        return f"retry backoff until {run.next_retry_at:%H:%M:%S} UTC"
    return None


@dataclass(frozen=True)
class RunRow:
    """One line of the runs list."""

    id: str
    state: str
    tone: str
    what: str
    definition: str | None
    image: str
    priority: int
    progress: int
    agent: str
    age: str
    created: str
    duration: str
    attempt: int
    cancel_requested: bool
    pending_reason: str | None

    @property
    def short_id(self) -> str:
        """The id without its prefix, cut to what tells runs apart."""
        return self.id.removeprefix("run_")[:12]

    @property
    def active(self) -> bool:
        """Not terminal."""
        return not OpRunState(self.state).is_terminal


def _run_duration_ms(run: OpRun, attempt: OpAttempt | None, now: datetime) -> float | None:
    summary = run.execution_summary
    if run.state.is_terminal:
        return summary.duration_ms
    if attempt is not None and attempt.started_at is not None:
        return (now - attempt.started_at).total_seconds() * 1000
    return None


def run_row(run: OpRun, now: datetime | None = None) -> RunRow:
    """The runs list's line for a run."""
    now = now or utc_now()
    attempt = run.attempts[-1] if run.attempts else None
    definition = (
        f"{run.op_definition} v{run.op_definition_version}"
        if run.op_definition and run.op_definition_version
        else run.op_definition
    )
    return RunRow(
        id=run.id,
        state=run.state.value,
        tone=_STATE_TONES[run.state],
        what=definition or run.image,
        definition=run.op_definition,
        image=run.image,
        priority=run.priority,
        progress=100 if run.state is OpRunState.COMPLETED else run.progress,
        agent=run.execution_summary.worker_id or "",
        age=format_age(run.created_at, now),
        created=f"{run.created_at:%Y-%m-%d %H:%M:%S} UTC",
        duration=format_duration(_run_duration_ms(run, attempt, now)),
        attempt=run.current_attempt,
        cancel_requested=run.cancel_requested,
        pending_reason=pending_reason(run),
    )


@dataclass(frozen=True)
class EventView:
    """One line of an attempt's timeline."""

    seq: int
    time: str
    type: str
    tone: str
    text: str


_EVENT_TONES = {
    "COMPLETED": "good",
    "FAILED": "bad",
    "ERROR": "bad",
    "CANCELLED": "muted",
    "PROGRESS": "active",
    "STARTED": "active",
    "ASSIGNED": "waiting",
    "RETRIED": "waiting",
}


def _event_text(event: EventEntry) -> str:
    if event.type == "PROGRESS":
        text = f"{event.msg} %"
        message = event.payload.get("message") if event.payload else None
        return f"{text} · {message}" if message else text
    text = str(event.msg)
    details = {k: v for k, v in event.payload.items() if k not in ("released",)}
    if details and event.type in ("ASSIGNED", "FAILED", "ERROR", "CANCELLED", "RETRIED"):
        extra = ", ".join(f"{k}={v}" for k, v in details.items() if not isinstance(v, dict))
        if extra:
            text = f"{text} ({extra})" if text else extra
    return text


@dataclass(frozen=True)
class SummaryItem:
    """One term of an execution summary."""

    label: str
    value: str


@dataclass(frozen=True)
class AttemptView:
    """One attempt of a run: its state, summary and timeline."""

    number: int
    state: str
    tone: str
    progress: int
    summary: tuple[SummaryItem, ...]
    events: tuple[EventView, ...]
    hidden_events: int


def _summary_items(attempt: OpAttempt, now: datetime) -> tuple[SummaryItem, ...]:
    summary = attempt.execution_summary
    duration = summary.duration_ms
    if duration is None and attempt.started_at is not None and not attempt.is_finished:
        duration = int((now - attempt.started_at).total_seconds() * 1000)
    gpus = summary.gpu_ids or ([summary.gpu_id] if summary.gpu_id is not None else [])
    items = [
        SummaryItem("Agent", summary.worker_id or "—"),
        SummaryItem("GPU", ", ".join(str(g) for g in gpus) or "—"),
        SummaryItem("Duration", format_duration(duration)),
        SummaryItem("Exit code", "—" if summary.exit_code is None else str(summary.exit_code)),
        SummaryItem("Failure class", summary.failure_class.value if summary.failure_class else "—"),
    ]
    if summary.error_message:
        items.append(SummaryItem("Error", summary.error_message))
    return tuple(items)


def attempt_view(attempt: OpAttempt, now: datetime | None = None) -> AttemptView:
    """An attempt's timeline (the newest :data:`TIMELINE_LIMIT` events) and summary."""
    now = now or utc_now()
    shown = attempt.events[-TIMELINE_LIMIT:]
    return AttemptView(
        number=attempt.attempt,
        state=attempt.state.value,
        tone=_STATE_TONES[attempt.state],
        progress=attempt.progress,
        summary=_summary_items(attempt, now),
        events=tuple(
            EventView(
                seq=e.seq,
                time=f"{e.t:%H:%M:%S}.{e.t.microsecond // 1000:03d}",
                type=e.type,
                tone=_EVENT_TONES.get(e.type, "muted"),
                text=_event_text(e),
            )
            for e in shown
        ),
        hidden_events=len(attempt.events) - len(shown),
    )


@dataclass(frozen=True)
class RunView:
    """Everything the run page shows."""

    row: RunRow
    constraints: tuple[SummaryItem, ...]
    inputs_json: str
    outputs_json: str
    current: AttemptView
    attempts: tuple[AttemptView, ...]
    topic: str
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def can_cancel(self) -> bool:
        """Active and not yet asked to stop."""
        return self.row.active and not self.row.cancel_requested

    @property
    def can_retry(self) -> bool:
        """FAILED or CANCELLED."""
        return self.row.state in (OpRunState.FAILED.value, OpRunState.CANCELLED.value)


def _constraint_items(run: OpRun) -> tuple[SummaryItem, ...]:
    c = run.constraints
    items = [
        SummaryItem("CPU", f"{c.cpu:g}" if c.cpu else "—"),
        SummaryItem("RAM", format_mb(c.ram_mb) if c.ram_mb else "—"),
        SummaryItem("VRAM", format_mb(c.vram_mb) if c.vram_mb else "—"),
        SummaryItem("GPUs", str(c.gpus_needed) if c.gpus_needed else "—"),
    ]
    if c.gpu_id is not None:
        items.append(SummaryItem("Pinned GPU", str(c.gpu_id)))
    if c.timeout_s is not None:
        items.append(SummaryItem("Timeout", format_duration(c.timeout_s * 1000)))
    items.append(
        SummaryItem("Attempts", f"{run.current_attempt} of {run.retry_policy.max_attempts}")
    )
    return tuple(items)


def run_view(run: OpRun, attempts: Iterable[OpAttempt], now: datetime | None = None) -> RunView:
    """The run page's view: *attempts* are every attempt (``ListOpRunAttempts``)."""
    now = now or utc_now()
    every = sorted(attempts, key=lambda a: a.attempt) or list(run.attempts)
    # The run itself is the freshest word on its current attempt.
    every = [a for a in every if a.attempt != run.current_attempt]
    every.append(run.current_op_attempt)
    every.sort(key=lambda a: a.attempt)
    views = tuple(attempt_view(a, now) for a in every)
    return RunView(
        row=run_row(run, now),
        constraints=_constraint_items(run),
        inputs_json=pretty_json(run.inputs),
        outputs_json=pretty_json(run.outputs),
        current=views[-1],
        attempts=tuple(reversed(views)),
        topic=run.event_delivery.topic,
        attributes=dict(run.event_delivery.attributes),
    )
