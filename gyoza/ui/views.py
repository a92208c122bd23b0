"""What the dashboard's templates show: plain values built from the client's objects.

Every figure a page shows (percentages, ages, sizes, labels) is computed here, so the
templates only lay values out and the tests can check them without a browser.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gyoza.client import Agent, AgentState
from gyoza.models.op_attempt import OpAttempt
from gyoza.models.op_definition import InputSpec, InputType, OpDefinition
from gyoza.models.op_run import OpRun
from gyoza.models.resources import EventEntry, OpRunState
from gyoza.models.timestamps import utc_now

__all__ = [
    "AgentView",
    "AttemptView",
    "BarView",
    "FleetSummary",
    "GpuView",
    "InputField",
    "RunRow",
    "RunView",
    "agent_view",
    "attempt_view",
    "fleet_summary",
    "format_age",
    "format_duration",
    "format_mb",
    "input_fields",
    "pending_reason",
    "pretty_json",
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
_AGENT_TONES = {
    AgentState.CONNECTED: "good",
    AgentState.DRAINING: "waiting",
    AgentState.LOST: "bad",
    AgentState.DISCONNECTED: "muted",
    AgentState.UNKNOWN: "muted",
}


# ----------------------------------------------------------------------------------------
# What the API does not tell yet
# ----------------------------------------------------------------------------------------


def pending_reason(run: OpRun) -> str | None:
    """Why a pending run waits, as the server explains it; ``None`` when it does not.

    The API gives no reason yet, so this is ``None`` except for what the run itself
    shows (a retry waiting for its backoff). When the API gains a pending reason, it is
    read here and nowhere else.
    """
    if run.state is not OpRunState.PENDING:
        return None
    if run.next_retry_at is not None:
        return f"retry backoff until {run.next_retry_at:%H:%M:%S} UTC"
    return None


# ----------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------


def format_duration(ms: float | None) -> str:
    """``850 ms``, ``12.3 s``, ``4 m 05 s``, ``2 h 10 m``; ``—`` for ``None``."""
    if ms is None:
        return "—"
    if ms < 1000:
        return f"{int(ms)} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} m {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} m"
    return f"{hours // 24} d {hours % 24} h"


def format_age(moment: datetime | None, now: datetime | None = None) -> str:
    """How long ago: ``just now``, ``42 s ago``, ``5 m ago``, ``3 h ago``, ``2 d ago``."""
    if moment is None:
        return "—"
    seconds = ((now or utc_now()) - moment).total_seconds()
    if seconds < 5:
        return "just now"
    if seconds < 60:
        return f"{int(seconds)} s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)} m ago"
    if seconds < 172800:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86400)} d ago"


def format_mb(mb: float) -> str:
    """A size given in MiB, as people read it: ``512 MB``, ``24 GB``, ``1.5 TB``."""
    if mb >= 1024 * 1024:
        return f"{mb / (1024 * 1024):.1f} TB"
    if mb >= 1024:
        gb = mb / 1024
        return f"{gb:.0f} GB" if gb >= 10 or gb.is_integer() else f"{gb:.1f} GB"
    return f"{int(mb)} MB"


def pretty_json(value: Any) -> str:
    """Indented JSON, keys in their order."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _percent(part: float, whole: float) -> int:
    if whole <= 0:
        return 0
    return max(0, min(100, round(100 * part / whole)))


# ----------------------------------------------------------------------------------------
# Fleet
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BarView:
    """A reserved-of-total bar: ``label`` reads e.g. ``12 GB of 80 GB``."""

    used: float
    total: float
    label: str

    @property
    def percent(self) -> int:
        """Used share, 0-100."""
        return _percent(self.used, self.total)

    @property
    def tone(self) -> str:
        """``calm`` below 70 %, ``busy`` to 90 %, ``full`` above."""
        if self.percent >= 90:
            return "full"
        return "busy" if self.percent >= 70 else "calm"


@dataclass(frozen=True)
class GpuView:
    """One GPU on the fleet page."""

    index: int
    name: str
    uuid: str
    vram: BarView
    free_mb: int
    healthy: bool
    health_reason: str
    run_ids: tuple[str, ...]

    @property
    def free_label(self) -> str:
        """Free VRAM for new runs."""
        return f"{format_mb(self.free_mb)} free"


@dataclass(frozen=True)
class AgentView:
    """One agent on the fleet page."""

    name: str
    state: str
    tone: str
    labels: dict[str, str]
    cpu: BarView
    ram: BarView
    gpus: tuple[GpuView, ...]
    run_ids: tuple[str, ...]
    version: str
    last_seen: str
    connected_for: str

    @property
    def other_run_ids(self) -> tuple[str, ...]:
        """Runs it holds on no GPU."""
        on_gpus = {run_id for gpu in self.gpus for run_id in gpu.run_ids}
        return tuple(r for r in self.run_ids if r not in on_gpus)

    @property
    def can_drain(self) -> bool:
        """Whether draining it means something: it is connected and not draining."""
        return self.state == AgentState.CONNECTED.value

    @property
    def can_undrain(self) -> bool:
        """Whether it is draining (undrain is offered where the API has it)."""
        return self.state == AgentState.DRAINING.value


def agent_view(agent: Agent, now: datetime | None = None) -> AgentView:
    """The fleet page's view of an agent: bars for CPU, RAM and each GPU's VRAM."""
    now = now or utc_now()
    gpus = []
    for gpu in agent.gpus:
        runs = tuple(r.run_id for r in agent.runs if gpu.index in r.gpu_ids)
        gpus.append(
            GpuView(
                index=gpu.index,
                name=gpu.name or "GPU",
                uuid=gpu.uuid,
                vram=BarView(
                    gpu.vram_reserved_mb,
                    gpu.vram_total_mb,
                    f"{format_mb(gpu.vram_reserved_mb)} of {format_mb(gpu.vram_total_mb)}",
                ),
                free_mb=gpu.vram_free_mb,
                healthy=gpu.healthy,
                health_reason=gpu.health_reason,
                run_ids=runs,
            )
        )
    return AgentView(
        name=agent.name,
        state=agent.state.value,
        tone=_AGENT_TONES.get(agent.state, "muted"),
        labels=dict(sorted(agent.labels.items())),
        cpu=BarView(agent.cpu_reserved, agent.cpu, f"{agent.cpu_reserved:g} of {agent.cpu:g}"),
        ram=BarView(
            agent.ram_reserved_mb,
            agent.ram_mb,
            f"{format_mb(agent.ram_reserved_mb)} of {format_mb(agent.ram_mb)}",
        ),
        gpus=tuple(gpus),
        run_ids=tuple(r.run_id for r in agent.runs),
        version=agent.version,
        last_seen=format_age(agent.last_seen_time, now),
        connected_for=(
            format_duration((now - agent.connect_time).total_seconds() * 1000)
            if agent.connect_time is not None
            else "—"
        ),
    )


@dataclass(frozen=True)
class FleetSummary:
    """The figures at the top of the fleet page."""

    agents: int
    agents_live: int
    gpus: int
    gpus_unhealthy: int
    gpus_busy: int
    vram: BarView
    running: int


def fleet_summary(agents: Sequence[AgentView]) -> FleetSummary:
    """Totals over the agents shown."""
    live = [a for a in agents if a.state in (AgentState.CONNECTED, AgentState.DRAINING)]
    gpus = [g for a in live for g in a.gpus]
    reserved = sum(g.vram.used for g in gpus)
    total = sum(g.vram.total for g in gpus)
    return FleetSummary(
        agents=len(agents),
        agents_live=len(live),
        gpus=len(gpus),
        gpus_unhealthy=sum(1 for g in gpus if not g.healthy),
        gpus_busy=sum(1 for g in gpus if g.run_ids),
        vram=BarView(reserved, total, f"{format_mb(reserved)} of {format_mb(total)}"),
        running=sum(len(a.run_ids) for a in live),
    )


# ----------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# Definitions and the run form
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputField:
    """One field of the create-run form, for one input spec."""

    name: str
    type: str
    required: bool
    description: str
    widget: str  # text, number, bool, json
    placeholder: str
    value: str = ""
    error: str = ""


def _placeholder(spec: InputSpec) -> str:
    if spec.default is not None:
        return f"default: {json.dumps(spec.default)}"
    return "required" if spec.required else "optional"


def input_fields(
    definition: OpDefinition,
    values: Mapping[str, str] | None = None,
    errors: Mapping[str, str] | None = None,
) -> list[InputField]:
    """The form's fields for a definition's inputs, with submitted values and errors."""
    values = values or {}
    errors = errors or {}
    widgets = {
        InputType.INT: "number",
        InputType.FLOAT: "number",
        InputType.BOOL: "bool",
        InputType.OBJECT: "json",
        InputType.ARRAY: "json",
    }
    return [
        InputField(
            name=spec.name,
            type=spec.type.value,
            required=spec.required,
            description=spec.description,
            widget=widgets.get(spec.type, "text"),
            placeholder=_placeholder(spec),
            value=values.get(spec.name, ""),
            error=errors.get(spec.name, ""),
        )
        for spec in definition.inputs
    ]


def parse_form_inputs(definition: OpDefinition, form: Mapping[str, str]) -> dict[str, Any]:
    """The run inputs a submitted form asks for.

    Empty fields are left out (the server fills defaults). A value that does not parse
    as its type is sent as the text it is, so that the server (which checks inputs)
    names the problem.
    """
    inputs: dict[str, Any] = {}
    for spec in definition.inputs:
        raw = form.get(spec.name, "").strip()
        if raw == "":
            continue
        inputs[spec.name] = _parse_value(spec.type, raw)
    return inputs


def _parse_value(kind: InputType, raw: str) -> Any:
    try:
        if kind is InputType.INT:
            return int(raw)
        if kind is InputType.FLOAT:
            return float(raw)
        if kind is InputType.BOOL:
            lowered = raw.lower()
            if lowered in ("true", "false"):
                return lowered == "true"
            return raw
        if kind in (InputType.OBJECT, InputType.ARRAY):
            return json.loads(raw)
    except ValueError:
        return raw
    return raw
