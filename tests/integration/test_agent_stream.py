"""The agent stream's rules, spoken directly against the real server.

The test plays an agent over ``AgentService.Connect`` to check what a well-behaved agent
never does: messages out of order, reports for runs it does not hold, stale attempts,
duplicates and malformed reports. Each is refused with a clear status and the session
and the server carry on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from gyoza.api.v1 import (
    agent_pb2,
    agent_service_pb2_grpc,
    op_run_service_pb2,
    op_run_service_pb2_grpc,
)
from gyoza.api.v1 import (
    agent_service_pb2 as pb,
)
from gyoza.api.v1 import (
    resources_pb2 as S,
)


class FakePeer:
    """A hand-driven agent session (the test is the agent)."""

    def __init__(self, address: str, name: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = agent_service_pb2_grpc.AgentServiceStub(self.channel)
        self.runs = op_run_service_pb2_grpc.OpRunServiceStub(self.channel)
        self.name = name
        self.outbound: asyncio.Queue[pb.ConnectRequest | None] = asyncio.Queue()
        self.call: Any = None

    async def _requests(self) -> AsyncIterator[pb.ConnectRequest]:
        while True:
            message = await self.outbound.get()
            if message is None:
                return
            yield message

    def open(self) -> None:
        self.call = self.stub.Connect(self._requests())

    def send(self, **message: Any) -> None:
        self.outbound.put_nowait(pb.ConnectRequest(**message))

    def hello(self, held: list[pb.HeldAttempt] | None = None) -> None:
        self.send(
            hello=pb.Hello(
                agent_name=self.name,
                capacity=agent_pb2.Capacity(cpu=4, ram_mb=4096),
                held=held or [],
            )
        )

    async def next(self, kind: str) -> Any:
        """The next server message of this kind (others, e.g. acks, are skipped)."""
        while True:
            message = await asyncio.wait_for(self.call.read(), 10)
            assert message is not grpc.aio.EOF, "stream ended"
            if message.WhichOneof("message") == kind:
                return getattr(message, kind)

    def report(self, run_id: str, attempt: int, seq: int, **event: Any) -> None:
        self.send(
            reports=pb.ReportBatch(
                reports=[
                    pb.Report(
                        run_id=run_id, attempt=attempt, seq=seq, event=pb.ReportedEvent(**event)
                    )
                ]
            )
        )

    async def close(self) -> None:
        self.outbound.put_nowait(None)
        await self.channel.close()


async def _create(peer: FakePeer) -> str:
    reply = await peer.runs.CreateOpRun(
        op_run_service_pb2.CreateOpRunRequest(image="scripted"), timeout=10
    )
    return str(reply.op_run.id)


async def _events(peer: FakePeer, run_id: str) -> list[int]:
    reply = await peer.runs.GetOpRun(op_run_service_pb2.GetOpRunRequest(run_id=run_id))
    return [e.type for e in reply.op_run.events]


def test_the_first_message_must_be_a_hello(cluster: Any) -> None:
    async def scenario() -> None:
        peer = FakePeer(cluster.address, "p1")
        peer.open()
        peer.send(heartbeat=pb.Heartbeat())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await peer.next("welcome")
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        await peer.close()

    asyncio.run(scenario())


def test_reports_are_fenced_deduplicated_and_refusals_keep_the_stream(cluster: Any) -> None:
    async def scenario() -> None:
        peer = FakePeer(cluster.address, "p1")
        peer.open()
        peer.hello()
        welcome = await peer.next("welcome")
        assert welcome.session_id
        assert welcome.lease_timeout.ToMilliseconds() > 0

        run_id = await _create(peer)
        assignment = await peer.next("assignment")
        assert (assignment.run_id, assignment.attempt) == (run_id, 1)
        peer.send(assignment_reply=pb.AssignmentReply(run_id=run_id, attempt=1, accepted=True))

        peer.report(run_id, 1, 1, type=S.EVENT_TYPE_STARTED)
        acks = await peer.next("acks")
        assert [(a.run_id, a.attempt, a.seq) for a in acks.acks] == [(run_id, 1, 1)]

        # A duplicate is acknowledged again and not applied twice.
        peer.report(run_id, 1, 1, type=S.EVENT_TYPE_STARTED)
        acks = await peer.next("acks")
        assert acks.acks[0].seq == 1
        assert (await _events(peer, run_id)).count(S.EVENT_TYPE_STARTED) == 1

        # A stale attempt is refused with ABORTED and changes nothing.
        before = await _events(peer, run_id)
        peer.report(run_id, 7, 1, type=S.EVENT_TYPE_PROGRESS, progress=50)
        nack = await peer.next("nack")
        assert nack.code == grpc.StatusCode.ABORTED.value[0]
        assert nack.reason == "STALE_ATTEMPT"
        assert await _events(peer, run_id) == before

        # A run this agent does not hold is refused with PERMISSION_DENIED.
        other = await _create(peer)
        await peer.next("assignment")  # it comes here: the only agent
        peer.send(assignment_reply=pb.AssignmentReply(run_id=other, attempt=1, accepted=False))
        peer2 = FakePeer(cluster.address, "p2")
        peer2.open()
        peer2.hello()
        await peer2.next("welcome")
        peer2.report(run_id, 1, 2, type=S.EVENT_TYPE_PROGRESS, progress=10)
        nack = await peer2.next("nack")
        assert nack.code == grpc.StatusCode.PERMISSION_DENIED.value[0]
        assert await _events(peer, run_id) == before

        # A malformed report (an event no agent may send) is refused; the stream goes on.
        peer.report(run_id, 1, 2, type=S.EVENT_TYPE_RETRIED)
        nack = await peer.next("nack")
        assert nack.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        peer.report(run_id, 1, 3, type=S.EVENT_TYPE_PROGRESS, progress=60)
        acks = await peer.next("acks")
        assert acks.acks[-1].seq == 3
        peer.report(run_id, 1, 4, type=S.EVENT_TYPE_COMPLETED)
        await peer.next("acks")
        reply = await peer.runs.GetOpRun(op_run_service_pb2.GetOpRunRequest(run_id=run_id))
        assert reply.op_run.state == S.OP_RUN_STATE_COMPLETED
        assert reply.op_run.progress == 60
        await peer.close()
        await peer2.close()

    asyncio.run(scenario())


def test_reconnect_reconciles_held_attempts(cluster: Any) -> None:
    async def scenario() -> None:
        peer = FakePeer(cluster.address, "p1")
        peer.open()
        peer.hello()
        await peer.next("welcome")
        run_id = await _create(peer)
        await peer.next("assignment")
        peer.send(assignment_reply=pb.AssignmentReply(run_id=run_id, attempt=1, accepted=True))
        peer.report(run_id, 1, 1, type=S.EVENT_TYPE_STARTED)
        await peer.next("acks")
        await peer.close()

        # Back again, holding the attempt and one unknown: the server resumes the first
        # from its watermark and tells the agent to drop the other.
        again = FakePeer(cluster.address, "p1")
        again.open()
        again.hello(
            held=[
                pb.HeldAttempt(run_id=run_id, attempt=1, last_seq=2),
                pb.HeldAttempt(run_id="run_000000000000", attempt=1, last_seq=1),
            ]
        )
        welcome = await again.next("welcome")
        assert [(a.run_id, a.attempt, a.seq) for a in welcome.resume] == [(run_id, 1, 1)]
        nack = await again.next("nack")
        assert nack.run_id == "run_000000000000" and nack.drop_attempt
        again.report(run_id, 1, 2, type=S.EVENT_TYPE_COMPLETED)
        acks = await again.next("acks")
        assert acks.acks[0].seq == 2
        await again.close()

    asyncio.run(scenario())


def test_outputs_over_the_size_limit_fail_the_run(cluster: Any) -> None:
    async def scenario() -> None:
        peer = FakePeer(cluster.address, "p1")
        peer.open()
        peer.hello()
        await peer.next("welcome")
        run_id = await _create(peer)
        await peer.next("assignment")
        peer.send(assignment_reply=pb.AssignmentReply(run_id=run_id, attempt=1, accepted=True))
        peer.report(run_id, 1, 1, type=S.EVENT_TYPE_STARTED)
        huge = struct_pb2.Struct()
        huge.update({"blob": "x" * (1 << 20)})
        peer.report(run_id, 1, 2, type=S.EVENT_TYPE_COMPLETED, outputs=huge)
        while (await peer.next("acks")).acks[-1].seq < 2:
            pass
        reply = await peer.runs.GetOpRun(op_run_service_pb2.GetOpRunRequest(run_id=run_id))
        run = reply.op_run
        assert run.state == S.OP_RUN_STATE_FAILED
        assert run.execution_summary.failure_class == S.FAILURE_CLASS_OUTPUT_INVALID
        assert "limit" in run.execution_summary.error_message
        await peer.close()

    asyncio.run(scenario())
