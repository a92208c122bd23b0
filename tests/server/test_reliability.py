"""What must hold when writes fail and streams end abruptly, against the real server.

Faults are real: a store write that the database refuses (a trigger installed in the
server's SQLite file), agent streams cancelled at the worst moment.
"""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest

from gyoza.api.v1 import agent_service_pb2, resources_pb2
from gyoza.api.v1 import op_run_service_pb2 as pb

TIMEOUT_S = 15
_LIVE = {1, 2}  # AGENT_STATE_CONNECTED, AGENT_STATE_DRAINING


def _sqlite_path(server: Any) -> str:
    prefix = "sqlite:///"
    assert server.database_url.startswith(prefix)
    return str(server.database_url.removeprefix(prefix))


def _ack_seq(agent: Any, run_id: str, seq: int) -> None:
    while True:
        message = agent.receive("acks")
        if any(a.run_id == run_id and a.seq >= seq for a in message.acks.acks):
            return


def test_a_watermark_never_commits_without_the_log_lines_it_covers(
    sqlite_server: Any, fake_agent: Callable[..., Any]
) -> None:
    stubs = sqlite_server.stubs()
    agent = fake_agent(sqlite_server.channel(), "a1")
    run = stubs.runs.CreateOpRun(pb.CreateOpRunRequest(image="busybox:latest")).op_run
    agent.accept(agent.receive("assignment").assignment)
    agent.event(run.id, 1, resources_pb2.EVENT_TYPE_STARTED)
    _ack_seq(agent, run.id, 1)

    # The database refuses the next log line: the whole write of report 2 must fail.
    db = sqlite3.connect(_sqlite_path(sqlite_server), timeout=10)
    db.execute(
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON op_logs WHEN NEW.text = 'poison' "
        "BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
    )
    db.commit()
    agent.logs(run.id, 1, "poison")
    with pytest.raises((grpc.RpcError, EOFError)):
        agent.receive("acks")  # the session ends on the failed write
    db.execute("DROP TRIGGER refuse_poison")
    db.commit()
    db.close()

    # The agent comes back holding report 2: the server must not say it applied it.
    held = agent_service_pb2.HeldAttempt(run_id=run.id, attempt=1, last_seq=2)
    again = fake_agent(sqlite_server.channel(), "a1", held=[held])
    (resume,) = [r for r in again.welcome.resume if r.run_id == run.id]
    assert resume.seq == 1
    again.resume_from(run.id, 1, resume.seq)
    again.logs(run.id, 1, "poison")
    _ack_seq(again, run.id, 2)
    lines = list(stubs.runs.GetOpRunLogs(pb.GetOpRunLogsRequest(run_id=run.id)))
    assert [line.text for m in lines for line in m.lines] == ["poison"]


def _hello_then_cancel(stub: Any, name: str) -> None:
    """Say Hello, read the Welcome, cancel the stream at once."""
    hello = agent_service_pb2.ConnectRequest(
        hello=agent_service_pb2.Hello(agent_name=name, version="churn")
    )
    release = threading.Event()

    def requests() -> Iterator[agent_service_pb2.ConnectRequest]:
        yield hello
        release.wait(TIMEOUT_S)

    call = stub.Connect(requests(), timeout=TIMEOUT_S)
    try:
        first = next(call)
        assert first.HasField("welcome")
    finally:
        call.cancel()
        release.set()


def test_churned_sessions_all_end_and_no_run_goes_to_a_zombie(sqlite_server: Any) -> None:
    stubs = sqlite_server.stubs()
    names = [f"churn-{i}" for i in range(60)]
    with ThreadPoolExecutor(8) as pool:
        for _ in range(3):  # every name churns several times
            list(pool.map(lambda n: _hello_then_cancel(stubs.agents, n), names))

    deadline = time.monotonic() + TIMEOUT_S
    while True:
        agents = stubs.agents.ListAgents(
            agent_service_pb2.ListAgentsRequest(include_disconnected=True)
        ).agents
        live = [a.name for a in agents if a.state in _LIVE]
        if not live:
            break
        assert time.monotonic() < deadline, f"sessions still open after their streams ended: {live}"
        time.sleep(0.05)
    assert {a.name for a in agents} == set(names)
    disconnected = [e for e in sqlite_server.log_events() if e.get("msg") == "agent disconnected"]
    connected = [e for e in sqlite_server.log_events() if e.get("msg") == "agent connected"]
    assert len(disconnected) == len(connected)


def test_every_way_the_server_ends_an_agent_stream_has_a_status_and_reason(
    server_factory: Callable[..., Any],
    fake_agent: Callable[..., Any],
    expect_error: Callable[[Callable[[], Any]], Any],
) -> None:
    server = server_factory(env={"GYOZA_LEASE_TIMEOUT_S": "0.5", "GYOZA_GRACE_S": "5"})
    channel = server.channel()

    silent = fake_agent(channel, "silent")  # it never sends a heartbeat
    lapsed = expect_error(lambda: silent.receive("assignment", timeout=TIMEOUT_S))
    assert (lapsed.code, lapsed.reason) == (grpc.StatusCode.UNAVAILABLE, "LEASE_EXPIRED")

    old = fake_agent(channel, "twice")
    fake_agent(channel, "twice")
    replaced = expect_error(lambda: old.receive("assignment", timeout=TIMEOUT_S))
    assert (replaced.code, replaced.reason) == (grpc.StatusCode.ABORTED, "SESSION_REPLACED")

    last = fake_agent(server.channel(), "last")
    assert server.popen is not None
    server.popen.send_signal(signal.SIGTERM)
    stopped = expect_error(lambda: last.receive("assignment", timeout=TIMEOUT_S))
    assert (stopped.code, stopped.reason) == (grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN")
