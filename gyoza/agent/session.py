"""One agent stream session: Hello, Welcome, then reports up and orders down.

The session is the transport half of the agent: it speaks ``AgentService.Connect`` (see
``protos/gyoza/api/v1/agent_service.proto`` and DESIGN.md, "The agent stream") and leaves
every decision (take an assignment? cancel?) to a :class:`SessionHandler`, the daemon.

* The Hello lists every attempt the outbox holds with its last seq; the Welcome's
  ``resume`` acks drop what the server already has; the rest is resent in store order.
* One writer task owns the stream's write side. Control messages (assignment replies,
  heartbeats) go first; then every report committed since the last write goes in one
  ReportBatch. A report is sent the moment it is committed when the stream is idle, and
  reports committed while a write is in flight are coalesced into the next batch. Under
  load (a batch went out within :data:`LOAD_WINDOW_S`), the writer also waits up to
  ``coalesce_s`` (1 ms by default) for more reports before it writes, so that a busy
  agent sends fewer, larger messages. The writer sleeps on an event: nothing polls.
* Cumulative acks drop reports from the outbox as they arrive.
* Heartbeats at the Welcome's interval carry fresh capacity.

The session ends by raising: :class:`SessionEnded` when the server closes the stream,
:class:`grpc.aio.AioRpcError` when the RPC fails. The daemon reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import Protocol

import grpc

from gyoza.agent.outbox import Outbox
from gyoza.api.v1 import agent_pb2
from gyoza.api.v1 import agent_service_pb2 as pb
from gyoza.api.v1 import agent_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: Most reports in one ReportBatch.
MAX_BATCH_REPORTS = 512
#: Rough ceiling of a ReportBatch in bytes (gRPC's default message limit is 4 MiB).
MAX_BATCH_BYTES = 1 << 20

LOAD_WINDOW_S = 0.005
"""A stream that wrote a report batch this recently is under load: the writer may wait
its ``coalesce_s`` for more reports before the next batch."""


class SessionEnded(Exception):
    """The stream ended without an error status, or the server broke the protocol."""


class SessionHandler(Protocol):
    """What the session asks of the daemon."""

    async def hello(self) -> pb.Hello:
        """The Hello for a new stream (capacity, held attempts, draining)."""
        ...

    async def capacity(self) -> agent_pb2.Capacity:
        """Fresh capacity for a heartbeat."""
        ...

    def on_welcome(self, session: Session, welcome: pb.Welcome) -> None:
        """The server accepted the session (resume acks already applied)."""
        ...

    async def on_assignment(self, session: Session, assignment: pb.Assignment) -> None:
        """Accept or refuse an assignment (with :meth:`Session.reply`)."""
        ...

    def on_cancel(self, cancel: pb.Cancel) -> None:
        """Stop an attempt."""
        ...

    def on_nack(self, nack: pb.Nack) -> None:
        """A message was refused."""
        ...

    def on_drain(self, drain: pb.Drain) -> None:
        """Take no new work."""
        ...

    def on_undrain(self, undrain: pb.Undrain) -> None:
        """Take new work again."""
        ...


class Session:
    """One ``Connect`` stream; :meth:`run` it once.

    Parameters
    ----------
    stub : AgentServiceStub
        Stub on the agent's channel.
    outbox : Outbox
        The agent's outbox: what is held, what to (re)send, where acks go.
    handler : SessionHandler
        The daemon.
    metadata : Sequence[tuple[str, str]]
        Call metadata (the bearer token).
    heartbeat_interval_s : float
        Heartbeat period when the Welcome gives none.
    welcome_timeout_s : float
        How long to wait for the Welcome.
    wait_for_ready : bool
        Let the call wait while the channel is not connected (one server address: the
        channel's own retries find it when it comes back). ``False`` fails the call at
        once instead, so that the agent can try its next address.
    coalesce_s : float
        Under load, how long to wait for more reports before writing a batch (0: never).
    """

    def __init__(
        self,
        stub: pb_grpc.AgentServiceAsyncStub,
        outbox: Outbox,
        handler: SessionHandler,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        heartbeat_interval_s: float = 10.0,
        welcome_timeout_s: float = 30.0,
        wait_for_ready: bool = True,
        coalesce_s: float = 0.0,
    ) -> None:
        self._stub = stub
        self._wait_for_ready = wait_for_ready
        self._outbox = outbox
        self._handler = handler
        self._metadata = tuple(metadata)
        self.heartbeat_interval_s = heartbeat_interval_s
        self._welcome_timeout_s = welcome_timeout_s
        self.welcome: pb.Welcome | None = None
        self._control: deque[pb.ConnectRequest] = deque()
        self._unsent: deque[pb.Report] = deque()
        self._wake = asyncio.Event()
        self._coalesce_s = coalesce_s
        self._last_batch = -1.0  # loop time of the last report batch written
        #: Reports and batches written on this stream (for tests and metrics).
        self.reports_sent = 0
        self.batches_sent = 0

    @property
    def session_id(self) -> str:
        """The server's identifier of the session ("" before the Welcome)."""
        return "" if self.welcome is None else self.welcome.session_id

    def reply(self, run_id: str, attempt: int, *, accepted: bool, reason: str = "") -> None:
        """Queue an AssignmentReply (written before any report queued after it)."""
        message = pb.AssignmentReply(
            run_id=run_id, attempt=attempt, accepted=accepted, reason=reason
        )
        self._send(pb.ConnectRequest(assignment_reply=message))

    async def run(self) -> None:
        """Run the session until the stream ends; always raises.

        Raises
        ------
        grpc.aio.AioRpcError
            The RPC failed (server unreachable, UNAUTHENTICATED, ...).
        SessionEnded
            The server closed the stream, or sent something other than a Welcome first.
        TimeoutError
            No Welcome came in time.
        """
        # wait_for_ready (one address): while the server is down the call waits for the
        # channel, which retries on its own short backoff, instead of failing at once and
        # leaving the next try to the agent's longer one; a server that comes back is
        # found within the channel's backoff (see create_channel).
        call = self._stub.Connect(metadata=self._metadata, wait_for_ready=self._wait_for_ready)
        unsubscribe = None
        tasks: list[asyncio.Task[None]] = []
        try:
            await call.write(pb.ConnectRequest(hello=await self._handler.hello()))
            self.welcome = await asyncio.wait_for(self._read_welcome(call), self._welcome_timeout_s)
            for ack in self.welcome.resume:
                self._outbox.ack(ack.run_id, ack.attempt, ack.seq)
            # Snapshot and subscribe with no await in between: no report is missed or
            # sent twice.
            self._unsent.extend(self._outbox.pending())
            unsubscribe = self._outbox.subscribe(self._on_committed)
            interval = self.welcome.heartbeat_interval.ToTimedelta().total_seconds()
            if interval > 0:
                self.heartbeat_interval_s = interval
            self._handler.on_welcome(self, self.welcome)
            self._wake.set()
            tasks = [
                asyncio.create_task(self._write_loop(call), name="agent stream writer"),
                asyncio.create_task(self._read_loop(call), name="agent stream reader"),
                asyncio.create_task(self._heartbeat_loop(), name="agent heartbeats"),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the task's error
            raise SessionEnded("the session ended")  # pragma: no cover - tasks never return
        finally:
            if unsubscribe is not None:
                unsubscribe()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            call.cancel()

    async def _read_welcome(self, call: _Call) -> pb.Welcome:
        message = await call.read()
        if message is grpc.aio.EOF:
            await _raise_status(call)
            raise SessionEnded("the server closed the stream before its Welcome")
        assert isinstance(message, pb.ConnectResponse)
        if message.WhichOneof("message") != "welcome":
            raise SessionEnded(
                f"expected a Welcome, got {message.WhichOneof('message') or 'an empty message'}"
            )
        return message.welcome

    def _send(self, message: pb.ConnectRequest) -> None:
        self._control.append(message)
        self._wake.set()

    def _on_committed(self, report: pb.Report) -> None:
        self._unsent.append(report)
        self._wake.set()

    async def _write_loop(self, call: _Call) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            if (
                self._coalesce_s > 0
                and not self._control
                and loop.time() - self._last_batch < LOAD_WINDOW_S
            ):
                await asyncio.sleep(self._coalesce_s)  # under load: let more reports join
            self._wake.clear()
            while self._control or self._unsent:
                while self._control:
                    await call.write(self._control.popleft())
                batch = self._next_batch()
                if batch:
                    await call.write(pb.ConnectRequest(reports=pb.ReportBatch(reports=batch)))
                    self.reports_sent += len(batch)
                    self.batches_sent += 1
                    self._last_batch = loop.time()

    def _next_batch(self) -> list[pb.Report]:
        batch: list[pb.Report] = []
        size = 0
        while self._unsent and len(batch) < MAX_BATCH_REPORTS:
            report = self._unsent[0]
            if not self._outbox.is_pending(report):
                self._unsent.popleft()  # acknowledged or dropped meanwhile
                continue
            report_size = report.ByteSize()
            if batch and size + report_size > MAX_BATCH_BYTES:
                break
            batch.append(self._unsent.popleft())
            size += report_size
        return batch

    async def _read_loop(self, call: _Call) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                await _raise_status(call)
                raise SessionEnded("the server closed the stream")
            assert isinstance(message, pb.ConnectResponse)
            await self._dispatch(message)

    async def _dispatch(self, message: pb.ConnectResponse) -> None:
        kind = message.WhichOneof("message")
        if kind == "acks":
            for ack in message.acks.acks:
                self._outbox.ack(ack.run_id, ack.attempt, ack.seq)
        elif kind == "assignment":
            await self._handler.on_assignment(self, message.assignment)
        elif kind == "cancel":
            self._handler.on_cancel(message.cancel)
        elif kind == "nack":
            self._handler.on_nack(message.nack)
        elif kind == "drain":
            self._handler.on_drain(message.drain)
        elif kind == "undrain":
            self._handler.on_undrain(message.undrain)
        elif kind == "welcome":
            log.warning("agent stream: ignoring a second Welcome")
        else:
            log.warning("agent stream: ignoring a message with no known field")

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            capacity = await self._handler.capacity()
            self._send(pb.ConnectRequest(heartbeat=pb.Heartbeat(capacity=capacity)))


_Call = grpc.aio.StreamStreamCall[pb.ConnectRequest, pb.ConnectResponse]


async def _raise_status(call: _Call) -> None:
    """Raise the call's error status, if it ended with one."""
    code = await call.code()
    if code != grpc.StatusCode.OK:
        raise grpc.aio.AioRpcError(
            code,
            await call.initial_metadata(),
            await call.trailing_metadata(),
            details=await call.details(),
        )
