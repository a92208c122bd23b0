"""The composition root of the server's core: every part built in one place, in order.

::

    Hub()                                     fan-out of committed changes
    Scheduler(starvation_s)                   the queue, agents' free resources
    SessionRegistry(scheduler)                agent sessions: the controller's AgentLink
    RunController(store, hub, scheduler,      the only code that changes runs
                  sessions, settings=...)

Each part gets what it uses through its constructor; none reaches into another to wire
itself. :class:`~gyoza.server.app.ControlPlane` builds the core with :func:`build_core`
and serves it; tests build it the same way on any :class:`RunStore`.
"""

from __future__ import annotations

from dataclasses import dataclass

from gyoza.server.control import MAX_OUTPUTS_BYTES, ControlSettings, RunController
from gyoza.server.hub import Hub
from gyoza.server.scheduler import Scheduler
from gyoza.server.sessions import SessionRegistry
from gyoza.server.store.protocol import RunStore


@dataclass(frozen=True)
class Core:
    """The server's parts, wired.

    Attributes
    ----------
    store : RunStore
        The durable store.
    hub : Hub
        Fan-out of committed changes.
    scheduler : Scheduler
        The queue and the agents' free resources.
    sessions : SessionRegistry
        Connected agents.
    controller : RunController
        Changes runs.
    """

    store: RunStore
    hub: Hub
    scheduler: Scheduler
    sessions: SessionRegistry
    controller: RunController


def build_core(
    store: RunStore,
    *,
    settings: ControlSettings | None = None,
    hub: Hub | None = None,
    max_outputs_bytes: int = MAX_OUTPUTS_BYTES,
) -> Core:
    """Build the core on *store* (not started: call ``controller.start()``)."""
    hub = hub or Hub()
    settings = settings or ControlSettings()
    scheduler = Scheduler(starvation_s=settings.starvation_s)
    sessions = SessionRegistry(scheduler)
    controller = RunController(
        store,
        hub,
        scheduler,
        sessions,
        settings=settings,
        max_outputs_bytes=max_outputs_bytes,
    )
    return Core(store, hub, scheduler, sessions, controller)
