"""Retention: finished runs older than a configured age are deleted in small batches.

With ``--retention 30d`` the server deletes every run that is COMPLETED, FAILED or
CANCELLED (and not waiting for an automatic retry) whose last change is older than 30
days, with its attempts, events, log lines and topic records. It sweeps once at start
and then every ``interval_s``; each sweep deletes batches of ``batch_size`` runs, one
transaction each, and pauses between batches so that it takes at most ``duty`` of the
writer's time: the group commits of the hot path (agent reports, new runs) go on in
between, and no transaction grows with the backlog. Runs the controller is changing at
that moment are skipped (a later sweep deletes them once they are old and idle).
"""

from __future__ import annotations

import asyncio
import logging
import re
from datetime import timedelta

from gyoza.models.timestamps import utc_now
from gyoza.server.control import RunController
from gyoza.server.logs import log_event
from gyoza.server.store.protocol import RunStore

log = logging.getLogger("gyoza.retention")

BATCH_SIZE = 25
"""Runs deleted per transaction (each with its events, logs and topic records)."""

DUTY = 0.2
"""Most of the writer's time a sweep takes: after each batch it pauses four times as long
as the batch took, so agent reports and new runs keep most of the writer."""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def parse_duration(text: str) -> timedelta:
    """``"30d"``, ``"12h"``, ``"90m"``, ``"45s"``, ``"2w"``, or plain seconds.

    Raises
    ------
    ValueError
        When *text* is not such a duration, or is zero.
    """
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration such as 30d, 12h, 90m or 45s")
    seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if seconds <= 0:
        raise ValueError(f"{text!r}: the duration must be more than zero")
    return timedelta(seconds=seconds)


class Retention:
    """Deletes finished runs older than *keep*, in the background.

    Parameters
    ----------
    store : RunStore
        The store to delete from.
    controller : RunController
        Names the runs that must be left alone for now.
    keep : timedelta
        How long a finished run is kept after its last change.
    interval_s : float
        Time between sweeps.
    batch_size : int
        Runs deleted per transaction.
    duty : float
        Most of the writer's time a sweep may take (0-1].
    """

    def __init__(
        self,
        store: RunStore,
        controller: RunController,
        keep: timedelta,
        *,
        interval_s: float = 60.0,
        batch_size: int = BATCH_SIZE,
        duty: float = DUTY,
    ) -> None:
        if not 0 < duty <= 1:
            raise ValueError("duty must be within (0, 1]")
        self.store = store
        self.controller = controller
        self.keep = keep
        self.interval_s = interval_s
        self.batch_size = batch_size
        self.duty = duty
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sweeping in the background."""
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="retention")

    async def stop(self) -> None:
        """Stop sweeping; a batch under way is committed or rolled back as a whole."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def sweep(self) -> int:
        """Delete every finished run older than the retention; returns how many."""
        before = utc_now() - self.keep
        deleted = 0
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            ids = await self.store.delete_finished_before(
                before, limit=self.batch_size, exclude=self.controller.busy_runs()
            )
            deleted += len(ids)
            if len(ids) < self.batch_size:
                break
            # Leave the writer to the hot path for a while.
            await asyncio.sleep((loop.time() - started) * (1 / self.duty - 1))
        if deleted:
            log_event(
                log,
                logging.INFO,
                "finished runs deleted by retention",
                runs=deleted,
                older_than=before.isoformat(),
            )
        return deleted

    async def _loop(self) -> None:
        while True:
            try:
                await self.sweep()
            except Exception:
                # The next sweep tries again; the server keeps serving.
                log_event(log, logging.ERROR, "retention sweep failed", exc_info=True)
            await asyncio.sleep(self.interval_s)
