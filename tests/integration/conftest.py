"""A real gyoza cluster for integration tests: the server and agents as processes.

Everything talks over 127.0.0.1. Agents use the scripted executor and declare their GPU
inventory by flag (there is no GPU here). Lease and grace are shortened by environment
so that loss and recovery happen within a test's time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gyoza.api.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    op_run_pb2,
    op_run_service_pb2,
    op_run_service_pb2_grpc,
    resources_pb2,
)

GYOZA = str(Path(sys.executable).with_name("gyoza"))
TERMINAL = {
    resources_pb2.OP_RUN_STATE_COMPLETED,
    resources_pb2.OP_RUN_STATE_FAILED,
    resources_pb2.OP_RUN_STATE_CANCELLED,
}
#: Protocol timing for tests: a lost agent fails its runs after about 2 s.
TIMING = {
    "GYOZA_HEARTBEAT_INTERVAL_S": "0.3",
    "GYOZA_LEASE_TIMEOUT_S": "1.0",
    "GYOZA_GRACE_S": "1.0",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """A gyoza process with its log file."""

    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()

    def kill9(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


class Cluster:
    """One server and any number of agents on 127.0.0.1."""

    def __init__(self, tmp: Path, server_args: tuple[str, ...] = (), **timing: str) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.database = f"sqlite:///{tmp / 'gyoza.db'}"
        self.server = Proc(
            "server",
            [GYOZA, "server", "--listen", self.address, "--database", self.database, *server_args],
            tmp / "server.log",
            env={**TIMING, **timing},
        )
        self.agents: dict[str, Proc] = {}
        self.channel = grpc.insecure_channel(self.address)
        self.runs = op_run_service_pb2_grpc.OpRunServiceStub(self.channel)
        self.fleet = agent_service_pb2_grpc.AgentServiceStub(self.channel)

    # -- processes --------------------------------------------------------
    def start_server(self) -> None:
        self.server.start()
        health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + 30
        while True:
            try:
                reply = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if self.server.popen is not None and self.server.popen.poll() is not None:
                raise AssertionError(f"server exited:\n{self.server.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"server not serving:\n{self.server.log()}")
            time.sleep(0.05)

    def add_agent(
        self,
        name: str,
        gpus: str = "",
        start: bool = True,
        executor: str = "scripted",
        extra: tuple[str, ...] = (),
    ) -> Proc:
        args = [
            GYOZA, "agent",
            "--server", self.address,
            "--name", name,
            "--executor", executor,
            "--state-dir", str(self.tmp / f"agent-{name}"),
        ]  # fmt: skip
        if gpus:
            args += ["--gpus", gpus]
        args += extra
        proc = Proc(name, args, self.tmp / f"agent-{name}.log", env=dict(TIMING))
        self.agents[name] = proc
        if start:
            proc.start()
            self.wait_agents({name})
        return proc

    def wait_agents(self, names: set[str], timeout: float = 30) -> None:
        """Wait until these agents have live sessions."""
        self.wait_until(
            lambda: names <= {a.name for a in self.list_agents() if a.state in _LIVE},
            timeout,
            f"agents {sorted(names)} connected",
        )

    def close(self) -> None:
        self.channel.close()
        for proc in [*self.agents.values(), self.server]:
            proc.stop()

    # -- API --------------------------------------------------------------
    def create(
        self,
        *,
        priority: int = 0,
        sleep_ms: int = 0,
        progress_steps: int = 3,
        exit_code: int = 0,
        outputs: dict[str, object] | None = None,
        max_attempts: int = 1,
        retry_on: tuple[int, ...] = (),
        **constraints: Any,
    ) -> op_run_pb2.OpRun:
        inputs = struct_pb2.Struct()
        inputs.update(
            {
                "sleep_ms": sleep_ms,
                "progress_steps": progress_steps,
                "exit_code": exit_code,
                "outputs": outputs or {},
            }
        )
        request = op_run_service_pb2.CreateOpRunRequest(
            image="scripted",
            inputs=inputs,
            priority=priority,
            constraints=resources_pb2.Constraints(**constraints),
            retry_policy=resources_pb2.RetryPolicy(
                max_attempts=max_attempts,
                initial_delay_seconds=0.05,
                backoff_multiplier=1.0,
                max_delay_seconds=0.05,
                retry_on=retry_on,
            ),
        )
        return self.runs.CreateOpRun(request, timeout=10).op_run

    def get(self, run_id: str) -> op_run_pb2.OpRun:
        return self.runs.GetOpRun(
            op_run_service_pb2.GetOpRunRequest(run_id=run_id), timeout=10
        ).op_run

    def attempts(self, run_id: str) -> list[op_run_pb2.OpAttempt]:
        reply = self.runs.ListOpRunAttempts(
            op_run_service_pb2.ListOpRunAttemptsRequest(run_id=run_id), timeout=10
        )
        return list(reply.attempts)

    def list_agents(self) -> list[agent_service_pb2.ListAgentsResponse]:
        reply = self.fleet.ListAgents(agent_service_pb2.ListAgentsRequest(), timeout=10)
        return list(reply.agents)

    def watch_until(
        self,
        run_id: str,
        done: Callable[[op_run_pb2.OpRun], bool],
        timeout: float = 30,
    ) -> op_run_pb2.OpRun:
        """Follow WatchOpRun until ``done(run)``; reconnects if the server restarts."""
        deadline = time.monotonic() + timeout
        last: op_run_pb2.OpRun | None = None
        while time.monotonic() < deadline:
            try:
                stream = self.runs.WatchOpRun(
                    op_run_service_pb2.WatchOpRunRequest(run_id=run_id),
                    timeout=max(deadline - time.monotonic(), 0.1),
                )
                for change in stream:
                    last = change.op_run
                    if done(last):
                        stream.cancel()
                        return last
                if last is not None and last.state in TERMINAL:
                    raise AssertionError(f"run ended without the awaited change: {last}")
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    raise
                time.sleep(0.1)  # the server is restarting
        raise AssertionError(f"timed out waiting on {run_id}; last seen: {last}")

    def wait_until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        """Re-check a condition that no stream announces (bounded)."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)


_LIVE = {1, 2}  # AGENT_STATE_CONNECTED, AGENT_STATE_DRAINING


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    c.start_server()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def patient_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster whose lost agents get a long grace period (restarts land within it)."""
    c = Cluster(tmp_path, GYOZA_GRACE_S="20")
    c.start_server()
    try:
        yield c
    finally:
        c.close()


def state(run: op_run_pb2.OpRun) -> str:
    return resources_pb2.OpRunState.Name(run.state).removeprefix("OP_RUN_STATE_")


def event_types(events: list[op_run_pb2.OpRunEvent]) -> list[str]:
    return [resources_pb2.EventType.Name(e.type).removeprefix("EVENT_TYPE_") for e in events]
