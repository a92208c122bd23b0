"""``gyoza.api.v1.AgentService``: the agents' stream and the fleet views.

The servicer is transport glue: it reads the agent's messages, hands them to the run
controller in order, and writes what the controller answers. Rules (DESIGN.md): Hello
first; every run-scoped message fenced by ``(run_id, attempt)``; reports applied exactly
once and acknowledged only once committed; a silent agent is lost after its lease.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2

from gyoza import mapping
from gyoza.api.v1 import agent_service_pb2, agent_service_pb2_grpc
from gyoza.models.errors import InvalidInput, MalformedReport
from gyoza.models.reports import AgentReport
from gyoza.server.agent_leases import AgentLeaseRecorder
from gyoza.server.auth import authorize_agent_name
from gyoza.server.control import AckOut, ControlSettings, HeldIn, NackOut, RunController
from gyoza.server.errors import ApiError, status_for
from gyoza.server.forward import REPLICA_METADATA_KEY
from gyoza.server.services import hello_checks, request_checks
from gyoza.server.sessions import AgentSession, SessionRegistry, SessionState
from gyoza.server.store import paging

log = logging.getLogger("gyoza.agents")

DEFAULT_AGENTS_PAGE = 500
MAX_AGENTS_PAGE = 1000

#: How long a new stream may take to send its Hello.
HELLO_TIMEOUT_S = 30.0


class AgentServiceServicer(agent_service_pb2_grpc.AgentServiceServicer):
    """Serves agent streams and the fleet views.

    Parameters
    ----------
    replica_id : str
        This server replica's id: the replica a session records when its stream came
        straight here, with no ``x-gyoza-replica`` metadata.
    """

    def __init__(
        self,
        controller: RunController,
        sessions: SessionRegistry,
        *,
        settings: ControlSettings,
        max_json_bytes: int = 1 << 20,
        leases: AgentLeaseRecorder | None = None,
        replica_id: str = "",
    ) -> None:
        self.replica_id = replica_id
        self.controller = controller
        self.sessions = sessions
        self.settings = settings
        self.max_json_bytes = max_json_bytes
        self.leases = leases

    async def Connect(
        self,
        request_iterator: AsyncIterator[agent_service_pb2.ConnectRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[agent_service_pb2.ConnectResponse]:
        """One agent session, from Hello to the end of the stream."""
        loop = asyncio.get_running_loop()
        iterator = aiter(request_iterator)
        try:
            first = await asyncio.wait_for(anext(iterator), HELLO_TIMEOUT_S)
        except (StopAsyncIteration, TimeoutError):
            raise ApiError(
                grpc.StatusCode.FAILED_PRECONDITION, "HELLO_REQUIRED", "expected a Hello first"
            ) from None
        if first.WhichOneof("message") != "hello":
            raise ApiError(
                grpc.StatusCode.FAILED_PRECONDITION,
                "HELLO_REQUIRED",
                "the first message on an agent stream must be a Hello",
            )
        hello = first.hello
        hello_checks.check_hello(hello)
        replica = self._replica(context)
        identity = authorize_agent_name(hello.agent_name, context)
        # Before reconciling: a Hello that may not replace the connected session must not
        # release or drop anything of it either.
        self.sessions.check_takeover(hello.agent_name, identity)
        session = AgentSession(
            name=hello.agent_name,
            labels=dict(hello.labels),
            version=hello.version,
            capacity=hello.capacity,
            state=SessionState.DRAINING if hello.draining else SessionState.CONNECTED,
            identity=identity,
            draining_itself=hello.draining,
            replica=replica,
        )
        session.touch(loop.time())
        if self.leases is not None:
            await self.leases.record_now(session.name, session.last_seen_at)
        held = [HeldIn(h.run_id, h.attempt, h.last_seq, h.finished) for h in hello.held]
        try:
            reconciliation = await self.controller.agent_connected(session.name, held)
        except BaseException:
            # Reconciling stopped the agent's lost-timer; with no session to show for it,
            # the clock must start again or its runs would wait for it forever.
            if not self.sessions.is_connected(session.name):
                self.controller.agent_disconnected(session.name, session.last_seen)
            raise
        settings = self.settings
        welcome = agent_service_pb2.Welcome(
            session_id=session.session_id,
            heartbeat_interval=_duration(settings.heartbeat_interval_s),
            lease_timeout=_duration(settings.lease_timeout_s),
            resume=[_ack(a) for a in reconciliation.resume],
        )
        session.send(agent_service_pb2.ConnectResponse(welcome=welcome))
        for nack in reconciliation.drop:
            session.send(agent_service_pb2.ConnectResponse(nack=_nack(nack)))
        self.sessions.open(session)
        # The previous session's cancels may have been queued before this one existed.
        for run_id, attempt, reason in reconciliation.cancel:
            session.send(
                agent_service_pb2.ConnectResponse(
                    cancel=agent_service_pb2.Cancel(run_id=run_id, attempt=attempt, reason=reason)
                )
            )
        log.info(
            "agent connected",
            extra={"agent": session.name, "session": session.session_id, "held": len(held)},
        )
        self.controller.agent_ready()

        inbound: asyncio.Queue[agent_service_pb2.ConnectRequest | None] = asyncio.Queue()
        ended: list[SessionState] = []
        failures: list[BaseException] = []
        tasks: list[asyncio.Task[None]] = []

        def end(state: SessionState) -> None:
            """End the session once, however the stream ends: its lease clock starts."""
            for task in tasks:
                task.remove_done_callback(finished)
                task.cancel()
            if self.sessions.close(session, ended[0] if ended else state):
                self._heard(session)
                self.controller.agent_disconnected(session.name, session.last_seen)
                log.info(
                    "agent disconnected",
                    extra={"agent": session.name, "state": session.state.value},
                )

        def finished(task: asyncio.Task[None]) -> None:
            # Any background task ending ends the session: the writer below stops.
            if not task.cancelled() and task.exception() is not None:
                failures.append(task.exception())  # type: ignore[arg-type]
                log.warning(
                    "agent stream failed",
                    extra={"agent": session.name, "error": repr(task.exception())},
                )
            ended.append(SessionState.LOST if task is lease else SessionState.DISCONNECTED)
            session.close()

        lease = asyncio.create_task(self._lease(session))
        tasks += [
            asyncio.create_task(self._read(iterator, session, inbound)),
            asyncio.create_task(self._process(session, inbound)),
            lease,
        ]
        for task in tasks:
            task.add_done_callback(finished)

        # A stream cancelled while this generator waits at a yield is never resumed, so
        # its finally block may never run: the end of the RPC itself ends the session.
        def rpc_done(_: grpc.aio.ServicerContext[Any, Any]) -> None:
            end(SessionState.DISCONNECTED)

        context.add_done_callback(rpc_done)  # type: ignore[arg-type]  # the stub wants its own protocol class
        try:
            # This handler is the stream's only writer.
            while (message := await session.outbox.get()) is not None:
                yield message
            # The stream ends with the status of what ended it, never a bare OK: a
            # message that does not parse, a lease run out, a newer session.
            if failures:
                raise failures[0]
            if session.end_status is not None:
                raise session.end_status
            if ended and ended[0] is SessionState.LOST:
                raise ApiError(
                    grpc.StatusCode.UNAVAILABLE,
                    "LEASE_EXPIRED",
                    "the agent was silent past its lease; reconnect",
                )
        finally:
            end(SessionState.DISCONNECTED)
            await asyncio.gather(*tasks, return_exceptions=True)

    def _replica(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """The replica holding this stream: the forwarding one named in the metadata,
        else this one."""
        named = [
            value
            for key, value in context.invocation_metadata() or ()
            if key == REPLICA_METADATA_KEY
        ]
        if not named:
            return self.replica_id
        replica = named[-1]
        violations = hello_checks.replica_violations(replica, REPLICA_METADATA_KEY)
        if violations:
            raise InvalidInput(violations)
        return str(replica)

    async def _read(
        self,
        iterator: AsyncIterator[agent_service_pb2.ConnectRequest],
        session: AgentSession,
        inbound: asyncio.Queue[agent_service_pb2.ConnectRequest | None],
    ) -> None:
        loop = asyncio.get_running_loop()
        async for message in iterator:
            session.touch(loop.time())
            self._heard(session)
            if message.WhichOneof("message") == "heartbeat":
                capacity = message.heartbeat.capacity
                try:
                    hello_checks.check_capacity(capacity, "heartbeat.capacity")
                except InvalidInput as refused:
                    # The lease is renewed; the capacity is not used.
                    session.send(
                        agent_service_pb2.ConnectResponse(
                            nack=agent_service_pb2.Nack(
                                code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                                reason="INVALID_CAPACITY",
                                message=str(refused)[:1000],
                            )
                        )
                    )
                    continue
                self.sessions.refresh_capacity(session, capacity)
                self.controller.agent_ready()
                continue
            inbound.put_nowait(message)

    async def _process(
        self,
        session: AgentSession,
        inbound: asyncio.Queue[agent_service_pb2.ConnectRequest | None],
    ) -> None:
        while True:
            message = await inbound.get()
            if message is None:
                return
            # Everything that queued up while the last write was committing is handled
            # now: consecutive report batches go to the controller as one, so one commit
            # covers them, and the agent gets one acknowledgement for them.
            pending: list[agent_service_pb2.Report] = []
            while message is not None:
                kind = message.WhichOneof("message")
                if kind == "reports":
                    pending.extend(message.reports.reports)
                elif kind == "assignment_reply" and message.assignment_reply.accepted:
                    # An acceptance changes nothing the reports depend on (the run is
                    # ASSIGNED to this agent already): it does not split the group, so
                    # the reports on either side of it still share one commit.
                    await self._other(session, message)
                else:
                    if pending:
                        await self._reports(session, pending)
                        pending = []
                    await self._other(session, message)
                if inbound.empty():
                    break
                message = inbound.get_nowait()
                if message is None:
                    inbound.put_nowait(None)  # seen again at the top: the session ends
                    break
            if pending:
                await self._reports(session, pending)

    async def _other(
        self, session: AgentSession, message: agent_service_pb2.ConnectRequest
    ) -> None:
        kind = message.WhichOneof("message")
        if kind == "assignment_reply":
            reply = message.assignment_reply
            await self.controller.reply(
                session.name, reply.run_id, reply.attempt, reply.accepted, reply.reason
            )
        elif kind == "hello":
            session.send(
                agent_service_pb2.ConnectResponse(
                    nack=agent_service_pb2.Nack(
                        code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
                        reason="HELLO_REPEATED",
                        message="Hello is only valid as the first message of a stream",
                    )
                )
            )
        else:
            session.send(
                agent_service_pb2.ConnectResponse(
                    nack=agent_service_pb2.Nack(
                        code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                        reason="EMPTY_MESSAGE",
                        message="the message carries no known field",
                    )
                )
            )

    async def _reports(
        self, session: AgentSession, batch: Sequence[agent_service_pb2.Report]
    ) -> None:
        reports: list[AgentReport] = []
        nacks: list[NackOut] = []
        for report in batch:
            try:
                reports.append(mapping.report_from_proto(report, self.max_json_bytes))
            except MalformedReport as error:
                nacks.append(NackOut(report.run_id, report.attempt, report.seq, error))
        acks, refused = await self.controller.apply_reports(session.name, reports)
        if acks:
            session.send(
                agent_service_pb2.ConnectResponse(
                    acks=agent_service_pb2.AckBatch(acks=[_ack(a) for a in acks])
                )
            )
        for nack in [*nacks, *refused]:
            session.send(agent_service_pb2.ConnectResponse(nack=_nack(nack)))

    def _heard(self, session: AgentSession) -> None:
        if self.leases is not None:
            self.leases.heard(session.name, session.last_seen_at)

    async def _lease(self, session: AgentSession) -> None:
        """Return when the agent has been silent past its lease."""
        loop = asyncio.get_running_loop()
        lease = self.settings.lease_timeout_s
        while True:
            remaining = session.last_seen + lease - loop.time()
            if remaining <= 0:
                log.warning("agent silent past its lease", extra={"agent": session.name})
                return
            await asyncio.sleep(remaining)

    async def ListAgents(
        self,
        request: agent_service_pb2.ListAgentsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> agent_service_pb2.ListAgentsResponse:
        """The agents with capacity, reservations and runs, by name, one page."""
        size = request_checks.page_size(
            request.page_size, default=DEFAULT_AGENTS_PAGE, maximum=MAX_AGENTS_PAGE
        )
        listing = "all" if request.include_disconnected else "live"
        after = paging.name_position(paging.decode_token(request.page_token, "agents", listing))
        listed = [
            session
            for session in self.sessions.listed(request.include_disconnected)
            if after is None or session.name > after
        ]
        response = agent_service_pb2.ListAgentsResponse()
        total = 0
        for index, session in enumerate(listed[:size]):
            agent = self.sessions.describe(session)
            total += agent.ByteSize() + 8
            if index and total > request_checks.MAX_PAGE_BYTES:
                break
            response.agents.append(agent)
        if len(listed) > len(response.agents):
            last = response.agents[-1].name
            response.next_page_token = paging.encode_token("agents", listing, [last])
        return response

    async def DrainAgent(
        self,
        request: agent_service_pb2.DrainAgentRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> agent_service_pb2.DrainAgentResponse:
        """Tell an agent to take no new work."""
        session = await self.sessions.drain(_agent_name(request.name))
        return agent_service_pb2.DrainAgentResponse(agent=self.sessions.describe(session))

    async def UndrainAgent(
        self,
        request: agent_service_pb2.UndrainAgentRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> agent_service_pb2.UndrainAgentResponse:
        """End an agent's drain; placement considers it again at once."""
        session = await self.sessions.undrain(_agent_name(request.name))
        self.controller.agent_ready()
        return agent_service_pb2.UndrainAgentResponse(agent=self.sessions.describe(session))


def _agent_name(name: str) -> str:
    """*name* as an agent name a call may ask for; INVALID_ARGUMENT when it cannot be one."""
    violations = hello_checks.agent_name_violations(name, "name")
    if violations:
        raise InvalidInput(violations)
    return name


def _ack(ack: AckOut) -> agent_service_pb2.Ack:
    return agent_service_pb2.Ack(run_id=ack.run_id, attempt=ack.attempt, seq=ack.seq)


def _nack(nack: NackOut) -> agent_service_pb2.Nack:
    """The refusal on the wire, its code and reason from the error catalog."""
    status = status_for(nack.error)
    return agent_service_pb2.Nack(
        run_id=nack.run_id,
        attempt=nack.attempt,
        seq=nack.seq,
        code=status.code.value[0],
        reason=status.reason,
        message=nack.text,
        drop_attempt=nack.drop_attempt,
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value
