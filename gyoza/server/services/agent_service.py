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
from gyoza.models.errors import MalformedReport, NotFound
from gyoza.models.reports import AgentReport
from gyoza.server.control import AckOut, ControlSettings, HeldIn, NackOut, RunController
from gyoza.server.errors import status_for
from gyoza.server.sessions import AgentSession, SessionRegistry, SessionState

log = logging.getLogger("gyoza.agents")

#: How long a new stream may take to send its Hello.
HELLO_TIMEOUT_S = 30.0


class AgentServiceServicer(agent_service_pb2_grpc.AgentServiceServicer):
    """Serves agent streams and the fleet views."""

    def __init__(
        self,
        controller: RunController,
        sessions: SessionRegistry,
        *,
        settings: ControlSettings,
        max_json_bytes: int = 1 << 20,
    ) -> None:
        self.controller = controller
        self.sessions = sessions
        self.settings = settings
        self.max_json_bytes = max_json_bytes

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
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "expected a Hello first")
            return
        if first.WhichOneof("message") != "hello":
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "the first message on an agent stream must be a Hello",
            )
            return
        hello = first.hello
        if not hello.agent_name.strip():
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Hello.agent_name is empty")
            return
        session = AgentSession(
            name=hello.agent_name,
            labels=dict(hello.labels),
            version=hello.version,
            capacity=hello.capacity,
            state=SessionState.DRAINING if hello.draining else SessionState.CONNECTED,
        )
        session.touch(loop.time())
        held = [HeldIn(h.run_id, h.attempt, h.last_seq, h.finished) for h in hello.held]
        reconciliation = await self.controller.agent_connected(session.name, held)
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

        def finished(task: asyncio.Task[None]) -> None:
            # Any background task ending ends the session: the writer below stops.
            if not task.cancelled() and task.exception() is not None:
                log.warning(
                    "agent stream failed",
                    extra={"agent": session.name, "error": repr(task.exception())},
                )
            ended.append(SessionState.LOST if task is lease else SessionState.DISCONNECTED)
            session.close()

        lease = asyncio.create_task(self._lease(session))
        tasks = [
            asyncio.create_task(self._read(iterator, session, inbound)),
            asyncio.create_task(self._process(session, inbound)),
            lease,
        ]
        for task in tasks:
            task.add_done_callback(finished)
        try:
            # This handler is the stream's only writer.
            while (message := await session.outbox.get()) is not None:
                yield message
        finally:
            for task in tasks:
                task.remove_done_callback(finished)
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            state = ended[0] if ended else SessionState.DISCONNECTED
            if self.sessions.close(session, state):
                self.controller.agent_disconnected(session.name, session.last_seen)
                log.info("agent disconnected", extra={"agent": session.name, "state": state.value})

    async def _read(
        self,
        iterator: AsyncIterator[agent_service_pb2.ConnectRequest],
        session: AgentSession,
        inbound: asyncio.Queue[agent_service_pb2.ConnectRequest | None],
    ) -> None:
        loop = asyncio.get_running_loop()
        async for message in iterator:
            session.touch(loop.time())
            if message.WhichOneof("message") == "heartbeat":
                self.sessions.refresh_capacity(session, message.heartbeat.capacity)
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
                if message.WhichOneof("message") == "reports":
                    pending.extend(message.reports.reports)
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
        """The agents with capacity, reservations and runs."""
        agents = [
            self.sessions.describe(session)
            for name, session in sorted(self.sessions.known.items())
            if request.include_disconnected or name in self.sessions.sessions
        ]
        return agent_service_pb2.ListAgentsResponse(agents=agents)

    async def DrainAgent(
        self,
        request: agent_service_pb2.DrainAgentRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> agent_service_pb2.DrainAgentResponse:
        """Tell an agent to take no new work."""
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "name is empty")
        try:
            session = self.sessions.drain(request.name)
        except NotFound as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
            raise
        return agent_service_pb2.DrainAgentResponse(agent=self.sessions.describe(session))


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
