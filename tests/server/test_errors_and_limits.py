"""Size limits, request ids, and the error interceptor's handling of the unexpected."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import struct_pb2

from gyoza.api.v1 import op_run_service_pb2 as pb
from gyoza.models.errors import FieldViolation, InvalidInput, OpRunLockedException
from gyoza.server.calls import CallInterceptor
from gyoza.server.errors import ErrorInterceptor

ExpectError = Callable[[Callable[[], Any]], Any]


def inputs_of(size: int) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update({"blob": "x" * size})
    return message


def test_message_over_the_size_limit_is_refused_and_the_server_stays_up(
    sqlite_server: Any, expect_error: ExpectError
) -> None:
    stubs = sqlite_server.stubs()
    huge = expect_error(
        lambda: stubs.runs.CreateOpRun(
            pb.CreateOpRunRequest(image="busybox", inputs=inputs_of(5 * 1024 * 1024))
        )
    )
    assert huge.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stubs.runs.CreateOpRun(pb.CreateOpRunRequest(image="busybox")).op_run.id


def test_inputs_over_the_json_limit_are_refused_with_a_reason(
    sqlite_server: Any, expect_error: ExpectError
) -> None:
    stubs = sqlite_server.stubs()
    big = expect_error(
        lambda: stubs.runs.CreateOpRun(
            pb.CreateOpRunRequest(image="busybox", inputs=inputs_of(1536 * 1024))
        )
    )
    assert big.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert big.reason == "PAYLOAD_TOO_LARGE"
    assert big.metadata["field"] == "inputs"
    assert int(big.metadata["limit_bytes"]) == 1024 * 1024
    # Just under the limit is fine.
    assert stubs.runs.CreateOpRun(
        pb.CreateOpRunRequest(image="busybox", inputs=inputs_of(1000 * 1024))
    ).op_run.id


def test_request_id_is_returned_and_logged(sqlite_server: Any, expect_error: ExpectError) -> None:
    stubs = sqlite_server.stubs()
    reply, call = stubs.runs.CreateOpRun.with_call(
        pb.CreateOpRunRequest(image="busybox"), metadata=[("x-request-id", "req-abc-1")]
    )
    assert dict(call.trailing_metadata())["x-request-id"] == "req-abc-1"
    _, call = stubs.runs.GetOpRun.with_call(pb.GetOpRunRequest(run_id=reply.op_run.id))
    generated = dict(call.trailing_metadata())["x-request-id"]
    assert len(generated) == 32
    failed = expect_error(
        lambda: stubs.runs.GetOpRun(
            pb.GetOpRunRequest(run_id="run_000000000000"), metadata=[("x-request-id", "req-nf")]
        )
    )
    assert failed.trailing["x-request-id"] == "req-nf"

    # The access line is written as the call ends, which may be just after the client
    # has its answer: wait (bounded) for the server to have written both lines.
    def rpc_lines() -> list[dict[str, Any]]:
        return [e for e in sqlite_server.log_events() if e.get("msg") == "rpc"]

    deadline = time.monotonic() + 10
    while not {"req-abc-1", "req-nf"} <= {e.get("request_id") for e in rpc_lines()}:
        assert time.monotonic() < deadline, "the access log lines never appeared"
        time.sleep(0.05)
    lines = rpc_lines()
    created = [e for e in lines if e.get("request_id") == "req-abc-1"]
    assert created and created[0]["method"] == "/gyoza.api.v1.OpRunService/CreateOpRun"
    assert created[0]["code"] == "OK"
    assert any(e.get("request_id") == "req-nf" and e["code"] == "NOT_FOUND" for e in lines)
    # Every complete line of the log is one JSON object.
    text = sqlite_server.log_text()
    complete = text[: text.rfind("\n") + 1].splitlines()
    assert all(json.loads(line) for line in complete)


# -- the interceptor on a server of handlers that fail --------------------------------


class _Failing:
    """Handlers that raise what the test names, to see what the interceptor makes of it."""

    async def unary(self, request: bytes, context: Any) -> bytes:
        raise _ERRORS[request.decode()]

    async def stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        yield b"first"
        raise _ERRORS[request.decode()]


_ERRORS: dict[str, BaseException] = {
    "boom": RuntimeError("secret internals"),
    "invalid": InvalidInput([FieldViolation("a", "bad"), FieldViolation("b", "worse")]),
    "locked": OpRunLockedException("terminal"),
    "value": ValueError("bad value"),
    "unimplemented": NotImplementedError("Method not implemented!"),
}


@pytest.fixture
def failing_server() -> Iterator[str]:
    """An in-process grpc.aio server with the call and error interceptors; its address."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def run() -> None:
        server = grpc.aio.server(interceptors=[CallInterceptor(), ErrorInterceptor()])
        handlers = _Failing()
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "test.Failing",
                    {
                        "Unary": grpc.unary_unary_rpc_method_handler(handlers.unary),
                        "Stream": grpc.unary_stream_rpc_method_handler(handlers.stream),
                    },
                )
            ]
        )
        holder["port"] = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        holder["stop"] = asyncio.Event()
        ready.set()
        await holder["stop"].wait()
        await server.stop(None)

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    yield f"127.0.0.1:{holder['port']}"
    loop.call_soon_threadsafe(holder["stop"].set)
    thread.join(10)
    loop.close()


def test_unexpected_errors_are_internal_with_the_request_id(
    failing_server: str, expect_error: ExpectError, caplog: pytest.LogCaptureFixture
) -> None:
    with grpc.insecure_channel(failing_server) as channel:
        unary = channel.unary_unary("/test.Failing/Unary")
        stream = channel.unary_stream("/test.Failing/Stream")
        with caplog.at_level(logging.ERROR, logger="gyoza.server.errors"):
            boom = expect_error(lambda: unary(b"boom", metadata=[("x-request-id", "rid-9")]))
        assert boom.code == grpc.StatusCode.INTERNAL
        assert boom.reason == "INTERNAL"
        assert "rid-9" in boom.message
        assert "secret" not in boom.message
        assert boom.trailing["x-request-id"] == "rid-9"
        assert any("unexpected error" in r.getMessage() and r.exc_info for r in caplog.records)

        invalid = expect_error(lambda: unary(b"invalid"))
        assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT
        assert invalid.violations == {"a": "bad", "b": "worse"}
        locked = expect_error(lambda: unary(b"locked"))
        assert (locked.code, locked.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RUN_LOCKED")
        value = expect_error(lambda: unary(b"value"))
        assert value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert value.reason == "INVALID_ARGUMENT"
        unimplemented = expect_error(lambda: unary(b"unimplemented"))
        assert unimplemented.code == grpc.StatusCode.UNIMPLEMENTED

        # A stream that fails midway: what was sent arrives, then the mapped status.
        responses = stream(b"locked")
        assert next(responses) == b"first"
        with pytest.raises(grpc.RpcError) as caught:
            next(responses)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
        failed = expect_error(lambda: list(stream(b"boom")))
        assert failed.code == grpc.StatusCode.INTERNAL

        # The server is still serving.
        again = expect_error(lambda: unary(b"value"))
        assert again.code == grpc.StatusCode.INVALID_ARGUMENT
