"""Placement passes: every request made in one event-loop iteration becomes one pass.

A run created, an attempt ended, an agent joined or reported capacity: each asks for
placement. Many such changes arrive together (one group commit ends many attempts), and
one :meth:`Scheduler.place <gyoza.server.scheduler.Scheduler.place>` covers them all.

After each pass the new pending reasons (each code once per attempt) are handed on to be
recorded, and a pass is woken at the one instant nothing else would trigger: when the
first waiting run crosses the starvation bound (:attr:`Scheduler.wake_at`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from gyoza.models.resources import PendingReason
from gyoza.server.scheduler import Placement, Scheduler


class PlacementPass:
    """Coalesces placement requests into one scheduler pass per loop iteration.

    Parameters
    ----------
    scheduler : Scheduler
        Decides the placements (its clock is :func:`time.monotonic`).
    assign : Callable[[Placement], None]
        Called with each placement of a pass (it starts the assignment).
    record_reason : Callable[[str, int, PendingReason], None]
        Called with (run id, attempt, reason) for each reason that applies to a pending
        attempt for the first time (it records the reason as an event).
    """

    def __init__(
        self,
        scheduler: Scheduler,
        assign: Callable[[Placement], None],
        record_reason: Callable[[str, int, PendingReason], None],
    ) -> None:
        self._scheduler = scheduler
        self._assign = assign
        self._record_reason = record_reason
        self._scheduled = False
        self._stopped = False
        self._record_from = 0.0
        self._wake: asyncio.TimerHandle | None = None

    def record_reasons_from(self, when: float) -> None:
        """Hold new reasons back until *when* (monotonic seconds); they are recorded by
        the first pass after it (one is woken for it)."""
        self._record_from = when

    def request(self) -> None:
        """Ask for a pass: it runs once, soon, whatever the number of requests."""
        if self._scheduled or self._stopped:
            return
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._run)

    def stop(self) -> None:
        """No more passes."""
        self._stopped = True
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None

    def _run(self) -> None:
        self._scheduled = False
        if self._stopped:
            return
        for placement in self._scheduler.place():
            self._assign(placement)
        now = time.monotonic()
        if now >= self._record_from:
            for run_id, attempt, reason in self._scheduler.take_new_reasons():
                self._record_reason(run_id, attempt, reason)
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        wake_at = self._scheduler.wake_at
        if now < self._record_from and self._scheduler.queue_depth:
            wake_at = min(wake_at or self._record_from, self._record_from)
        if wake_at is not None:
            self._wake = asyncio.get_running_loop().call_later(
                max(wake_at - time.monotonic(), 0.0), self.request
            )
