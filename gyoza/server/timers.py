"""Background work of the run controller: its tasks and its keyed one-shot timers.

The controller arms a timer per run waiting for an automatic retry and per agent
waiting out its lease and grace; each fires once, as a background task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

log = logging.getLogger("gyoza.control")

K = TypeVar("K", bound=Hashable)


class Background:
    """Tasks started in the background; :meth:`stop` waits for them. A task that fails
    is logged, never lost silently."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stopped = False

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run *coro* as a task."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def stop(self) -> None:
        """Take no more work and wait for the tasks running."""
        self.stopped = True
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


class Timers(Generic[K]):
    """One-shot timers by key: arming a key again replaces its timer; a timer that fires
    runs its work as a background task and is forgotten first."""

    def __init__(self, background: Background) -> None:
        self._background = background
        self._handles: dict[K, asyncio.TimerHandle] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._handles

    def arm_in(self, key: K, delay_s: float, work: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run ``work()`` in *delay_s* seconds (at once when it is not positive)."""
        self.arm_at(key, asyncio.get_running_loop().time() + max(delay_s, 0.0), work)

    def arm_at(self, key: K, when: float, work: Callable[[], Coroutine[Any, Any, Any]]) -> None:
        """Run ``work()`` at loop time *when*."""
        self.cancel(key)

        def fire() -> None:
            self._handles.pop(key, None)
            self._background.spawn(work())

        self._handles[key] = asyncio.get_running_loop().call_at(when, fire)

    def cancel(self, key: K) -> None:
        """Forget *key*'s timer, if armed."""
        handle = self._handles.pop(key, None)
        if handle is not None:
            handle.cancel()

    def clear(self) -> None:
        """Cancel every timer."""
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()
