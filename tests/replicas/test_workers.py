"""``gyoza server --workers N``: a supervisor of N replicas on one address, as real
processes on a real PostgreSQL database.

Which worker answered a call is read from the kernel: each accepted connection is a
socket of one worker process (``/proc/<pid>/fd`` and ``/proc/net/tcp``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.conftest import GYOZA, Proc, free_port

pytestmark = pytest.mark.timeout(180)

SERVING = health_pb2.HealthCheckResponse.SERVING
TIMING = {"GYOZA_LEADER_LEASE_S": "2", "GYOZA_LOG_FORMAT": "json"}


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Re-check a condition no stream announces (bounded)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Whether *pid* runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def sockets_on(pids: list[int], port: int, state: str) -> dict[int, int]:
    """How many TCP sockets on local *port*, in *state* (``01`` established, ``0A``
    listening), each of *pids* holds."""
    owners: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    owners[target[8:-1]] = pid
        except FileNotFoundError:
            continue
    counts = dict.fromkeys(pids, 0)
    # grpc binds an IPv4 address on an IPv6 socket (v4-mapped) where it can.
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(path) as table:
            for line in table.readlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == state and fields[9] in owners:
                    counts[owners[fields[9]]] += 1
    return counts


def listening(pids: list[int], port: int) -> bool:
    """Whether every one of *pids* listens on *port*."""
    return all(n > 0 for n in sockets_on(pids, port, "0A").values())


class Workers:
    """``gyoza server --workers N`` on one address, its log read as JSON lines."""

    def __init__(self, tmp: Path, database: str, count: int) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.count = count
        self.proc = Proc(
            "supervisor",
            [GYOZA, "server", "--workers", str(count), "--listen", self.address,
             "--database", database, "--shutdown-grace", "2"],
            tmp / "supervisor.log",
            env=dict(TIMING),
        )  # fmt: skip

    def started(self) -> dict[int, list[int]]:
        """Every pid each worker was started with, in order."""
        pids: dict[int, list[int]] = {}
        for line in self.proc.log_path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("msg") == "worker started":
                pids.setdefault(int(record["worker"]), []).append(int(record["pid"]))
        return pids

    def current(self) -> list[int]:
        """The pid of each worker now."""
        started = self.started()
        return [started[i][-1] for i in range(self.count)]

    def check(self) -> int:
        """One health check on a new connection of its own."""
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(self.address, options=options) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
            return int(reply.status)

    def serving(self) -> bool:
        try:
            return self.check() == SERVING
        except grpc.RpcError:
            return False

    def all_serving(self, connections: int = 12) -> bool:
        """SERVING on every one of *connections* new connections: the kernel spreads
        them over the workers, so each worker answered (a follower is NOT_SERVING until
        the leader has advertised its address)."""
        return all(self.serving() for _ in range(connections))

    def start(self) -> None:
        self.proc.start()
        wait_until(
            lambda: len(self.started()) == self.count or self.proc.popen.poll() is not None,  # type: ignore[union-attr]
            30,
            "the workers started",
        )
        assert self.proc.popen is not None and self.proc.popen.poll() is None, self.proc.log()
        wait_until(lambda: listening(self.current(), self.port), 60, "the workers listening")
        wait_until(self.all_serving, 60, "the workers serving")


@pytest.fixture
def workers(tmp_path: Path, fresh_pg_database: str) -> Iterator[Workers]:
    supervisor = Workers(tmp_path, fresh_pg_database, 2)
    try:
        supervisor.start()
        yield supervisor
    finally:
        supervisor.proc.stop()
        for pids in supervisor.started().values():
            for pid in pids:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


def test_workers_share_one_address_are_restarted_and_stop_with_the_supervisor(
    workers: Workers,
) -> None:
    first = workers.current()
    assert len(set(first)) == 2
    # New connections are spread over both workers, and each answers SERVING.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(workers.address, options=options) for _ in range(24)]
    try:
        for channel in channels:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == SERVING
        counts = sockets_on(first, workers.port, "01")
        assert sum(counts.values()) == len(channels), counts
        assert all(n > 0 for n in counts.values()), counts
    finally:
        for channel in channels:
            channel.close()

    # A worker killed -9 is started again, with a new pid, and serves.
    os.kill(first[0], signal.SIGKILL)
    wait_until(lambda: len(workers.started()[0]) == 2, 30, "worker 0 restarted")
    second = workers.current()
    assert second[0] != first[0] and second[1] == first[1]
    assert "worker died; restarting" in workers.proc.log_path.read_text()
    wait_until(lambda: listening(second, workers.port), 60, "the new worker listening")
    wait_until(workers.all_serving, 60, "both workers serving again")

    # SIGTERM to the supervisor stops every worker, and it exits 0.
    assert workers.proc.popen is not None
    workers.proc.popen.send_signal(signal.SIGTERM)
    assert workers.proc.popen.wait(60) == 0, workers.proc.log()
    assert not any(alive(pid) for pid in second)
    log = workers.proc.log_path.read_text()
    assert log.count('"worker stopped"') == 2, log[-3000:]


def test_workers_die_with_a_killed_supervisor(workers: Workers) -> None:
    pids = workers.current()
    assert workers.proc.popen is not None
    workers.proc.kill9()
    wait_until(lambda: not any(alive(pid) for pid in pids), 30, "the workers ending")


def run_server(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **TIMING}
    )


@pytest.mark.parametrize("entry", [[GYOZA, "server"], [sys.executable, "-m", "gyoza.server"]])
def test_workers_on_sqlite_is_a_configuration_error(tmp_path: Path, entry: list[str]) -> None:
    result = run_server(
        *entry, "--workers", "2", "--database", f"sqlite:///{tmp_path / 'gyoza.db'}",
        "--listen", f"127.0.0.1:{free_port()}",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--workers needs a PostgreSQL database" in result.stderr
    assert not (tmp_path / "gyoza.db").exists()


def test_workers_need_a_fixed_listen_port() -> None:
    # Refused before the database is reached: none listens on port 1.
    result = run_server(
        GYOZA, "server", "--workers", "2", "--listen", "127.0.0.1:0",
        "--database", "postgresql://nobody@127.0.0.1:1/none",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--workers needs a fixed --listen port" in result.stderr


def test_workers_from_the_environment_and_bad_values(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'gyoza.db'}"
    env = {**os.environ, "GYOZA_WORKERS": "2"}
    result = subprocess.run(
        [GYOZA, "server", "--database", database], capture_output=True, text=True,
        timeout=60, env=env,
    )  # fmt: skip
    assert result.returncode == 2 and "--workers needs a PostgreSQL" in result.stderr
    result = run_server(GYOZA, "server", "--workers", "0", "--database", database)
    assert result.returncode == 2 and "--workers" in result.stderr
