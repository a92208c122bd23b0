"""Keeps ``gyoza_runs{state}`` and ``gyoza_runs_finished_total{state}`` current.

The gauge counts the *active* runs by state (PENDING, ASSIGNED, RUNNING, and FAILED runs
waiting for an automatic retry): it is seeded from the store at start and then follows
every change the hub publishes. Runs that end are counted by the ``finished`` counter, by
final state, since the server started (the store keeps the all-time history).
"""

from __future__ import annotations

from collections import Counter

from gyoza.models.op_run import OpRun
from gyoza.models.resources import OpRunState
from gyoza.server import metrics
from gyoza.server.hub import Hub
from gyoza.server.store.store import Store

ACTIVE_STATES = (
    OpRunState.PENDING,
    OpRunState.ASSIGNED,
    OpRunState.RUNNING,
    OpRunState.FAILED,
)
"""The states ``gyoza_runs`` reports (FAILED: waiting for an automatic retry)."""


def _is_active(run: OpRun) -> bool:
    return not run.state.is_terminal or (
        run.state is OpRunState.FAILED and run.next_retry_at is not None
    )


class RunStateGauge:
    """Follows the state of every active run to keep the run metrics exact.

    Parameters
    ----------
    hub : Hub
        Publishes every committed change of a run.
    """

    def __init__(self, hub: Hub) -> None:
        self._states: dict[str, OpRunState] = {}
        self._counts: Counter[OpRunState] = Counter()
        self._touched: set[str] | None = set()  # runs changed before the seed; None after
        for state in ACTIVE_STATES:
            metrics.RUNS_BY_STATE.labels(state=state.value).set(0)
        hub.add_run_listener(self._on_change)

    async def seed(self, store: Store) -> None:
        """Count the active runs in the store that no change has reported yet."""
        touched = self._touched or set()
        for run in await store.load_active_runs():
            if run.id not in touched and _is_active(run):
                self._set(run.id, run.state)
        self._touched = None

    def _on_change(self, run: OpRun) -> None:
        if self._touched is not None:
            self._touched.add(run.id)
        if _is_active(run):
            self._set(run.id, run.state)
        else:
            self._set(run.id, None)
            metrics.RUNS_FINISHED.labels(state=run.state.value).inc()

    def _set(self, run_id: str, state: OpRunState | None) -> None:
        previous = self._states.pop(run_id, None)
        if state is not None:
            self._states[run_id] = state
        if previous == state:
            return
        for changed, delta in ((previous, -1), (state, 1)):
            if changed is not None:
                self._counts[changed] += delta
                metrics.RUNS_BY_STATE.labels(state=changed.value).set(self._counts[changed])
