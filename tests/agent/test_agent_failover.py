"""Agent failover over a list of server addresses, with real server and agent processes.

The agent is given ``--server a,b``: it must connect to whichever answers, and move to
the next address when the one it uses goes away, without running an attempt twice or
losing an event. Servers use SQLite files (one database shared by two servers that never
run at the same time); agents use the scripted executor.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gyoza.agent.config import AgentConfig, parse_servers
from gyoza.api.v1 import op_run_pb2, resources_pb2
from tests.integration.conftest import GYOZA, TIMING, Cluster, Proc, free_port

S = resources_pb2


def _running(run: op_run_pb2.OpRun) -> bool:
    return run.state == S.OP_RUN_STATE_RUNNING


def _ended(run: op_run_pb2.OpRun) -> bool:
    return run.state in (S.OP_RUN_STATE_COMPLETED, S.OP_RUN_STATE_FAILED, S.OP_RUN_STATE_CANCELLED)


def _assert_once(attempt: op_run_pb2.OpAttempt, steps: int) -> None:
    """Every event of the attempt once, in order, numbered 1..n, ending COMPLETED."""
    types = [S.EventType.Name(e.type).removeprefix("EVENT_TYPE_") for e in attempt.events]
    assert [e.seq for e in attempt.events] == list(range(1, len(attempt.events) + 1)), types
    assert types.count("STARTED") == 1, types
    assert types.count("COMPLETED") == 1 and types[-1] == "COMPLETED", types
    progress = [e.progress for e in attempt.events if e.type == S.EVENT_TYPE_PROGRESS]
    assert progress == sorted(set(progress)) and len(progress) == steps, progress


def _agent(tmp: Path, name: str, servers: list[str]) -> Proc:
    args = [
        GYOZA, "agent",
        "--server", ",".join(servers),
        "--name", name,
        "--executor", "scripted",
        "--state-dir", str(tmp / f"agent-{name}"),
    ]  # fmt: skip
    return Proc(name, args, tmp / f"agent-{name}.log", env=dict(TIMING))


@pytest.fixture
def patient(tmp_path: Path) -> Iterator[Cluster]:
    """A server whose lost agents get a long grace period: a failover lands within it,
    so a run that is retried shows a failover that came too late."""
    cluster = Cluster(tmp_path, GYOZA_GRACE_S="30")
    cluster.start_server()
    try:
        yield cluster
    finally:
        cluster.close()


def test_server_lists_are_parsed_and_bad_ones_refused() -> None:
    assert parse_servers("a:1, b:2 ,[::1]:3") == ("a:1", "b:2", "[::1]:3")
    assert AgentConfig(server="a:1,a:1,b:2").servers == ("a:1", "b:2")
    for bad in ("", " , ", "a:1,,b:2", "a:1,", "host", "h:port", "h:0", "h:70000", "::1:5"):
        with pytest.raises(ValueError, match="server"):
            AgentConfig(server=bad)


def test_a_bad_server_list_is_a_configuration_error(tmp_path: Path) -> None:
    proc = subprocess.run(
        [GYOZA, "agent", "--server", "127.0.0.1:1,,127.0.0.1:2", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "empty address" in proc.stderr


def test_agent_skips_a_dead_address_and_completes_a_run(patient: Cluster) -> None:
    dead = f"127.0.0.1:{free_port()}"
    agent = _agent(patient.tmp, "a1", [dead, patient.address])
    patient.agents["a1"] = agent
    agent.start()
    patient.wait_agents({"a1"})
    run = patient.create(sleep_ms=200, progress_steps=3)
    done = patient.watch_until(run.id, _ended, timeout=60)
    assert done.state == S.OP_RUN_STATE_COMPLETED, done
    (attempt,) = patient.attempts(run.id)
    _assert_once(attempt, steps=3)
    log = agent.log()
    assert f"cannot connect to {dead}" in log
    assert f"connected to {patient.address}" in log


def test_dead_addresses_cost_one_short_pause_each_and_a_round_one_backoff(
    patient: Cluster,
) -> None:
    """Two dead addresses before the live one: the agent moves on from each after the
    shortest pause (not a growing backoff), and reaches the live server in its first
    round (0.2 s: the agent's first backoff step)."""
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    agent = _agent(patient.tmp, "a1", [*dead, patient.address])
    patient.agents["a1"] = agent
    agent.start()
    patient.wait_agents({"a1"})
    log = agent.log()
    moves = [line for line in log.splitlines() if "reconnecting to" in line]
    assert any(f"reconnecting to {dead[1]} in 0.20s" in line for line in moves), moves
    assert any(f"reconnecting to {patient.address} in 0.20s" in line for line in moves), moves
    assert not any(f"reconnecting to {dead[0]}" in line for line in moves), moves


def test_agent_fails_over_to_a_server_on_the_same_database(patient: Cluster) -> None:
    """Server A is killed -9 mid-run; server B starts on A's database file at another
    address; the agent moves to B and the run completes with one attempt."""
    b = Cluster(patient.tmp, GYOZA_GRACE_S="30")  # the same SQLite file, another port
    b.server.log_path = patient.tmp / "server-b.log"
    agent = _agent(patient.tmp, "a1", [patient.address, b.address])
    patient.agents["a1"] = agent
    try:
        agent.start()
        patient.wait_agents({"a1"})
        run = patient.create(sleep_ms=4_000, progress_steps=8)
        patient.watch_until(run.id, _running)
        patient.server.kill9()
        b.start_server()
        done = b.watch_until(run.id, _ended, timeout=90)
        assert done.state == S.OP_RUN_STATE_COMPLETED, done
        assert done.current_attempt == 1
        (attempt,) = b.attempts(run.id)
        _assert_once(attempt, steps=8)
        assert f"connected to {b.address}" in agent.log()
    finally:
        b.close()


def test_agent_leaves_a_hung_server_for_the_next_address(tmp_path: Path) -> None:
    """A server that stops answering without closing the connection (SIGSTOP, as a
    hung process or a dead machine looks) is left once a keepalive ping goes unanswered
    (10 s + 5 s), not after grpc's default ping timeout of a minute."""
    a = Cluster(tmp_path / "a")
    b = Cluster(tmp_path / "b")
    for cluster in (a, b):
        cluster.tmp.mkdir()
        cluster.start_server()
    agent = _agent(tmp_path, "a1", [a.address, b.address])
    a.agents["a1"] = agent
    try:
        agent.start()
        a.wait_agents({"a1"})
        assert a.server.popen is not None
        a.server.popen.send_signal(signal.SIGSTOP)
        try:
            b.wait_agents({"a1"}, timeout=40)
        finally:
            a.server.popen.send_signal(signal.SIGCONT)
        assert "ping timeout" in agent.log()
    finally:
        a.close()
        b.close()
