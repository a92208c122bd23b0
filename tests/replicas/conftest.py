"""Several ``gyoza server`` replicas on one real PostgreSQL database, with real agents.

Every replica and agent is a process on 127.0.0.1. Agents get the addresses of all
replicas (``--server a,b,c``) and use the scripted executor. The leadership lease and
the agent protocol are shortened by environment so that takeovers and losses happen
within a test's time. Which replica leads is read from the database's leadership row.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
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
from tests.integration.conftest import GYOZA, TERMINAL, Proc, free_port

LEADER_LEASE_S = 2.0
#: Agents: heartbeat 0.3 s; a silent agent is lost after lease + grace = 6 s, which
#: leaves room for a takeover (within the leader lease) and a reconnect.
TIMING = {
    "GYOZA_HEARTBEAT_INTERVAL_S": "0.3",
    "GYOZA_LEASE_TIMEOUT_S": "3.0",
    "GYOZA_GRACE_S": "3.0",
    "GYOZA_LEADER_LEASE_S": str(LEADER_LEASE_S),
}
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


class Replica:
    """One server replica process and its stubs."""

    def __init__(
        self, index: int, tmp: Path, database: str, timing: dict[str, str] | None = None
    ) -> None:
        self.index = index
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.replica_id = f"replica-{index}"
        self.proc = Proc(
            self.replica_id,
            [GYOZA, "server", "--listen", self.address, "--database", database],
            tmp / f"{self.replica_id}.log",
            env={**(timing or TIMING), "GYOZA_REPLICA_ID": self.replica_id},
        )
        self.channel = grpc.insecure_channel(self.address)
        self.runs = op_run_service_pb2_grpc.OpRunServiceStub(self.channel)
        self.fleet = agent_service_pb2_grpc.AgentServiceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def alive(self) -> bool:
        return self.proc.popen is not None and self.proc.popen.poll() is None

    def serving(self) -> bool:
        try:
            reply = self.health.Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    def signal(self, signum: signal.Signals) -> None:
        assert self.proc.popen is not None
        self.proc.popen.send_signal(signum)


class ReplicaCluster:
    """Replicas on one fresh PostgreSQL database, and agents connected to them."""

    def __init__(
        self, tmp: Path, database: str, replicas: int, timing: dict[str, str] | None = None
    ) -> None:
        self.tmp = tmp
        self.database = database
        self.timing = {**TIMING, **(timing or {})}
        self.engine = sa.create_engine(database, poolclass=sa.pool.NullPool)
        self.replicas = [Replica(i, tmp, database, self.timing) for i in range(replicas)]
        self.agents: dict[str, Proc] = {}

    # -- processes --------------------------------------------------------
    def start(self) -> None:
        for replica in self.replicas:
            replica.proc.start()
            # The first one leads; waiting for each keeps that order predictable.
            self.wait_until(
                lambda r=replica: r.serving() or not r.alive, 60, f"{replica.replica_id} serving"
            )
            assert replica.alive, replica.proc.log()

    def add_agent(self, name: str, addresses: list[str] | None = None) -> Proc:
        servers = ",".join(addresses or [r.address for r in self.replicas])
        args = [
            GYOZA, "agent",
            "--server", servers,
            "--name", name,
            "--executor", "scripted",
            "--state-dir", str(self.tmp / f"agent-{name}"),
        ]  # fmt: skip
        proc = Proc(name, args, self.tmp / f"agent-{name}.log", env=dict(self.timing))
        self.agents[name] = proc
        proc.start()
        return proc

    def wait_agents(self, names: set[str], timeout: float = 60) -> None:
        def connected() -> bool:
            try:
                return names <= {a.name for a in self.list_agents() if a.state in _LIVE}
            except grpc.RpcError:
                return False

        self.wait_until(connected, timeout, f"agents {sorted(names)} connected")

    def close(self) -> None:
        for proc in self.agents.values():
            proc.stop()
        for replica in self.replicas:
            replica.channel.close()
            if replica.proc.popen is not None and replica.proc.popen.poll() is None:
                replica.proc.popen.send_signal(signal.SIGCONT)
            replica.proc.stop()
        self.engine.dispose()

    # -- leadership, from the database -----------------------------------
    def leadership(self) -> tuple[str, int, float]:
        """(holder, term, seconds until its lease expires)."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.text(
                    "SELECT holder, term, EXTRACT(EPOCH FROM (expires_at - now())) "
                    "FROM leadership WHERE name = 'control'"
                )
            ).one()
        return str(row[0]), int(row[1]), float(row[2])

    def leader(self) -> Replica:
        holder = self.leadership()[0]
        return next(r for r in self.replicas if r.replica_id == holder)

    def wait_new_leader(self, old_term: int, timeout: float = 30) -> Replica:
        def moved() -> bool:
            _holder, term, expires_in = self.leadership()
            return term > old_term and expires_in > 0

        self.wait_until(moved, timeout, f"a leader after term {old_term}")
        leader = self.leader()
        self.wait_until(leader.serving, timeout, f"{leader.replica_id} serving as leader")
        return leader

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    def any_replica(self) -> Replica:
        return random.choice(self.live())

    # -- API, retried on another replica while one is away -----------------
    def call(
        self,
        method: Callable[[Replica], Any],
        timeout: float = 60,
        on: Replica | None = None,
    ) -> Any:
        """Call on a random live replica (or on *on*); UNAVAILABLE (a replica stopping,
        a takeover under way) is retried on another until *timeout*."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return method(on or self.any_replica())
            except grpc.RpcError as error:
                if (
                    error.code() not in RETRYABLE
                    and error.code() != grpc.StatusCode.DEADLINE_EXCEEDED
                ):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def create(
        self,
        request_id: str,
        *,
        sleep_ms: int = 0,
        progress_steps: int = 3,
        topic: str = "",
        on: Replica | None = None,
    ) -> op_run_pb2.OpRun:
        inputs = struct_pb2.Struct()
        inputs.update({"sleep_ms": sleep_ms, "progress_steps": progress_steps})
        request = op_run_service_pb2.CreateOpRunRequest(
            image="scripted",
            inputs=inputs,
            request_id=request_id,
            event_delivery=resources_pb2.EventDelivery(topic=topic),
        )
        return self.call(lambda r: r.runs.CreateOpRun(request, timeout=10).op_run, on=on)

    def get(self, run_id: str) -> op_run_pb2.OpRun:
        request = op_run_service_pb2.GetOpRunRequest(run_id=run_id)
        return self.call(lambda r: r.runs.GetOpRun(request, timeout=10).op_run)

    def events(self, run_id: str) -> list[op_run_pb2.OpRunEvent]:
        request = op_run_service_pb2.ListOpRunEventsRequest(run_id=run_id, page_size=1000)
        reply = self.call(lambda r: r.runs.ListOpRunEvents(request, timeout=10))
        return list(reply.events)

    def list_agents(self, replica: Replica | None = None) -> list[Any]:
        request = agent_service_pb2.ListAgentsRequest()
        if replica is not None:
            return list(replica.fleet.ListAgents(request, timeout=10).agents)
        return list(self.call(lambda r: r.fleet.ListAgents(request, timeout=10)).agents)

    def wait_terminal(self, run_ids: list[str], timeout: float = 120) -> dict[str, Any]:
        """Every run's final state (polls GetOpRun; the runs are many)."""
        final: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        pending = list(run_ids)
        while pending:
            still = []
            for run_id in pending:
                run = self.get(run_id)
                if run.state in TERMINAL:
                    final[run_id] = run
                else:
                    still.append(run_id)
            pending = still
            if pending:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{len(pending)} runs not finished, e.g. {pending[:3]}")
                time.sleep(0.2)
        return final

    @staticmethod
    def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
        """Re-check a condition no stream announces (bounded)."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)


_LIVE = {1, 2}  # AGENT_STATE_CONNECTED, AGENT_STATE_DRAINING


@pytest.fixture
def replica_cluster(
    tmp_path: Path, fresh_pg_database: str
) -> Iterator[Callable[..., ReplicaCluster]]:
    """``replica_cluster(n, timing)``: n replicas started on a fresh database (stopped
    after); *timing* overrides :data:`TIMING` for its replicas and agents."""
    made: list[ReplicaCluster] = []

    def make(replicas: int, timing: dict[str, str] | None = None) -> ReplicaCluster:
        cluster = ReplicaCluster(tmp_path, fresh_pg_database, replicas, timing)
        made.append(cluster)
        cluster.start()
        return cluster

    yield make
    for cluster in made:
        cluster.close()
