"""Bad input gets a clear status with an ErrorInfo reason, never UNKNOWN or INTERNAL,
and the server keeps serving: bytes that do not parse, errors too large for gRPC's
headers, agent streams with garbage, bad times and absurd capacities."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from gyoza.api.v1 import (
    agent_pb2,
    agent_service_pb2,
    definition_service_pb2,
    op_definition_pb2,
    op_run_service_pb2,
    resources_pb2,
)
from gyoza.api.v1 import op_run_service_pb2 as pb

ExpectError = Callable[[Callable[[], Any]], Any]
TIMEOUT_S = 15
GARBAGE = b"\xff\xff\xff\xff\x0f"  # a truncated varint: no message of any type


def rpc_methods() -> list[tuple[str, Any]]:
    """Every gyoza RPC as (full method name, method descriptor)."""
    methods = []
    for module in (agent_service_pb2, definition_service_pb2, op_run_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                methods.append((f"/{service.full_name}/{method.name}", method))
    return methods


def raw_call(channel: grpc.Channel, name: str, method: Any, requests: list[bytes]) -> None:
    """Send raw request bytes to *name* and read the whole answer."""
    identity = bytes.__call__
    if method.client_streaming:
        call = channel.stream_stream(name, request_serializer=identity)
        for _ in call(iter(requests), timeout=TIMEOUT_S):
            pass
    elif method.server_streaming:
        for _ in channel.unary_stream(name, request_serializer=identity)(
            requests[0], timeout=TIMEOUT_S
        ):
            pass
    else:
        channel.unary_unary(name, request_serializer=identity)(requests[0], timeout=TIMEOUT_S)


def test_every_rpc_answers_undecodable_bytes_with_invalid_argument(
    sqlite_server: Any, expect_error: ExpectError
) -> None:
    channel = sqlite_server.channel()
    methods = rpc_methods()
    assert len(methods) >= 17
    for name, method in methods:
        error = expect_error(lambda n=name, m=method: raw_call(channel, n, m, [GARBAGE]))
        assert (error.code, error.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "MALFORMED_REQUEST",
        ), name
        assert error.trailing.get("x-request-id"), name
    errors = [e for e in sqlite_server.log_events() if e.get("level") in ("error", "critical")]
    assert errors == []
    stubs = sqlite_server.stubs()
    assert stubs.runs.CreateOpRun(pb.CreateOpRunRequest(image="busybox")).op_run.id


def test_errors_too_large_for_headers_still_arrive_with_their_status(
    sqlite_server: Any, expect_error: ExpectError
) -> None:
    stubs = sqlite_server.stubs()
    specs = [
        resources_pb2.InputSpec(name=f"in{i}", type=resources_pb2.INPUT_TYPE_UNSPECIFIED)
        for i in range(300)
    ]
    many = expect_error(
        lambda: stubs.definitions.CreateOpDefinition(
            definition_service_pb2.CreateOpDefinitionRequest(
                op_definition=op_definition_pb2.OpDefinition(
                    name="wide", image="busybox", inputs=specs
                )
            )
        )
    )
    assert (many.code, many.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    assert 1 < len(many.violations) < 300
    assert "more violations" in many.violations["..."]

    long_name = expect_error(
        lambda: stubs.agents.DrainAgent(agent_service_pb2.DrainAgentRequest(name="n" * 20_000))
    )
    assert (long_name.code, long_name.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_INPUT",
    )
    unknown = expect_error(
        lambda: stubs.agents.DrainAgent(agent_service_pb2.DrainAgentRequest(name="nobody"))
    )
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")

    wide_id = expect_error(lambda: stubs.runs.GetOpRun(pb.GetOpRunRequest(run_id="é" * 3000)))
    assert (wide_id.code, wide_id.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    assert len(wide_id.message) < 1000


# -- the agent stream -------------------------------------------------------------------


class RawStream:
    """An agent stream that sends whatever bytes the test gives it."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._queue: list[bytes | None] = []
        self._ready = threading.Condition()
        connect = channel.stream_stream(
            "/gyoza.api.v1.AgentService/Connect",
            request_serializer=bytes.__call__,
            response_deserializer=agent_service_pb2.ConnectResponse.FromString,
        )
        self.call = connect(self._requests(), timeout=TIMEOUT_S)

    def _requests(self) -> Iterator[bytes]:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: bool(self._queue))
                item = self._queue.pop(0)
            if item is None:
                return
            yield item

    def send(self, data: bytes | Any) -> None:
        raw = data if isinstance(data, bytes) else data.SerializeToString()
        with self._ready:
            self._queue.append(raw)
            self._ready.notify()

    def next(self, kind: str) -> agent_service_pb2.ConnectResponse:
        for message in self.call:
            if message.WhichOneof("message") == kind:
                return message
        raise AssertionError(f"the stream ended before a {kind}")

    def close(self) -> None:
        self.send_end()
        self.call.cancel()

    def send_end(self) -> None:
        with self._ready:
            self._queue.append(None)
            self._ready.notify()


@pytest.fixture
def raw_stream(sqlite_server: Any) -> Iterator[Callable[[], RawStream]]:
    streams: list[RawStream] = []

    def open_stream() -> RawStream:
        stream = RawStream(sqlite_server.channel())
        streams.append(stream)
        return stream

    yield open_stream
    for stream in streams:
        stream.close()


def hello(name: str = "node-1", **capacity: Any) -> agent_service_pb2.ConnectRequest:
    return agent_service_pb2.ConnectRequest(
        hello=agent_service_pb2.Hello(
            agent_name=name, capacity=agent_pb2.Capacity(**capacity), version="test"
        )
    )


def _name_field(name: bytes) -> bytes:
    """A Hello whose agent_name is *name* as raw bytes (they may be bad UTF-8)."""
    inner = b"\x0a" + bytes([len(name)]) + name  # Hello.agent_name = 1
    return b"\x0a" + bytes([len(inner)]) + inner  # ConnectRequest.hello = 1


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, encoded by hand."""
    size = len(payload)
    varint = b""
    while True:
        byte, size = size & 0x7F, size >> 7
        varint += bytes([byte | (0x80 if size else 0)])
        if not size:
            break
    return bytes([number << 3 | 2]) + varint + payload


def _deep_report() -> bytes:
    """A ReportBatch whose event payload nests 200 Structs deep (written by hand: the
    protobuf runtime refuses to build it)."""
    value = _field(3, b"bottom")  # Value.string_value
    for _ in range(200):
        entry = _field(1, b"a") + _field(2, value)  # map entry: key, value
        value = _field(5, _field(1, entry))  # Value.struct_value{fields}
    payload = _field(1, _field(1, b"deep") + _field(2, value))
    event = b"\x08\x03" + _field(4, payload)  # type = INFO, payload
    report = _field(1, b"run_x") + b"\x10\x01\x18\x01" + _field(5, event)
    return _field(4, _field(1, report))  # ConnectRequest.reports{reports}


@pytest.mark.parametrize(
    "first",
    [GARBAGE, _name_field(b"bad \xc3\x28 utf-8")],
    ids=["garbage", "bad-utf8-name"],
)
def test_a_first_message_that_does_not_parse_is_invalid_argument(
    raw_stream: Callable[[], RawStream], expect_error: ExpectError, first: bytes
) -> None:
    stream = raw_stream()
    stream.send(first)
    error = expect_error(lambda: stream.next("welcome"))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")


@pytest.mark.parametrize("after", [GARBAGE, _deep_report()], ids=["garbage", "200-deep"])
def test_a_message_that_does_not_parse_after_hello_ends_the_stream_with_a_reason(
    raw_stream: Callable[[], RawStream], expect_error: ExpectError, after: bytes
) -> None:
    stream = raw_stream()
    stream.send(hello())
    stream.next("welcome")
    stream.send(after)
    error = expect_error(lambda: stream.next("welcome"))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")


def test_a_report_with_an_invalid_time_is_nacked_and_the_stream_goes_on(
    sqlite_server: Any, raw_stream: Callable[[], RawStream]
) -> None:
    stubs = sqlite_server.stubs()
    stream = raw_stream()
    stream.send(hello())
    stream.next("welcome")
    run = stubs.runs.CreateOpRun(pb.CreateOpRunRequest(image="busybox")).op_run
    assignment = stream.next("assignment").assignment
    assert assignment.run_id == run.id
    report = agent_service_pb2.Report(run_id=run.id, attempt=1, seq=1)
    report.event.type = resources_pb2.EVENT_TYPE_STARTED
    report.time.seconds = 253_402_300_800 * 10  # far past year 9999
    stream.send(
        agent_service_pb2.ConnectRequest(reports=agent_service_pb2.ReportBatch(reports=[report]))
    )
    nack = stream.next("nack").nack
    assert (nack.reason, nack.seq) == ("MALFORMED_REPORT", 1)
    # Still open: a heartbeat with an absurd capacity is refused on the same stream.
    stream.send(
        agent_service_pb2.ConnectRequest(
            heartbeat=agent_service_pb2.Heartbeat(capacity=agent_pb2.Capacity(cpu=-4))
        )
    )
    assert stream.next("nack").nack.reason == "INVALID_CAPACITY"
    agents = stubs.agents.ListAgents(agent_service_pb2.ListAgentsRequest()).agents
    assert [a.capacity.cpu for a in agents if a.name == "node-1"] == [0.0]


@pytest.mark.parametrize(
    "capacity",
    [
        {"cpu": -1.0},
        {"cpu": math.nan},
        {"cpu": math.inf},
        {"cpu": 1e18},
        {"ram_mb": -5},
        {
            "gpus": [
                agent_pb2.Gpu(index=i, vram_total_mb=81920, vram_free_mb=81920)
                for i in range(30_003)
            ]
        },
        {"gpus": [agent_pb2.Gpu(index=0, vram_total_mb=-1)]},
    ],
    ids=["negative-cpu", "nan-cpu", "inf-cpu", "absurd-cpu", "negative-ram", "30003-gpus", "vram"],
)
def test_absurd_capacities_are_refused_at_hello(
    sqlite_server: Any,
    raw_stream: Callable[[], RawStream],
    expect_error: ExpectError,
    capacity: dict[str, Any],
) -> None:
    stream = raw_stream()
    stream.send(hello(**capacity))
    error = expect_error(lambda: stream.next("welcome"))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    assert any(field.startswith("hello.capacity") for field in error.violations)
    agents = sqlite_server.stubs().agents.ListAgents(agent_service_pb2.ListAgentsRequest())
    assert list(agents.agents) == []


# -- listings under the message limit ----------------------------------------------------


def test_run_listings_stop_before_the_message_limit_and_page_on(sqlite_server: Any) -> None:
    stubs = sqlite_server.stubs()
    inputs = struct_pb2.Struct()
    inputs.update({"blob": "x" * (1000 * 1024)})
    created = {
        stubs.runs.CreateOpRun(pb.CreateOpRunRequest(image="busybox", inputs=inputs)).op_run.id
        for _ in range(5)
    }
    seen: list[str] = []
    token = ""
    while True:
        page = stubs.runs.ListOpRuns(pb.ListOpRunsRequest(page_size=50, page_token=token))
        assert page.ByteSize() < 4 * 1024 * 1024
        assert page.op_runs
        seen.extend(r.id for r in page.op_runs)
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(created)


def test_agent_listings_page_and_huge_labels_are_refused(
    sqlite_server: Any, raw_stream: Callable[[], RawStream], expect_error: ExpectError
) -> None:
    stubs = sqlite_server.stubs()
    huge = hello("labelled")
    huge.hello.labels.update({f"k{i}": "v" * 1000 for i in range(2500)})
    stream = raw_stream()
    stream.send(huge)
    error = expect_error(lambda: stream.next("welcome"))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")

    for name in ("a1", "a2", "a3"):
        live = raw_stream()
        live.send(hello(name))
        live.next("welcome")
    first = stubs.agents.ListAgents(agent_service_pb2.ListAgentsRequest(page_size=2))
    assert [a.name for a in first.agents] == ["a1", "a2"]
    rest = stubs.agents.ListAgents(
        agent_service_pb2.ListAgentsRequest(page_size=2, page_token=first.next_page_token)
    )
    assert [a.name for a in rest.agents] == ["a3"]
    assert rest.next_page_token == ""
