"""Typed client errors and the CLI's exit codes.

A small in-process gRPC server answers with rich statuses (ErrorInfo, BadRequest), so
the client's decoding and the CLI's exit codes are checked without the real server;
tests/cli/test_cli_e2e.py runs the same paths against it.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from click.testing import CliRunner
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from gyoza import mapping
from gyoza.api.v1 import op_run_service_pb2, op_run_service_pb2_grpc
from gyoza.cli.context import describe_client_error
from gyoza.cli.exit_codes import ExitCode, exit_code_for_run, exit_code_for_status
from gyoza.cli.main import cli
from gyoza.client import (
    Client,
    FailedPreconditionError,
    GyozaClientError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from gyoza.models.errors import FieldViolation
from gyoza.models.op_run import OpRun
from gyoza.models.resources import OpRunState

API_KEY = "good-key"
RUN = OpRun.create(image="busybox", inputs={"n": 1})


def _abort(
    context: grpc.ServicerContext,
    code: int,
    message: str,
    reason: str | None = None,
    violations: list[tuple[str, str]] | None = None,
) -> None:
    details: list[any_pb2.Any] = []
    if reason is not None:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="gyoza", metadata={"k": "v"}))
        details.append(info)
    if violations:
        bad = any_pb2.Any()
        bad.Pack(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in violations
                ]
            )
        )
        details.append(bad)
    status = status_pb2.Status(code=code, message=message, details=details)
    context.abort_with_status(rpc_status.to_status(status))


class RunServicer(op_run_service_pb2_grpc.OpRunServiceServicer):
    """Answers GetOpRun for RUN.id; refuses everything else in a known way."""

    def _check_key(self, context: grpc.ServicerContext) -> None:
        if ("authorization", f"Bearer {API_KEY}") not in context.invocation_metadata():
            _abort(context, code_pb2.UNAUTHENTICATED, "unknown API key", "UNAUTHENTICATED")

    def GetOpRun(
        self, request: op_run_service_pb2.GetOpRunRequest, context: grpc.ServicerContext
    ) -> op_run_service_pb2.GetOpRunResponse:
        self._check_key(context)
        if request.run_id != RUN.id:
            _abort(context, code_pb2.NOT_FOUND, f"run {request.run_id} does not exist", "NOT_FOUND")
        return op_run_service_pb2.GetOpRunResponse(op_run=mapping.run_to_proto(RUN))

    def CreateOpRun(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check_key(context)
        _abort(
            context,
            code_pb2.INVALID_ARGUMENT,
            "invalid input",
            "INVALID_INPUT",
            [("inputs.steps", "expected INT, got STRING"), ("priority", "must be >= 0")],
        )

    def CancelOpRun(self, request: Any, context: grpc.ServicerContext) -> Any:
        self._check_key(context)
        _abort(context, code_pb2.FAILED_PRECONDITION, "run is COMPLETED", "RUN_LOCKED")

    def RetryOpRun(self, request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "not yours")  # no details

    def WatchOpRun(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self._check_key(context)
        yield op_run_service_pb2.WatchOpRunResponse(sequence=0, op_run=mapping.run_to_proto(RUN))
        _abort(context, code_pb2.INTERNAL, "store failed")


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = RunServicer()  # type: ignore[abstract]  # the other methods: UNIMPLEMENTED
    op_run_service_pb2_grpc.add_OpRunServiceServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        grpc_server.stop(None).wait()


@pytest.fixture
def client(server: str) -> Iterator[Client]:
    with Client(server, api_key=API_KEY, timeout=10) as c:
        yield c


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# --- exit codes -------------------------------------------------------------------------


def test_every_status_code_has_an_exit_code() -> None:
    expected = {
        grpc.StatusCode.INVALID_ARGUMENT: ExitCode.USAGE,
        grpc.StatusCode.NOT_FOUND: ExitCode.USAGE,
        grpc.StatusCode.ALREADY_EXISTS: ExitCode.USAGE,
        grpc.StatusCode.FAILED_PRECONDITION: ExitCode.USAGE,
        grpc.StatusCode.OUT_OF_RANGE: ExitCode.USAGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED: ExitCode.USAGE,
        grpc.StatusCode.UNAVAILABLE: ExitCode.UNREACHABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED: ExitCode.UNREACHABLE,
        grpc.StatusCode.UNAUTHENTICATED: ExitCode.UNREACHABLE,
        grpc.StatusCode.PERMISSION_DENIED: ExitCode.UNREACHABLE,
    }
    for code in grpc.StatusCode:
        assert exit_code_for_status(code) == expected.get(code, ExitCode.RUN_FAILED), code
    assert (ExitCode.OK, ExitCode.RUN_FAILED, ExitCode.USAGE, ExitCode.UNREACHABLE) == (0, 1, 2, 3)


def test_exit_code_of_a_run_outcome() -> None:
    assert exit_code_for_run(OpRunState.COMPLETED) == ExitCode.OK
    for state in (OpRunState.FAILED, OpRunState.CANCELLED):
        assert exit_code_for_run(state) == ExitCode.RUN_FAILED


def test_describe_client_error() -> None:
    unavailable = UnavailableError(grpc.StatusCode.UNAVAILABLE, "connection refused")
    assert describe_client_error(unavailable, "h:1") == (
        "cannot reach the gyoza server at h:1: connection refused"
    )
    locked = FailedPreconditionError(
        grpc.StatusCode.FAILED_PRECONDITION, "run is COMPLETED", reason="RUN_LOCKED"
    )
    assert (
        describe_client_error(locked, "h:1") == "failed precondition: run is COMPLETED [RUN_LOCKED]"
    )


# --- typed client errors ----------------------------------------------------------------


def test_get_run_returns_the_domain_run(client: Client) -> None:
    run = client.get_run(RUN.id)
    assert isinstance(run, OpRun)
    assert run.id == RUN.id
    assert run.inputs == {"n": 1}


def test_not_found_carries_code_reason_message_and_metadata(client: Client) -> None:
    with pytest.raises(NotFoundError) as error:
        client.get_run("run_missing")
    assert error.value.code is grpc.StatusCode.NOT_FOUND
    assert error.value.reason == "NOT_FOUND"
    assert error.value.message == "run run_missing does not exist"
    assert error.value.metadata == {"k": "v"}
    assert str(error.value) == "run run_missing does not exist"


def test_invalid_argument_carries_the_field_violations(client: Client) -> None:
    with pytest.raises(InvalidArgumentError) as error:
        client.create_run(image="busybox", inputs={"steps": "x"})
    assert error.value.reason == "INVALID_INPUT"
    assert error.value.violations == [
        FieldViolation("inputs.steps", "expected INT, got STRING"),
        FieldViolation("priority", "must be >= 0"),
    ]
    assert str(error.value) == (
        "invalid input (inputs.steps: expected INT, got STRING; priority: must be >= 0)"
    )


def test_failed_precondition_and_a_status_without_details(client: Client) -> None:
    with pytest.raises(FailedPreconditionError) as locked:
        client.cancel_run(RUN.id)
    assert locked.value.reason == "RUN_LOCKED"
    with pytest.raises(PermissionDeniedError) as denied:
        client.retry_run(RUN.id)
    assert denied.value.reason is None
    assert denied.value.message == "not yours"


def test_api_key_is_sent_as_bearer_metadata(server: str) -> None:
    with Client(server, api_key="wrong") as wrong, pytest.raises(UnauthenticatedError):
        wrong.get_run(RUN.id)
    with Client(server) as anonymous, pytest.raises(UnauthenticatedError):
        anonymous.get_run(RUN.id)


def test_error_in_the_middle_of_a_stream_is_typed(client: Client) -> None:
    changes = client.watch_run(RUN.id)
    sequence, run, event = next(changes)
    assert (sequence, run.id, event) == (0, RUN.id, None)
    with pytest.raises(GyozaClientError) as error:
        next(changes)
    assert error.value.code is grpc.StatusCode.INTERNAL
    assert type(error.value) is GyozaClientError


def test_unreachable_server_is_unavailable() -> None:
    with (
        Client(f"127.0.0.1:{unused_port()}", timeout=5) as client,
        pytest.raises(UnavailableError),
    ):
        client.get_run("run_x")


def test_client_certificate_needs_its_key() -> None:
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        Client("127.0.0.1:1", tls_cert="cert.pem")


# --- the CLI's exit codes and messages --------------------------------------------------


def gyoza(*args: str) -> Any:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def test_cli_success_prints_json(server: str) -> None:
    result = gyoza("--server", server, "--api-key", API_KEY, "runs", "get", RUN.id, "-o", "json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["op_run"]["id"] == RUN.id


def test_cli_connection_options_also_follow_the_command(server: str) -> None:
    result = gyoza("runs", "get", RUN.id, "--server", server, "--api-key", API_KEY, "-o", "json")
    assert result.exit_code == 0, result.stderr


def test_cli_not_found_exits_2_with_one_line(server: str) -> None:
    result = gyoza("--server", server, "--api-key", API_KEY, "runs", "get", "run_missing")
    assert result.exit_code == 2
    assert result.stderr == "gyoza: not found: run run_missing does not exist [NOT_FOUND]\n"
    assert result.stdout == ""


def test_cli_invalid_argument_exits_2_naming_the_fields(server: str) -> None:
    result = gyoza("--server", server, "--api-key", API_KEY, "runs", "create", "--image", "x")
    assert result.exit_code == 2
    assert "inputs.steps: expected INT, got STRING" in result.stderr
    assert result.stderr.count("\n") == 1


def test_cli_failed_precondition_exits_2(server: str) -> None:
    result = gyoza("--server", server, "--api-key", API_KEY, "runs", "cancel", RUN.id)
    assert result.exit_code == 2
    assert "[RUN_LOCKED]" in result.stderr


def test_cli_refused_credentials_exit_3(server: str) -> None:
    result = gyoza("--server", server, "--api-key", "wrong", "runs", "get", RUN.id)
    assert result.exit_code == 3
    assert result.stderr.startswith(f"gyoza: the gyoza server at {server} refused the credentials")
    result = gyoza("--server", server, "--api-key", API_KEY, "runs", "retry", RUN.id)
    assert result.exit_code == 3


def test_cli_unreachable_server_exits_3() -> None:
    address = f"127.0.0.1:{unused_port()}"
    result = gyoza("--server", address, "runs", "list")
    assert result.exit_code == 3
    assert result.stderr.startswith(f"gyoza: cannot reach the gyoza server at {address}:")
    assert "Traceback" not in result.stderr


def test_cli_internal_error_in_a_watch_exits_1(server: str) -> None:
    result = gyoza("--server", server, "--api-key", API_KEY, "runs", "watch", RUN.id, "-o", "json")
    assert result.exit_code == 1
    assert result.stderr == "gyoza: internal: store failed\n"
    assert json.loads(result.stdout.splitlines()[0])["op_run"]["id"] == RUN.id


def test_cli_usage_errors_exit_2() -> None:
    assert gyoza("runs", "create").exit_code == 2
    both = gyoza("runs", "create", "--image", "x", "--definition", "y")
    assert both.exit_code == 2
    assert both.stderr == "gyoza: give either --definition NAME or --image IMAGE\n"
    assert gyoza("runs", "list", "--state", "SLEEPING").exit_code == 2
    assert gyoza("runs", "priority", "run_x", "-1").exit_code == 2


def test_cli_bad_input_exits_2_before_calling_the_server() -> None:
    address = f"127.0.0.1:{unused_port()}"  # nothing listens: the input is refused first
    result = gyoza("--server", address, "runs", "create", "--image", "x", "--input", "oops")
    assert result.exit_code == 2
    assert result.stderr == "gyoza: --input 'oops': expected KEY=VALUE\n"
