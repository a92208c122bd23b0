"""The active runs in memory, and one lock per run.

Active: a run that is not terminal, or that failed and waits for an automatic retry
(:attr:`OpRun.is_active <gyoza.models.op_run.OpRun.is_active>`). The store is the truth:
a run missing here is read from it, and a run whose write failed is forgotten so that
the next access reads it again.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Iterator

from gyoza.models.op_run import OpRun
from gyoza.server.store.protocol import RunStore


class ActiveRuns:
    """The active runs by id, each changed under its own lock.

    Parameters
    ----------
    store : RunStore
        Where runs that are not in memory are read from.
    """

    def __init__(self, store: RunStore) -> None:
        self._store = store
        self._runs: dict[str, OpRun] = {}
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def __len__(self) -> int:
        return len(self._runs)

    def __iter__(self) -> Iterator[OpRun]:
        return iter(list(self._runs.values()))

    def lock(self, run_id: str) -> asyncio.Lock:
        """The run's lock: every change to it is made holding it."""
        lock = self._locks.get(run_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[run_id] = lock
        return lock

    def cached(self, run_id: str) -> OpRun | None:
        """The run if it is in memory."""
        return self._runs.get(run_id)

    async def get(self, run_id: str) -> OpRun:
        """The run: from memory when it is active, else from the store.

        Raises
        ------
        NotFound
            When there is no such run.
        """
        run = self._runs.get(run_id)
        if run is not None:
            return run
        return await self._store.get_run(run_id)

    def keep(self, run: OpRun) -> None:
        """Hold *run* in memory."""
        self._runs[run.id] = run

    def forget(self, run_id: str) -> None:
        """Drop the run from memory (it ended, or its write failed)."""
        self._runs.pop(run_id, None)
