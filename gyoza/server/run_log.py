"""Each run's lifecycle as structured log lines, and the run timing histograms.

Follows every committed change the hub publishes and writes one line (logger
``gyoza.runs``) when a run changes state:

=====================  ==============================================================
``run created``        run_id, definition, image, priority
``run assigned``       run_id, attempt, agent, gpu_ids, queue_wait_s
``run started``        run_id, attempt, agent
``run attempt failed`` run_id, attempt, agent, failure_class, error, duration_s,
                       retry_at (a FAILED attempt the retry policy tries again)
``run requeued``       run_id, attempt, reason (a retry, or an assignment released)
``run finished``       run_id, attempt, agent, state, failure_class, error,
                       duration_s (of the attempt, from its start), total_s (from
                       creation)
=====================  ==============================================================

and observes ``gyoza_run_queue_wait_seconds{definition}`` (an attempt created →
assigned) and ``gyoza_run_duration_seconds{definition,state}`` (an attempt started →
ended). ``definition`` is the run's definition name, empty for an ad-hoc run. Only state
changes cost anything here: progress and log lines pass with one dictionary lookup.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from gyoza.models.op_run import OpRun
from gyoza.models.resources import OpRunState
from gyoza.models.timestamps import utc_now
from gyoza.server import metrics
from gyoza.server.hub import Hub
from gyoza.server.logs import log_event

log = logging.getLogger("gyoza.runs")

_ERROR_CHARS = 300
"""Longer error messages are cut in the log (the run keeps the whole one)."""


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round(max((end - start).total_seconds(), 0.0), 3)


class RunLifecycleLog:
    """Logs run state changes and observes the run timing histograms.

    Parameters
    ----------
    hub : Hub
        Publishes every committed change of a run.
    """

    def __init__(self, hub: Hub) -> None:
        # (state, attempt) of every run seen changing and not finished yet.
        self._last: dict[str, tuple[OpRunState, int]] = {}
        hub.add_run_listener(self._on_change)

    def _on_change(self, run: OpRun) -> None:
        now = (run.state, run.current_attempt)
        before = self._last.get(run.id)
        if before == now:
            return
        if run.state.is_terminal and run.next_retry_at is None:
            self._last.pop(run.id, None)
        else:
            self._last[run.id] = now
        state = run.state
        if state is OpRunState.PENDING:
            if before is None and run.current_attempt == 1:
                self._created(run)
            else:
                self._requeued(run)
        elif state is OpRunState.ASSIGNED:
            self._assigned(run)
        elif state is OpRunState.RUNNING:
            self._event("run started", run, agent=run.execution_summary.worker_id)
        else:
            self._ended(run)

    def _event(self, event: str, run: OpRun, /, **fields: Any) -> None:
        log_event(log, logging.INFO, event, run_id=run.id, attempt=run.current_attempt, **fields)

    def _created(self, run: OpRun) -> None:
        log_event(
            log,
            logging.INFO,
            "run created",
            run_id=run.id,
            definition=run.op_definition or "",
            image=run.image,
            priority=run.priority,
        )

    def _requeued(self, run: OpRun) -> None:
        reason = ""
        events = run.current_op_attempt.events
        previous = run.attempts[-2].events if len(run.attempts) > 1 else []
        for entry in reversed([*previous, *events]):
            if entry.type in ("RETRIED", "ERROR"):
                reason = str(entry.msg)
                break
        self._event("run requeued", run, reason=reason)

    def _assigned(self, run: OpRun) -> None:
        attempt = run.current_op_attempt
        wait = _seconds(attempt.created_at, utc_now())
        if wait is not None:
            metrics.RUN_QUEUE_WAIT_SECONDS.labels(definition=run.op_definition or "").observe(wait)
        summary = run.execution_summary
        self._event(
            "run assigned",
            run,
            agent=summary.worker_id,
            gpu_ids=list(summary.gpu_ids),
            queue_wait_s=wait,
        )

    def _ended(self, run: OpRun) -> None:
        attempt = run.current_op_attempt
        summary = run.execution_summary
        duration = _seconds(attempt.started_at, attempt.finished_at or utc_now())
        if attempt.started_at is not None and duration is not None:
            metrics.RUN_DURATION_SECONDS.labels(
                definition=run.op_definition or "", state=run.state.value
            ).observe(duration)
        failure = summary.failure_class.value if summary.failure_class is not None else None
        error = (summary.error_message or "")[:_ERROR_CHARS] or None
        if run.next_retry_at is not None:
            self._event(
                "run attempt failed",
                run,
                agent=summary.worker_id,
                failure_class=failure,
                error=error,
                duration_s=duration,
                retry_at=run.next_retry_at.isoformat(),
            )
            return
        self._event(
            "run finished",
            run,
            agent=summary.worker_id,
            state=run.state.value,
            failure_class=failure,
            error=error,
            duration_s=duration,
            total_s=_seconds(run.created_at, attempt.finished_at or utc_now()),
        )
