"""The agent protocol's rules, as functions over the domain that return acks and nacks.

Reconciliation (what an agent holds when it connects against what the server wants it
to hold) and report fencing and consumption (DESIGN.md rules 1, 3 and 4) are decided
here, on one run at a time, without I/O: the controller takes the run's lock, calls
these, commits what changed and sends the answers. Refusals carry the domain error, so
their status code comes from the server's one error catalog.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from gyoza.models.errors import GyozaError, NotFound, OpRunLockedException, ReportGap, StaleAttempt
from gyoza.models.op_run import OpRun
from gyoza.models.reports import AgentReport


@dataclass(frozen=True)
class AckOut:
    """Every report of the attempt up to ``seq`` is durably recorded."""

    run_id: str
    attempt: int
    seq: int


@dataclass(frozen=True)
class NackOut:
    """A refused message: ``error`` is the domain's refusal (the error catalog gives its
    status code and reason); ``message`` overrides the error's text when set."""

    run_id: str
    attempt: int
    seq: int
    error: GyozaError
    drop_attempt: bool = False
    message: str = ""

    @property
    def text(self) -> str:
        """What the agent is told."""
        return self.message or str(self.error)


@dataclass(frozen=True)
class HeldIn:
    """An attempt an agent says it holds when it (re)connects."""

    run_id: str
    attempt: int
    last_seq: int
    finished: bool = False


@dataclass
class Reconciliation:
    """What the server answers to an agent's list of held attempts."""

    resume: list[AckOut] = field(default_factory=list)
    drop: list[NackOut] = field(default_factory=list)
    cancel: list[tuple[str, int, str]] = field(default_factory=list)


def reconcile_held(run: OpRun | None, item: HeldIn, agent: str) -> AckOut | NackOut:
    """Keep an attempt the agent holds (resume from the run's watermark) or drop it.

    Dropped: a run the server does not know, an attempt that is not the current one or
    not assigned to *agent*, and an attempt the server ended while the agent still had
    reports for it (they can no longer be applied).
    """
    if run is None:
        return _drop(item, StaleAttempt(item.run_id, item.attempt, 0))
    try:
        run.fence(item.attempt, agent)
    except GyozaError:
        return _drop(item, StaleAttempt(run.id, item.attempt, run.current_attempt))
    watermark = run.current_op_attempt.reported_seq
    if run.is_locked and item.last_seq > watermark:
        return NackOut(
            run.id,
            item.attempt,
            0,
            OpRunLockedException(f"run is already {run.state.value}"),
            drop_attempt=True,
        )
    return AckOut(run.id, item.attempt, watermark)


def _drop(item: HeldIn, error: GyozaError) -> NackOut:
    return NackOut(
        item.run_id,
        item.attempt,
        0,
        error,
        drop_attempt=True,
        message="the server no longer wants this attempt run",
    )


def fence_reports(
    run: OpRun | None, run_id: str, attempt: int, agent: str, seq: int
) -> NackOut | None:
    """Refuse a group of reports that is not for *agent*'s current attempt of the run
    (the agent is told to drop the attempt), or ``None`` when they may be consumed."""
    if run is None:
        return NackOut(run_id, attempt, seq, NotFound(f"no run {run_id}"), drop_attempt=True)
    try:
        run.fence(attempt, agent)
    except GyozaError as error:
        return NackOut(run_id, attempt, seq, error, drop_attempt=True)
    return None


@dataclass
class Consumed:
    """What consuming one attempt's reports did.

    Attributes
    ----------
    ack : AckOut
        The attempt's watermark after them (acknowledged once committed).
    nacks : list[NackOut]
        Reports refused (each consumed).
    lines : list[tuple[str, str, datetime]]
        Log lines to append, ``(text, stream, time)``.
    changed : bool
        True when the watermark moved: there is something to commit.
    """

    ack: AckOut
    nacks: list[NackOut] = field(default_factory=list)
    lines: list[tuple[str, str, datetime]] = field(default_factory=list)
    changed: bool = False


def consume_reports(
    run: OpRun, attempt: int, reports: Sequence[AgentReport], *, max_outputs_bytes: int
) -> Consumed:
    """Consume a fenced group of one attempt's reports, in seq order, exactly once.

    A report consumed before is skipped (acknowledged again); a gap stops the group
    (the agent resends from the acknowledged seq); a refused report is consumed and
    answered with a nack, and the group goes on.
    """
    nacks: list[NackOut] = []
    lines: list[tuple[str, str, datetime]] = []
    changed = False
    for report in reports:
        try:
            if not run.consume_report(report, max_outputs_bytes=max_outputs_bytes):
                continue
        except ReportGap:
            break
        except GyozaError as error:
            changed = True
            nacks.append(NackOut(run.id, attempt, report.seq, error))
            continue
        changed = True
        lines.extend((line.text, line.stream, report.time) for line in report.lines)
    ack = AckOut(run.id, attempt, run.current_op_attempt.reported_seq)
    return Consumed(ack, nacks, lines, changed)
