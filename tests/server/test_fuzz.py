"""Fuzzing every RPC of the real server: whatever a request holds, the answer is never
UNKNOWN or INTERNAL, and the server keeps serving.

Requests are built by hypothesis from each method's message descriptor: every field
drawn from its type, with the values that break things mixed in (extreme integers,
NaN and infinities, long and non-ASCII strings, timestamps out of range, deep JSON),
plus raw bytes. Derandomized and bounded (a few hundred calls in all) so that CI runs
the same cases in a bounded time.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor, message_factory
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gyoza.api.v1 import (
    agent_service_pb2,
    definition_service_pb2,
    op_run_service_pb2,
)

pytestmark = pytest.mark.timeout(600)

CALL_TIMEOUT_S = 2.0
STREAM_TIMEOUT_S = 0.4
"""Streams that follow (watches, subscriptions, agent sessions) end at this deadline."""
STREAM_READS = 5
BROKEN = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}

FD = descriptor.FieldDescriptor
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)

# Values known to exist on the server (set by the fixture), so that some requests get
# past "not found" into the code behind it.
KNOWN_STRINGS: list[str] = []


def methods() -> list[tuple[str, Any]]:
    found = []
    for module in (agent_service_pb2, definition_service_pb2, op_run_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found.append((f"/{service.full_name}/{method.name}", method))
    return found


def _int(bounds: tuple[int, int]) -> st.SearchStrategy[int]:
    low, high = bounds
    edges = [0, 1, -1, 2, low, high, high - 1, 1000, 10**6]
    return st.one_of(
        st.sampled_from([e for e in edges if low <= e <= high]), st.integers(low, high)
    )


def _strings() -> st.SearchStrategy[str]:
    special = ["", " ", "a" * 5000, "é" * 3000, "\x00", "run_x", "*", "%s", "../..", "名前"]
    return st.one_of(
        st.sampled_from(special),
        st.text(max_size=40),
        st.deferred(lambda: st.sampled_from(KNOWN_STRINGS or ["none"])),
    )


_json: st.SearchStrategy[Any] = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def _well_known(message_descriptor: Any) -> st.SearchStrategy[Any] | None:
    name = message_descriptor.full_name
    cls = message_factory.GetMessageClass(message_descriptor)
    if name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):

        def build(values: tuple[int, int]) -> Any:
            return cls(seconds=values[0], nanos=values[1])

        seconds = st.one_of(
            st.sampled_from([0, -62_135_596_801, 253_402_300_800, 1_800_000_000]),
            st.integers(*INT64),
        )
        return st.tuples(seconds, _int(INT32)).map(build)
    if name == "google.protobuf.Struct":

        def struct(values: dict[str, Any]) -> Any:
            message = cls()
            message.update(values)
            return message

        return st.dictionaries(st.text(max_size=10), _json, max_size=5).map(struct)
    if name in ("google.protobuf.Value", "google.protobuf.ListValue"):
        return st.just(cls())
    return None


def _field_value(field: Any, depth: int) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind == FD.TYPE_MESSAGE:
        return message_strategy(field.message_type, depth + 1)
    if kind == FD.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), _int(INT32))
    if kind in (FD.TYPE_INT32, FD.TYPE_SINT32, FD.TYPE_SFIXED32):
        return _int(INT32)
    if kind in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return _int(INT64)
    if kind in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return _int((0, 2**32 - 1))
    if kind in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return _int((0, 2**64 - 1))
    if kind in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        width = 32 if kind == FD.TYPE_FLOAT else 64
        return st.one_of(
            st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 1e18, 0.0]),
            st.floats(width=width),
        )
    if kind == FD.TYPE_BOOL:
        return st.booleans()
    if kind == FD.TYPE_BYTES:
        return st.binary(max_size=16)
    return _strings()


def message_strategy(message_descriptor: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of this type with any subset of their fields set, nested a few deep."""
    cls = message_factory.GetMessageClass(message_descriptor)
    special = _well_known(message_descriptor)
    if special is not None:
        return special
    if depth > 3:
        return st.just(cls())
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for field in message_descriptor.fields:
        value = _field_value(field, depth)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field, value_field = field.message_type.fields
            optional[field.name] = st.dictionaries(
                _field_value(key_field, depth),
                _field_value(value_field, depth),
                max_size=3,
            )
        elif field.is_repeated:
            optional[field.name] = st.lists(value, max_size=3)
        else:
            optional[field.name] = value

    def build(values: dict[str, Any]) -> Any:
        message = cls()
        for name, value in values.items():
            field = message_descriptor.fields_by_name[name]
            target = getattr(message, name) if field.is_repeated else None
            if isinstance(value, dict):
                for k, v in value.items():
                    if field.message_type.fields_by_name["value"].message_type is not None:
                        target[k].CopyFrom(v)  # type: ignore[index]
                    else:
                        target[k] = v  # type: ignore[index]
            elif isinstance(value, list):
                for item in value:
                    if field.message_type is not None:
                        target.add().CopyFrom(item)  # type: ignore[union-attr]
                    else:
                        target.append(item)  # type: ignore[union-attr]
            elif field.message_type is not None:
                getattr(message, name).CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries({}, optional=optional).map(build)  # type: ignore[arg-type]


def call(channel: grpc.Channel, name: str, method: Any, requests: list[bytes]) -> None:
    """Make the call with these request bytes; an error it answers must be a clear one."""
    raw = bytes.__call__
    try:
        if method.client_streaming:
            stream = channel.stream_stream(name, request_serializer=raw)
            responses: Iterator[Any] = stream(iter(requests), timeout=STREAM_TIMEOUT_S)
            for _, _response in zip(range(STREAM_READS), responses, strict=False):
                pass
        elif method.server_streaming:
            stream_call = channel.unary_stream(name, request_serializer=raw)
            responses = stream_call(requests[0], timeout=STREAM_TIMEOUT_S)
            for _, _response in zip(range(STREAM_READS), responses, strict=False):
                pass
            responses.cancel()  # type: ignore[attr-defined]
        else:
            channel.unary_unary(name, request_serializer=raw)(requests[0], timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        code = error.code()  # type: ignore[attr-defined]
        assert code not in BROKEN, f"{name}: {code.name}: {error.details()}"  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One server for the whole fuzz run, with a run and a definition to find."""
    import tests.server.conftest as server_conftest

    tmp = tmp_path_factory.mktemp("fuzz")
    server = server_conftest.ServerProcess(
        database_url=f"sqlite:///{tmp / 'gyoza.db'}",
        workdir=tmp,
        args=[],
        env={},
        log_path=tmp / "server.log",
    )
    server.start()
    stubs = server.stubs()
    run = stubs.runs.CreateOpRun(op_run_service_pb2.CreateOpRunRequest(image="busybox")).op_run
    KNOWN_STRINGS.extend([run.id, "busybox"])
    yield server
    server.terminate()


def _check_serving(server: Any) -> None:
    stubs = server.stubs()
    assert stubs.health.Check(health_pb2.HealthCheckRequest()).status == 1
    errors = [e for e in server.log_events() if e.get("level") in ("error", "critical")]
    assert errors == [], errors[:3]


# GYOZA_FUZZ_EXAMPLES=500 for a longer, randomized local run; CI runs the bounded,
# derandomized default.
EXAMPLES = int(os.environ.get("GYOZA_FUZZ_EXAMPLES", "14"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # a loaded machine: no per-example time limit
    derandomize="GYOZA_FUZZ_EXAMPLES" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.parametrize(("name", "method"), [pytest.param(n, m, id=m.name) for n, m in methods()])
def test_no_request_gets_unknown_or_internal(fuzzed_server: Any, name: str, method: Any) -> None:
    channel = fuzzed_server.channel()
    requests = message_strategy(method.input_type)
    many = st.lists(requests, min_size=1, max_size=3) if method.client_streaming else None

    @FUZZ
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        if data.draw(st.integers(0, 4)) == 0:
            payloads = [data.draw(st.binary(max_size=64))]
        elif many is not None:
            payloads = [m.SerializeToString() for m in data.draw(many)]
        else:
            payloads = [data.draw(requests).SerializeToString()]
        call(channel, name, method, payloads)

    fuzz()
    _check_serving(fuzzed_server)
