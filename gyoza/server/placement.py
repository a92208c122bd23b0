"""Placement passes: every request made in one event-loop iteration becomes one pass.

A run created, an attempt ended, an agent joined or reported capacity: each asks for
placement. Many such changes arrive together (one group commit ends many attempts), and
one :meth:`Scheduler.place <gyoza.server.scheduler.Scheduler.place>` covers them all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gyoza.server.scheduler import Placement, Scheduler


class PlacementPass:
    """Coalesces placement requests into one scheduler pass per loop iteration.

    Parameters
    ----------
    scheduler : Scheduler
        Decides the placements.
    assign : Callable[[Placement], None]
        Called with each placement of a pass (it starts the assignment).
    """

    def __init__(self, scheduler: Scheduler, assign: Callable[[Placement], None]) -> None:
        self._scheduler = scheduler
        self._assign = assign
        self._scheduled = False
        self._stopped = False

    def request(self) -> None:
        """Ask for a pass: it runs once, soon, whatever the number of requests."""
        if self._scheduled or self._stopped:
            return
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self._run)

    def stop(self) -> None:
        """No more passes."""
        self._stopped = True

    def _run(self) -> None:
        self._scheduled = False
        if self._stopped:
            return
        for placement in self._scheduler.place():
            self._assign(placement)
