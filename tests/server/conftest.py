"""The real server for the server tests: a ``python -m gyoza.server`` process.

Each server listens on 127.0.0.1 with a port it picks itself (``--listen 127.0.0.1:0``;
the port is read from its "server listening" log line, so no race for a free port) and
stores into a fresh database: a SQLite file under the test's tmp_path, or a new
PostgreSQL database (``fresh_pg_database``) for the ``server`` fixture's postgres
variant. A fixture returns once the health service says SERVING.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from gyoza.api.v1 import (
    agent_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    definition_service_pb2_grpc,
    op_run_pb2,
    op_run_service_pb2_grpc,
)

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


@dataclass
class ServerProcess:
    """One running server process and what a test needs to talk to it."""

    database_url: str
    workdir: Path
    args: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    port: int = 0
    metrics_port: int | None = None
    _channels: list[grpc.Channel] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- life cycle -----------------------------------------------------------------

    def start(self) -> None:
        log = self.log_path.open("ab")
        try:
            self.popen = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gyoza.server",
                    "--listen",
                    "127.0.0.1:0",
                    *(["--database", self.database_url] if self.database_url else []),
                    *self.args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        finally:
            log.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        listening = None
        while listening is None:
            listening = next(
                (e for e in reversed(self.log_events()) if e.get("msg") == "server listening"),
                None,
            )
            self._check_alive(deadline)
            if listening is None:
                time.sleep(0.05)
        self.port = int(listening["port"])
        self.metrics_port = listening.get("metrics_port")
        if "--tls-cert" not in self.args:
            self.wait_serving(deadline)

    def wait_serving(self, deadline: float) -> None:
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                self._check_alive(deadline)
                time.sleep(0.05)

    def _check_alive(self, deadline: float) -> None:
        assert self.popen is not None
        if self.popen.poll() is not None:
            raise AssertionError(f"server exited with {self.popen.returncode}:\n{self.log_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"server did not start in time:\n{self.log_text()}")

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM the server and wait for it to exit; its exit status."""
        self.close_channels()
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(5)
            raise AssertionError(f"server ignored SIGTERM:\n{self.log_text()}") from None

    def close_channels(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()

    # -- talking to it --------------------------------------------------------------

    def channel(
        self,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> grpc.Channel:
        if credentials is None:
            channel = grpc.insecure_channel(self.address, options=list(options))
        else:
            channel = grpc.secure_channel(self.address, credentials, options=list(options))
        self._channels.append(channel)
        return channel

    def stubs(self, **kwargs: Any) -> Stubs:
        return Stubs(self.channel(**kwargs))

    # -- its log --------------------------------------------------------------------

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        """Every JSON line of the log (others, like tracebacks on a crash, are skipped)."""
        events = []
        for line in self.log_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events


class Stubs:
    """The gyoza stubs on one channel."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.definitions = definition_service_pb2_grpc.DefinitionServiceStub(channel)
        self.runs = op_run_service_pb2_grpc.OpRunServiceStub(channel)
        self.agents = agent_service_pb2_grpc.AgentServiceStub(channel)
        self.health = health_pb2_grpc.HealthStub(channel)


ServerFactory = Callable[..., ServerProcess]


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start servers: ``factory(database_url=None, args=(), env={})``; all stopped after.

    No URL means a SQLite file in tmp_path; ``""`` gives no ``--database`` flag at all
    (the server's default). The working directory is tmp_path.
    """
    started: list[ServerProcess] = []

    def start(
        database_url: str | None = None,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> ServerProcess:
        index = len(started)
        server = ServerProcess(
            database_url=(
                f"sqlite:///{tmp_path / 'gyoza.db'}" if database_url is None else database_url
            ),
            workdir=tmp_path,
            args=list(args),
            env=dict(env or {}),
            log_path=tmp_path / f"server-{index}.log",
        )
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        if server.popen is not None and server.popen.poll() is None:
            server.terminate()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database: a SQLite file, or a new PostgreSQL database."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("fresh_pg_database")
        return url
    return f"sqlite:///{tmp_path / 'gyoza.db'}"


@pytest.fixture
def server(server_factory: ServerFactory, database_url: str) -> ServerProcess:
    """An open server (no keys) on a fresh database; both SQLite and PostgreSQL."""
    return server_factory(database_url)


@pytest.fixture
def sqlite_server(server_factory: ServerFactory) -> ServerProcess:
    """An open server on a fresh SQLite file, for tests about the transport, not storage."""
    return server_factory()


@pytest.fixture
def stubs(server: ServerProcess) -> Stubs:
    return server.stubs()


# -- reading errors ------------------------------------------------------------------


@dataclass
class ErrorDetails:
    """What a failed call said: code, message, ErrorInfo and BadRequest violations."""

    code: grpc.StatusCode
    message: str
    reason: str
    metadata: dict[str, str]
    violations: dict[str, str]
    trailing: dict[str, str]


def error_details(error: grpc.RpcError) -> ErrorDetails:
    """Unpack the google.rpc.Status the server sent with a failed call."""
    assert isinstance(error, grpc.Call)
    status: status_pb2.Status | None = rpc_status.from_call(error)
    reason = ""
    metadata: dict[str, str] = {}
    violations: dict[str, str] = {}
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
                metadata = dict(info.metadata)
                assert info.domain == "gyoza"
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = {v.field: v.description for v in bad.field_violations}
    trailing = {k: v for k, v in (error.trailing_metadata() or ()) if isinstance(v, str)}
    return ErrorDetails(error.code(), error.details() or "", reason, metadata, violations, trailing)


def call_error(call: Callable[[], Any]) -> ErrorDetails:
    """Make a call that must fail; what it said."""
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        # A server stream fails only when read.
        if hasattr(result, "__iter__") and not isinstance(result, dict):
            for _ in result:
                pass
    return error_details(caught.value)


@pytest.fixture
def expect_error() -> Callable[[Callable[[], Any]], ErrorDetails]:
    """``expect_error(lambda: stub.Call(...))`` -> the call's ErrorDetails."""
    return call_error


# -- a scripted agent on the real stream ---------------------------------------------


class FakeAgent:
    """A minimal agent speaking AgentService.Connect from the test: no containers.

    It says Hello with the capacity given, then lets the test read what the server sends
    (assignments, cancels, acks) and send replies and numbered reports.
    """

    def __init__(
        self,
        channel: grpc.Channel,
        name: str,
        *,
        cpu: float = 64,
        ram_mb: int = 65536,
        metadata: Sequence[tuple[str, str]] = (),
        held: Sequence[agent_service_pb2.HeldAttempt] = (),
    ) -> None:
        self.name = name
        self._outbound: queue.Queue[agent_service_pb2.ConnectRequest | None] = queue.Queue()
        self._inbound: queue.Queue[agent_service_pb2.ConnectResponse | BaseException] = (
            queue.Queue()
        )
        self._seq: dict[tuple[str, int], int] = {}
        self._outbound.put(
            agent_service_pb2.ConnectRequest(
                hello=agent_service_pb2.Hello(
                    agent_name=name,
                    capacity=agent_pb2.Capacity(cpu=cpu, ram_mb=ram_mb),
                    version="test",
                    held=list(held),
                )
            )
        )
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        self.call = stub.Connect(self._requests(), metadata=list(metadata))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.welcome = self.receive("welcome").welcome

    def _requests(self) -> Iterator[agent_service_pb2.ConnectRequest]:
        while True:
            item = self._outbound.get()
            if item is None:
                return
            yield item

    def _read(self) -> None:
        try:
            for message in self.call:
                self._inbound.put(message)
        except BaseException as error:  # the stream's end, for receive() to raise
            self._inbound.put(error)
        else:
            self._inbound.put(EOFError("the server ended the agent stream"))

    def receive(self, kind: str, timeout: float = 10.0) -> agent_service_pb2.ConnectResponse:
        """The next message of *kind* (others, such as acks, are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"agent {self.name}: no {kind} within {timeout} s")
            try:
                message = self._inbound.get(timeout=left)
            except queue.Empty:
                continue
            if isinstance(message, BaseException):
                raise message
            if message.WhichOneof("message") == kind:
                return message

    def accept(self, assignment: agent_service_pb2.Assignment) -> None:
        self._outbound.put(
            agent_service_pb2.ConnectRequest(
                assignment_reply=agent_service_pb2.AssignmentReply(
                    run_id=assignment.run_id, attempt=assignment.attempt, accepted=True
                )
            )
        )

    def resume_from(self, run_id: str, attempt: int, seq: int) -> None:
        """Number this attempt's next report ``seq + 1`` (after a Welcome's resume)."""
        self._seq[(run_id, attempt)] = seq

    def _report(self, run_id: str, attempt: int, **body: Any) -> None:
        key = (run_id, attempt)
        self._seq[key] = self._seq.get(key, 0) + 1
        report = agent_service_pb2.Report(
            run_id=run_id, attempt=attempt, seq=self._seq[key], **body
        )
        report.time.GetCurrentTime()
        self._outbound.put(
            agent_service_pb2.ConnectRequest(
                reports=agent_service_pb2.ReportBatch(reports=[report])
            )
        )

    def event(self, run_id: str, attempt: int, event_type: int, **fields: Any) -> None:
        self._report(
            run_id, attempt, event=agent_service_pb2.ReportedEvent(type=event_type, **fields)
        )

    def logs(self, run_id: str, attempt: int, *lines: str) -> None:
        self._report(
            run_id,
            attempt,
            logs=agent_service_pb2.LogChunk(
                lines=[
                    agent_service_pb2.LogChunkLine(text=text, stream=op_run_pb2.LOG_STREAM_STDOUT)
                    for text in lines
                ]
            ),
        )

    def close(self) -> None:
        self._outbound.put(None)
        self.call.cancel()


@pytest.fixture
def fake_agent() -> Iterator[Callable[..., FakeAgent]]:
    """``fake_agent(channel, name, **capacity)`` -> a connected FakeAgent; closed after."""
    agents: list[FakeAgent] = []

    def connect(channel: grpc.Channel, name: str = "agent-1", **kwargs: Any) -> FakeAgent:
        agent = FakeAgent(channel, name, **kwargs)
        agents.append(agent)
        return agent

    yield connect
    for agent in agents:
        agent.close()
