"""The follower's forwarder in front of a real control plane, everything on 127.0.0.1.

Each test runs a real :class:`ControlPlane` (SQLite) and, in front of it, a grpc.aio
server holding only a :class:`Forwarder` (and health, which a follower serves itself).
Clients and a scripted agent talk to the forwarder's port only. A small recording
upstream stands in for the leader where a test must see what the leader received.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from gyoza.agent.config import AgentConfig
from gyoza.agent.daemon import Agent, ConnectionState
from gyoza.api.v1 import agent_service_pb2, agent_service_pb2_grpc, resources_pb2
from gyoza.api.v1 import op_run_service_pb2 as pb
from gyoza.api.v1 import op_run_service_pb2_grpc as pb_grpc
from gyoza.server.app import ControlPlane, grpc_options
from gyoza.server.config import ServerConfig
from gyoza.server.control import ControlSettings
from gyoza.server.forward import (
    REPLICA_METADATA_KEY,
    Forwarder,
    MethodKind,
    forwarded_metadata,
    is_local,
    method_kind,
)

pytestmark = pytest.mark.timeout(90)

WAIT_S = 20.0
REPLICA = "replica-b"
COMPLETED = resources_pb2.OP_RUN_STATE_COMPLETED
CANCELLED = resources_pb2.OP_RUN_STATE_CANCELLED
T = TypeVar("T")


@dataclass
class Stack:
    """A control plane, a forwarder in front of it, and a channel to the forwarder."""

    plane: ControlPlane
    forwarder: Forwarder
    address: str
    channel: grpc.aio.Channel
    health: Any

    @property
    def runs(self) -> pb_grpc.OpRunServiceStub:
        return pb_grpc.OpRunServiceStub(self.channel)

    @property
    def agents(self) -> agent_service_pb2_grpc.AgentServiceStub:
        return agent_service_pb2_grpc.AgentServiceStub(self.channel)


@asynccontextmanager
async def forwarding_server(forwarder: Forwarder, config: ServerConfig) -> AsyncIterator[Any]:
    """A server with the forwarder and a local health service: (address, health)."""
    server = grpc.aio.server(options=grpc_options(config))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_generic_rpc_handlers((forwarder.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield f"127.0.0.1:{port}", health_servicer
    finally:
        await forwarder.close()
        await server.stop(0)


@asynccontextmanager
async def stack(tmp_path: Path, **changes: Any) -> AsyncIterator[Stack]:
    config = ServerConfig(
        listen="127.0.0.1:0",
        database_url=f"sqlite:///{tmp_path / 'gyoza.db'}",
        shutdown_grace_s=1.0,
        control=ControlSettings(heartbeat_interval_s=0.5, lease_timeout_s=5.0, grace_s=5.0),
        **changes,
    )
    plane = ControlPlane(config)
    await plane.start()
    try:
        forwarder = Forwarder(replica_id=REPLICA, max_message_bytes=config.max_message_bytes)
        forwarder.set_target(plane.address)
        async with forwarding_server(forwarder, config) as (address, health_servicer):
            channel = grpc.aio.insecure_channel(address, options=grpc_options(config)[:2])
            try:
                yield Stack(plane, forwarder, address, channel, health_servicer)
            finally:
                await channel.close()
    finally:
        await plane.stop()


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 80))


async def failure(call: Awaitable[Any] | AsyncIterator[Any]) -> grpc.aio.AioRpcError:
    """The error a call (or a stream, read to its end) fails with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if hasattr(call, "__aiter__"):
            await drain(call)
        else:
            await call
    return caught.value


def error_info(error: grpc.aio.AioRpcError) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    """(code, ErrorInfo reason, BadRequest violations) of a failed call."""
    reason = ""
    violations: dict[str, str] = {}
    for key, value in error.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        assert status.code == error.code().value[0]
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                assert info.domain == "gyoza"
                reason = info.reason
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = {v.field: v.description for v in bad.field_violations}
    return error.code(), reason, violations


async def until(check: Callable[[], Awaitable[T | None]], what: str) -> T:
    """Ask *check* until it answers something; fail after WAIT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        found = await check()
        if found is not None and found is not False:
            return found
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def drain(call: Any) -> list[Any]:
    """What is left of a server stream, read to its end."""
    messages = []
    while (message := await call.read()) is not grpc.aio.EOF:
        messages.append(message)
    return messages


def subscribers() -> float:
    value = REGISTRY.get_sample_value("gyoza_hub_subscribers")
    return 0.0 if value is None else value


def adhoc(**inputs: Any) -> pb.CreateOpRunRequest:
    request = pb.CreateOpRunRequest(
        image="scripted",
        event_delivery=resources_pb2.EventDelivery(topic="fwd", attributes={"team": "a"}),
    )
    request.inputs.update(inputs)
    return request


def agent_config(address: str, state_dir: Path) -> AgentConfig:
    return AgentConfig(
        server=address,
        name="agent-f",
        state_dir=state_dir,
        executor="scripted",
        cpu=4.0,
        ram_mb=4096,
        heartbeat_interval_s=0.5,
        reconnect_initial_s=0.01,
        reconnect_max_s=0.1,
    )


# -- plain functions ------------------------------------------------------------------


def test_metadata_loses_grpc_keys_and_gains_the_replica() -> None:
    sent = [
        (":authority", "x"),
        ("grpc-timeout", "1S"),
        ("user-agent", "grpc-python"),
        ("authorization", "Bearer k"),
        ("x-gyoza-replica", "forged"),
        ("trace-bin", b"\x00\x01"),
    ]
    assert forwarded_metadata(sent, "r1") == [
        ("authorization", "Bearer k"),
        ("trace-bin", b"\x00\x01"),
        (REPLICA_METADATA_KEY, "r1"),
    ]
    assert is_local("/grpc.health.v1.Health/Check")
    assert is_local("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo")
    assert is_local("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    assert not is_local("/gyoza.api.v1.OpRunService/GetOpRun")
    assert method_kind("/gyoza.api.v1.OpRunService/GetOpRun") is MethodKind.UNARY
    assert method_kind("/gyoza.api.v1.OpRunService/WatchOpRun") is MethodKind.SERVER_STREAMING
    assert method_kind("/gyoza.api.v1.AgentService/Connect") is MethodKind.STREAMING
    assert method_kind("/some.Other/Method") is MethodKind.STREAMING


# -- through the forwarder, to the real control plane ----------------------------------


def test_unary_and_server_streaming_calls_pass_through(tmp_path: Path) -> None:
    async def test() -> None:
        async with stack(tmp_path) as s:
            created = await s.runs.CreateOpRun(adhoc(), metadata=(("x-request-id", "r-1"),))
            run_id = created.op_run.id
            got = await s.runs.GetOpRun(pb.GetOpRunRequest(run_id=run_id))
            assert got.op_run.id == run_id and got.op_run.image == "scripted"

            watch = s.runs.WatchOpRun(pb.WatchOpRunRequest(run_id=run_id), timeout=WAIT_S)
            snapshot = await watch.read()
            assert snapshot.op_run.id == run_id and not snapshot.HasField("event")
            topic = s.runs.SubscribeEvents(pb.SubscribeEventsRequest(topic="fwd"), timeout=WAIT_S)
            first = await topic.read()
            assert first.run_id == run_id and dict(first.attributes) == {"team": "a"}

            await s.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=run_id, reason="enough"))
            rest = await drain(watch)  # ends by itself once the run is CANCELLED
            assert rest[-1].op_run.state == CANCELLED
            assert await watch.code() is grpc.StatusCode.OK
            # The leader's trailing metadata comes back: its request id for the call.
            trailing = dict(await watch.trailing_metadata())
            assert trailing.get("x-request-id")
            topic.cancel()
            assert s.forwarder.forwarded_calls == 5  # create, get, watch, subscribe, cancel

    run(test)


def test_a_subscription_gets_the_leaders_headers_before_any_record(tmp_path: Path) -> None:
    """SubscribeEvents sends its headers once the subscription is in place, with no
    record yet: a subscriber waiting for them must not wait for the first record."""

    async def test() -> None:
        async with stack(tmp_path) as s:
            topic = s.runs.SubscribeEvents(
                pb.SubscribeEventsRequest(topic="quiet", max_batch=10), timeout=WAIT_S
            )
            await asyncio.wait_for(topic.initial_metadata(), WAIT_S / 2)
            # In place: a run created now is on it.
            request = adhoc()
            request.event_delivery.topic = "quiet"
            created = await s.runs.CreateOpRun(request)
            first = await topic.read()
            assert first.run_id == created.op_run.id
            topic.cancel()

    run(test)


def test_errors_keep_their_code_reason_and_details(tmp_path: Path) -> None:
    async def test() -> None:
        async with stack(tmp_path) as s:
            missing = await failure(s.runs.GetOpRun(pb.GetOpRunRequest(run_id="run_000000000000")))
            assert error_info(missing)[:2] == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
            invalid = await failure(
                s.runs.CreateOpRun(pb.CreateOpRunRequest(priority=-1), timeout=WAIT_S)
            )
            code, reason, violations = error_info(invalid)
            assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
            assert violations, "the BadRequest detail was lost"
            stream = await failure(
                s.runs.WatchOpRun(pb.WatchOpRunRequest(run_id="run_000000000000"))
            )
            assert error_info(stream)[:2] == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
            # The bytes are not parsed on the way: the leader refuses them itself.
            raw = s.channel.unary_unary("/gyoza.api.v1.OpRunService/GetOpRun")
            garbage = await failure(raw(b"\xff\xff\xff", timeout=WAIT_S))
            assert error_info(garbage)[:2] == (
                grpc.StatusCode.INVALID_ARGUMENT,
                "MALFORMED_REQUEST",
            )
            unknown = s.channel.unary_unary("/gyoza.api.v1.OpRunService/NoSuchMethod")
            assert (await failure(unknown(b"", timeout=WAIT_S))).code() is (
                grpc.StatusCode.UNIMPLEMENTED
            )

    run(test)


def test_a_deadline_passes_through(tmp_path: Path) -> None:
    async def test() -> None:
        async with stack(tmp_path) as s:
            run_id = (await s.runs.CreateOpRun(adhoc())).op_run.id
            watch = s.runs.WatchOpRun(pb.WatchOpRunRequest(run_id=run_id), timeout=0.5)
            assert (await failure(watch)).code() is grpc.StatusCode.DEADLINE_EXCEEDED

    run(test)


def test_a_cancelled_watch_cancels_the_leaders_call(tmp_path: Path) -> None:
    async def test() -> None:
        async with stack(tmp_path) as s:
            run_id = (await s.runs.CreateOpRun(adhoc())).op_run.id
            before = subscribers()
            watch = s.runs.WatchOpRun(pb.WatchOpRunRequest(run_id=run_id), timeout=WAIT_S)
            await watch.read()
            await until(
                lambda: _async(subscribers() == before + 1), "the leader's watch subscription"
            )
            assert s.forwarder.open_calls == {"/gyoza.api.v1.OpRunService/WatchOpRun": 1}
            watch.cancel()
            await until(lambda: _async(subscribers() == before), "the leader's watch to end")
            await until(lambda: _async(not s.forwarder.open_calls), "the forwarded call to end")

    run(test)


def test_no_leader_is_unavailable_and_health_stays_local(tmp_path: Path) -> None:
    async def test() -> None:
        async with stack(tmp_path) as s:
            run_id = (await s.runs.CreateOpRun(adhoc())).op_run.id
            watch = s.runs.WatchOpRun(pb.WatchOpRunRequest(run_id=run_id), timeout=WAIT_S)
            await watch.read()
            s.forwarder.set_target(None)
            assert s.forwarder.target is None
            # The stream in flight to the former leader ends; new calls find no leader.
            ended = await failure(watch)
            assert error_info(ended)[:2] == (grpc.StatusCode.UNAVAILABLE, "LEADER_CHANGED")
            error = await failure(s.runs.GetOpRun(pb.GetOpRunRequest(run_id="run_1")))
            assert error_info(error)[:2] == (grpc.StatusCode.UNAVAILABLE, "NO_LEADER")
            stream = await failure(s.runs.WatchOpRun(pb.WatchOpRunRequest(run_id=run_id)))
            assert error_info(stream)[:2] == (grpc.StatusCode.UNAVAILABLE, "NO_LEADER")
            checked = await health_pb2_grpc.HealthStub(s.channel).Check(
                health_pb2.HealthCheckRequest(), timeout=WAIT_S
            )
            assert checked.status == health_pb2.HealthCheckResponse.SERVING
            s.forwarder.set_target(s.plane.address)
            got = await s.runs.GetOpRun(pb.GetOpRunRequest(run_id=run_id))
            assert got.op_run.id == run_id

    run(test)


def test_an_unreachable_leader_is_unavailable_leader_unreachable(tmp_path: Path) -> None:
    async def test() -> None:
        async with stack(tmp_path) as s:
            s.forwarder.set_target("127.0.0.1:1")
            error = await failure(s.runs.GetOpRun(pb.GetOpRunRequest(run_id="r"), timeout=WAIT_S))
            assert error_info(error)[:2] == (grpc.StatusCode.UNAVAILABLE, "LEADER_UNREACHABLE")

    run(test)


def test_a_scripted_agent_through_the_forwarder(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def test() -> None:
        async with (
            stack(tmp_path) as s,
            Agent(agent_config(s.address, tmp_path / "agent")) as agent,
        ):
            await asyncio.wait_for(agent.wait_for_state(ConnectionState.CONNECTED), WAIT_S)
            listed = await s.agents.ListAgents(agent_service_pb2.ListAgentsRequest())
            (shown,) = listed.agents
            assert (shown.name, shown.replica) == ("agent-f", REPLICA)
            first_session = shown.session_id

            await _completes(s, adhoc(progress_steps=3, outputs={"y": 1}))

            # A new leader: the agent's stream ends UNAVAILABLE and it comes back.
            other = s.plane.address.replace("127.0.0.1", "localhost")
            with caplog.at_level(logging.WARNING, logger="gyoza.agent.daemon"):
                s.forwarder.set_target(other)

                async def new_session() -> str | None:
                    reply = await s.agents.ListAgents(agent_service_pb2.ListAgentsRequest())
                    connected = [
                        a
                        for a in reply.agents
                        if a.session_id != first_session and a.state == shown.state
                    ]
                    return connected[0].replica if connected else None

                assert await until(new_session, "the agent to reconnect") == REPLICA
            assert any(
                "UNAVAILABLE" in r.getMessage() and "leader changed" in r.getMessage()
                for r in caplog.records
            ), [r.getMessage() for r in caplog.records]
            await _completes(s, adhoc(progress_steps=1))

    run(test)


async def _completes(s: Stack, request: pb.CreateOpRunRequest) -> None:
    """Create a run; watch it through the forwarder to COMPLETED with all its events."""
    run_id = (await s.runs.CreateOpRun(request)).op_run.id
    watch = s.runs.WatchOpRun(pb.WatchOpRunRequest(run_id=run_id), timeout=WAIT_S)
    last = (await drain(watch))[-1]
    assert last.op_run.state == COMPLETED, last.op_run
    events = await s.runs.ListOpRunEvents(pb.ListOpRunEventsRequest(run_id=run_id))
    types = [e.type for e in events.events]
    steps = int(request.inputs["progress_steps"])
    assert types == [
        resources_pb2.EVENT_TYPE_ASSIGNED,
        resources_pb2.EVENT_TYPE_STARTED,
        *[resources_pb2.EVENT_TYPE_PROGRESS] * steps,
        resources_pb2.EVENT_TYPE_COMPLETED,
    ], types


async def _async(value: T) -> T:
    return value


def test_the_replica_of_a_direct_stream_and_a_malformed_replica(tmp_path: Path) -> None:
    async def test() -> None:
        async with stack(tmp_path) as s:
            direct = grpc.aio.insecure_channel(s.plane.address)
            stub = agent_service_pb2_grpc.AgentServiceStub(direct)
            try:
                hello = agent_service_pb2.ConnectRequest(
                    hello=agent_service_pb2.Hello(agent_name="agent-d", version="test")
                )
                # No x-gyoza-replica: the serving replica's own id (none configured here).
                stream = stub.Connect(timeout=WAIT_S)
                await stream.write(hello)
                assert (await stream.read()).HasField("welcome")
                listed = await stub.ListAgents(agent_service_pb2.ListAgentsRequest())
                assert [(a.name, a.replica) for a in listed.agents] == [("agent-d", "")]
                stream.cancel()

                forged = stub.Connect(timeout=WAIT_S, metadata=((REPLICA_METADATA_KEY, "r" * 200),))
                await forged.write(hello)
                code, reason, violations = error_info(await failure(forged))
                assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
                assert set(violations) == {REPLICA_METADATA_KEY}
            finally:
                await direct.close()

    run(test)


# -- what the leader receives: a recording upstream -------------------------------------


@dataclass
class Seen:
    """One call as the recording upstream received it."""

    metadata: dict[str, Any]
    time_remaining: float | None
    requests: list[bytes] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False


class Recorder(grpc.GenericRpcHandler):
    """Echoes each request back (bidi), then fails with a status of its own; after a
    request ``hang`` it waits for ever, so that only a cancel ends the call."""

    def __init__(self) -> None:
        self.calls: list[Seen] = []
        self.arrived = asyncio.Event()

    def service(self, details: grpc.HandlerCallDetails) -> Any:
        return grpc.stream_stream_rpc_method_handler(self.echo)

    async def echo(self, requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        seen = Seen(dict(context.invocation_metadata()), context.time_remaining())
        self.calls.append(seen)

        context.add_done_callback(lambda _: seen.ended.set())
        self.arrived.set()
        async for request in requests:
            seen.requests.append(request)
            yield request[::-1]
            if request == b"hang":
                try:
                    await asyncio.Event().wait()
                except asyncio.CancelledError:
                    seen.cancelled = True
                    raise
        await context.abort(
            grpc.StatusCode.ABORTED,
            "echo done",
            (("x-answer", "42"), ("answer-bin", b"\x00\x2a")),
        )


def test_metadata_deadline_bytes_and_cancel_reach_the_upstream(tmp_path: Path) -> None:
    async def test() -> None:
        upstream = grpc.aio.server()
        recorder = Recorder()
        upstream.add_generic_rpc_handlers((recorder,))
        port = upstream.add_insecure_port("127.0.0.1:0")
        await upstream.start()
        config = ServerConfig()
        forwarder = Forwarder(replica_id=REPLICA)
        forwarder.set_target(f"127.0.0.1:{port}")
        try:
            async with (
                forwarding_server(forwarder, config) as (address, _),
                grpc.aio.insecure_channel(address) as channel,
            ):
                bidi = channel.stream_stream("/x.Echo/Talk")

                async def two() -> AsyncIterator[bytes]:
                    yield b"abc"
                    yield b"\x00\x01"

                call = bidi(
                    two(),
                    timeout=30,
                    metadata=(("authorization", "Bearer k"), ("trace-bin", b"\x07")),
                )
                assert [await call.read(), await call.read()] == [b"cba", b"\x01\x00"]
                assert await call.code() is grpc.StatusCode.ABORTED
                assert await call.details() == "echo done"
                trailing = dict(await call.trailing_metadata())
                assert (trailing["x-answer"], trailing["answer-bin"]) == ("42", b"\x00\x2a")
                seen = recorder.calls[0]
                assert seen.requests == [b"abc", b"\x00\x01"]
                assert seen.metadata["authorization"] == "Bearer k"
                assert seen.metadata["trace-bin"] == b"\x07"
                assert seen.metadata[REPLICA_METADATA_KEY] == REPLICA
                assert seen.time_remaining is not None and 20 < seen.time_remaining <= 31

                # The caller cancels: the upstream's call ends, cancelled.
                recorder.arrived.clear()
                hanging = bidi(timeout=30)
                await hanging.write(b"hang")
                await asyncio.wait_for(recorder.arrived.wait(), WAIT_S)
                assert await hanging.read() == b"gnah"
                hanging.cancel()
                second = recorder.calls[1]
                await asyncio.wait_for(second.ended.wait(), WAIT_S)
                assert second.cancelled
        finally:
            await upstream.stop(0)

    run(test)
