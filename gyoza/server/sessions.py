"""Agent sessions: one per connected agent's ``Connect`` stream.

A session owns the outbound queue of its stream (assignments, cancels, acks, nacks,
drain), the agent's lease (last time it was heard from) and its declared capacity. The
registry is the :class:`~gyoza.server.control.AgentLink` through which the run controller
reaches agents; it also answers the fleet views (ListAgents, DrainAgent, UndrainAgent).

Drains are durable: an operator's drain is stored before it is applied and holds across
the agent's reconnects and restarts and the server's restarts, until it is undrained.
"""

from __future__ import annotations

import asyncio
import enum
import hmac
import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc

from gyoza import mapping
from gyoza.api.v1 import agent_pb2, agent_service_pb2
from gyoza.models.errors import NotFound
from gyoza.models.op_run import OpRun
from gyoza.models.timestamps import utc_now
from gyoza.server.errors import ApiError
from gyoza.server.scheduler import GpuSlot, Placement, Scheduler
from gyoza.server.store.protocol import RunStore
from gyoza.server.store.records import AgentDrain

log = logging.getLogger("gyoza.sessions")


class SessionState(enum.Enum):
    """Connection state of an agent as the server sees it."""

    CONNECTED = "CONNECTED"
    DRAINING = "DRAINING"
    LOST = "LOST"
    DISCONNECTED = "DISCONNECTED"


@dataclass
class AgentSession:
    """One agent's live stream.

    Parameters
    ----------
    name : str
        The agent's unique name.
    """

    name: str
    session_id: str = field(default_factory=lambda: f"ses_{uuid.uuid4().hex[:12]}")
    labels: dict[str, str] = field(default_factory=dict)
    version: str = ""
    capacity: agent_pb2.Capacity = field(default_factory=agent_pb2.Capacity)
    connected_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_seen_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    last_seen: float = 0.0  # event-loop time, for the lease
    state: SessionState = SessionState.CONNECTED
    #: What the agent proved at Hello (token and certificate; see auth.authorize_agent_name).
    identity: str = ""
    #: The status the stream ends with when the server ends it (replaced, shutdown).
    end_status: ApiError | None = None
    #: The agent said in its Hello that it drains by itself (shutting down, or drained
    #: locally): an operator's undrain does not make it take work.
    draining_itself: bool = False
    #: Id of the server replica holding the stream (see Agent.replica in the API).
    replica: str = ""
    outbox: asyncio.Queue[agent_service_pb2.ConnectResponse | None] = field(
        default_factory=asyncio.Queue
    )

    def send(self, message: agent_service_pb2.ConnectResponse) -> bool:
        """Queue a message for the stream; False once the session is closed."""
        if self.state in (SessionState.DISCONNECTED, SessionState.LOST):
            return False
        self.outbox.put_nowait(message)
        return True

    def close(self) -> None:
        """End the stream: the writer stops at the sentinel."""
        self.outbox.put_nowait(None)

    def end_with(self, status: ApiError) -> None:
        """End the stream with *status* (once: the first one given wins)."""
        if self.end_status is None:
            self.end_status = status
        self.close()

    def touch(self, loop_time: float) -> None:
        """The agent was heard from: its lease starts again."""
        self.last_seen = loop_time
        self.last_seen_at = datetime.now(UTC)


class SessionRegistry:
    """The live sessions by agent name, and agents known since the server started."""

    def __init__(self, scheduler: Scheduler, store: RunStore | None = None) -> None:
        self.scheduler = scheduler
        self.store = store
        self.sessions: dict[str, AgentSession] = {}
        #: Last session of every agent seen since start (for ListAgents).
        self.known: dict[str, AgentSession] = {}
        #: Agents an operator drained, as stored.
        self.drained: dict[str, AgentDrain] = {}

    async def load_drains(self) -> None:
        """Read the stored drains (at start, before any agent connects)."""
        if self.store is not None:
            self.drained = {d.name: d for d in await self.store.list_drains()}

    # -- AgentLink ------------------------------------------------------
    def is_connected(self, agent: str) -> bool:
        """True when the agent has a live session."""
        return agent in self.sessions

    def send_assignment(self, agent: str, run: OpRun, placement: Placement) -> bool:
        """Queue an assignment on the agent's stream."""
        session = self.sessions.get(agent)
        if session is None:
            return False
        message = agent_service_pb2.ConnectResponse(
            assignment=agent_service_pb2.Assignment(
                run_id=run.id,
                attempt=run.current_attempt,
                image=run.image,
                inputs=mapping.struct_to_proto(run.inputs),
                constraints=mapping.constraints_to_proto(run.constraints),
                gpu_ids=list(placement.gpu_ids),
                gpu_uuids=list(placement.gpu_uuids),
                op_definition=run.op_definition or "",
                op_definition_version=run.op_definition_version or 0,
            )
        )
        return session.send(message)

    def send_cancel(self, agent: str, run_id: str, attempt: int, reason: str) -> bool:
        """Queue a cancel on the agent's stream."""
        session = self.sessions.get(agent)
        if session is None:
            return False
        return session.send(
            agent_service_pb2.ConnectResponse(
                cancel=agent_service_pb2.Cancel(run_id=run_id, attempt=attempt, reason=reason)
            )
        )

    # -- sessions -------------------------------------------------------
    def check_takeover(self, name: str, identity: str) -> None:
        """Refuse a new session for *name* while one with another identity is connected.

        Raises
        ------
        ApiError
            PERMISSION_DENIED (``AGENT_NAME_IN_USE``).
        """
        old = self.sessions.get(name)
        if old is not None and not hmac.compare_digest(old.identity, identity):
            raise ApiError(
                grpc.StatusCode.PERMISSION_DENIED,
                "AGENT_NAME_IN_USE",
                "an agent of that name is connected with other credentials",
            )

    def open(self, session: AgentSession) -> None:
        """Register a new session, replacing (and closing) an older one of that name:
        a reconnecting agent wins over a half-open stream.

        Raises
        ------
        ApiError
            PERMISSION_DENIED when the older one has another identity.
        """
        self.check_takeover(session.name, session.identity)
        old = self.sessions.get(session.name)
        if old is not None:
            log.warning(
                "agent reconnected; closing its previous session",
                extra={"agent": session.name, "old_session": old.session_id},
            )
            old.state = SessionState.DISCONNECTED
            old.end_with(
                ApiError(
                    grpc.StatusCode.ABORTED,
                    "SESSION_REPLACED",
                    "a newer session of this agent replaced this one",
                )
            )
        self.sessions[session.name] = session
        self.known[session.name] = session
        drain = self.drained.get(session.name)
        if drain is not None:
            # Drained before this agent (re)started: it must not take work again.
            session.state = SessionState.DRAINING
            session.send(_drain_message(drain.reason))
        draining = session.state is SessionState.DRAINING
        self.scheduler.upsert_agent(
            session.name,
            cpu=session.capacity.cpu,
            ram_mb=session.capacity.ram_mb,
            gpus=gpu_slots(session.capacity),
            connected=True,
            draining=draining,
            labels=session.labels,
        )

    def refresh_capacity(self, session: AgentSession, capacity: agent_pb2.Capacity) -> None:
        """A heartbeat brought fresh capacity."""
        session.capacity = capacity
        if self.sessions.get(session.name) is session:
            self.scheduler.upsert_agent(
                session.name,
                cpu=capacity.cpu,
                ram_mb=capacity.ram_mb,
                gpus=gpu_slots(capacity),
                connected=True,
            )

    def close(self, session: AgentSession, state: SessionState) -> bool:
        """Unregister a session; False when a newer one already replaced it."""
        if session.state not in (SessionState.DISCONNECTED, SessionState.LOST):
            session.state = state
        session.close()
        if self.sessions.get(session.name) is not session:
            return False
        del self.sessions[session.name]
        self.scheduler.set_connected(session.name, False)
        return True

    async def drain(self, name: str, reason: str = "drain requested") -> AgentSession:
        """Tell an agent to take no new work, durably: it stays drained across its
        restarts and the server's until :meth:`undrain`.

        Raises
        ------
        NotFound
            When no agent of that name has connected since the server started.
        """
        session = self.sessions.get(name) or self.known.get(name)
        drain = self.drained.get(name)
        if session is None and drain is not None:
            return self._absent(name)  # drained already, not back since the restart
        if session is None:
            raise NotFound(f"no agent named {name!r}")
        if drain is None:
            drain = AgentDrain(name, reason, utc_now())
            if self.store is not None:
                await self.store.set_drain(drain)
            self.drained[name] = drain
        self.scheduler.set_draining(name, True)
        if session.state is SessionState.CONNECTED:
            session.state = SessionState.DRAINING
        session.send(_drain_message(drain.reason))
        return session

    async def undrain(self, name: str) -> AgentSession:
        """End an agent's drain: it takes new work again, at once when it is connected.

        Raises
        ------
        NotFound
            When the agent is neither known since the server started nor drained.
        """
        session = self.sessions.get(name) or self.known.get(name)
        if session is None and name not in self.drained:
            raise NotFound(f"no agent named {name!r}")
        if name in self.drained:
            if self.store is not None:
                await self.store.clear_drain(name)
            del self.drained[name]
        if session is None:
            return self._absent(name)
        if not session.draining_itself:
            self.scheduler.set_draining(name, False)
            if session.state is SessionState.DRAINING:
                session.state = SessionState.CONNECTED
        session.send(
            agent_service_pb2.ConnectResponse(
                undrain=agent_service_pb2.Undrain(reason="undrain requested")
            )
        )
        return session

    def listed(self, include_disconnected: bool) -> list[AgentSession]:
        """The agents ListAgents shows, by name: live ones, and with
        *include_disconnected* every agent seen since start and every drained one."""
        if not include_disconnected:
            return [self.sessions[name] for name in sorted(self.sessions)]
        names = sorted(set(self.known) | set(self.drained))
        return [self.known.get(name) or self._absent(name) for name in names]

    def _absent(self, name: str) -> AgentSession:
        """A drained agent that has not connected since the server started."""
        return AgentSession(name=name, state=SessionState.DISCONNECTED)

    def describe(self, session: AgentSession) -> agent_pb2.Agent:
        """The agent as ListAgents shows it: capacity, reservations, runs."""
        slot = self.scheduler.agents.get(session.name)
        agent = agent_pb2.Agent(
            name=session.name,
            state=_STATE_TO_PROTO[session.state],
            session_id=session.session_id,
            labels=session.labels,
            capacity=session.capacity,
            version=session.version,
            replica=session.replica,
        )
        agent.connect_time.FromDatetime(session.connected_at)
        agent.last_seen_time.FromDatetime(session.last_seen_at)
        if slot is not None:
            agent.cpu_reserved = slot.cpu_reserved
            agent.ram_reserved_mb = slot.ram_reserved_mb
            for gpu in sorted(slot.gpus.values(), key=lambda g: g.index):
                agent.gpu_reservations.add(
                    index=gpu.index,
                    vram_reserved_mb=gpu.vram_reserved_mb,
                    vram_free_mb=gpu.vram_available_mb,
                    run_count=gpu.run_count,
                )
            for reservation in slot.reservations.values():
                agent.runs.add(
                    run_id=reservation.run_id,
                    attempt=reservation.attempt,
                    gpu_ids=list(reservation.gpu_ids),
                )
        return agent


_STATE_TO_PROTO = {
    SessionState.CONNECTED: agent_pb2.AGENT_STATE_CONNECTED,
    SessionState.DRAINING: agent_pb2.AGENT_STATE_DRAINING,
    SessionState.LOST: agent_pb2.AGENT_STATE_LOST,
    SessionState.DISCONNECTED: agent_pb2.AGENT_STATE_DISCONNECTED,
}


def _drain_message(reason: str) -> agent_service_pb2.ConnectResponse:
    return agent_service_pb2.ConnectResponse(drain=agent_service_pb2.Drain(reason=reason))


def gpu_slots(capacity: agent_pb2.Capacity) -> list[GpuSlot]:
    """The scheduler's view of an agent's reported GPUs."""
    return [
        GpuSlot(
            index=gpu.index,
            uuid=gpu.uuid,
            name=gpu.name,
            vram_total_mb=gpu.vram_total_mb,
            vram_free_reported_mb=gpu.vram_free_mb,
            healthy=gpu.healthy,
            health_reason=gpu.health_reason,
        )
        for gpu in capacity.gpus
    ]
