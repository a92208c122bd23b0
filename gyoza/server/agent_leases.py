"""When each agent was last heard from, written to the store so that it outlives the server.

After a restart the run controller counts a missing agent's lease from when it was last
heard (not from the restart), so a server that restarts often cannot keep a dead agent's
runs ASSIGNED forever. Writes are coalesced: at most one store write per interval for
the whole fleet, so the recorded time may be up to one interval older than the truth
(the reconnect window after a restart covers that).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from typing import Any, Protocol

log = logging.getLogger("gyoza.agents")


class LeaseStore(Protocol):
    """The part of the store this needs."""

    async def record_agents_seen(self, seen: dict[str, datetime]) -> None: ...


class AgentLeaseRecorder:
    """Collects "agent X was heard at T" and writes them in one batch per interval.

    Parameters
    ----------
    store : LeaseStore
        Where the times go.
    interval_s : float
        Longest time a heard agent waits to be written.
    """

    def __init__(self, store: LeaseStore, interval_s: float) -> None:
        self._store = store
        self._interval_s = interval_s
        self._pending: dict[str, datetime] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._writing: set[asyncio.Task[Any]] = set()

    def heard(self, name: str, when: datetime) -> None:
        """Agent *name* was heard from at *when* (cheap: called for every message)."""
        previous = self._pending.get(name)
        if previous is None or previous < when:
            self._pending[name] = when
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._interval_s, self.flush)

    async def record_now(self, name: str, when: datetime) -> None:
        """Write at once that *name* was heard at *when* (a Hello: a new presence must
        be durable before a restart could count the agent's absence from an older one)."""
        self._pending.pop(name, None)
        await self._store.record_agents_seen({name: when})

    def flush(self) -> None:
        """Write what was heard since the last write, now (in the background)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        task = asyncio.ensure_future(self._store.record_agents_seen(batch))
        self._writing.add(task)
        task.add_done_callback(self._written)

    def _written(self, task: asyncio.Task[Any]) -> None:
        self._writing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not record when agents were last heard from: %r", task.exception())

    async def close(self) -> None:
        """Write what is pending and wait for the writes in flight."""
        self.flush()
        if self._writing:
            await asyncio.gather(*self._writing, return_exceptions=True)
