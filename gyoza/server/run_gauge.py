"""Keeps ``gyoza_runs{state}`` and ``gyoza_runs_finished_total{state}`` current.

The gauge counts the *active* runs by state (PENDING, ASSIGNED, RUNNING, and FAILED runs
waiting for an automatic retry): it is seeded from the store at start and then follows
every change the hub publishes. Runs that end are counted by the ``finished`` counter, by
final state, since the server started (the store keeps the all-time history).
"""

from __future__ import annotations

import functools
from typing import Any

from gyoza.models.op_run import OpRun
from gyoza.models.resources import OpRunState
from gyoza.server import metrics
from gyoza.server.hub import Hub
from gyoza.server.store.protocol import RunStore

ACTIVE_STATES = (
    OpRunState.PENDING,
    OpRunState.ASSIGNED,
    OpRunState.RUNNING,
    OpRunState.FAILED,
)
"""The states ``gyoza_runs`` reports (FAILED: waiting for an automatic retry)."""


class RunStateGauge:
    """Follows the state of every active run to keep the run metrics exact.

    Parameters
    ----------
    hub : Hub
        Publishes every committed change of a run.
    """

    def __init__(self, hub: Hub) -> None:
        self._states: dict[str, OpRunState] = {}
        self._counts: dict[OpRunState, int] = dict.fromkeys(ACTIVE_STATES, 0)
        self._touched: set[str] | None = set()  # runs changed before the seed; None after
        # The gauge reads the counts when it is scraped: a change only updates a dict.
        for state in ACTIVE_STATES:
            metrics.RUNS_BY_STATE.labels(state=state.value).set_function(
                functools.partial(self._counts.__getitem__, state)
            )
        # Looked up once each: ``labels()`` costs a lock and a dict.
        self._finished: dict[OpRunState, Any] = {}  # a series appears once counted
        hub.add_run_listener(self._on_change)

    async def seed(self, store: RunStore) -> None:
        """Count the active runs in the store that no change has reported yet."""
        touched = self._touched or set()
        for run in await store.load_active_runs():
            if run.id not in touched and run.is_active:
                self._set(run.id, run.state)
        self._touched = None

    def _on_change(self, run: OpRun) -> None:
        """O(1): one dict update, and the two series whose count moved."""
        if self._touched is not None:
            self._touched.add(run.id)
        if run.is_active:
            self._set(run.id, run.state)
        else:
            self._set(run.id, None)
            finished = self._finished.get(run.state)
            if finished is None:
                finished = self._finished[run.state] = metrics.RUNS_FINISHED.labels(
                    state=run.state.value
                )
            finished.inc()

    def _set(self, run_id: str, state: OpRunState | None) -> None:
        states = self._states
        previous = states.get(run_id)
        if previous is state:
            return
        if state is None:
            del states[run_id]
        else:
            states[run_id] = state
        if previous is not None:
            self._counts[previous] -= 1
        if state is not None:
            self._counts[state] = self._counts.get(state, 0) + 1
