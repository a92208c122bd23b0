"""DeleteOpRun, DrainAgent and UndrainAgent on a real server, on SQLite and PostgreSQL:
status codes with their ErrorInfo reasons, the stream messages an agent gets, and drains
that outlive the server process."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from gyoza.api.v1 import agent_pb2, resources_pb2
from gyoza.api.v1 import agent_service_pb2 as apb
from gyoza.api.v1 import op_run_service_pb2 as pb

ExpectError = Callable[[Callable[[], Any]], Any]


def test_delete_refuses_what_it_cannot_delete(stubs: Any, expect_error: ExpectError) -> None:
    run = stubs.runs.CreateOpRun(pb.CreateOpRunRequest(image="busybox"), timeout=10).op_run

    empty = expect_error(lambda: stubs.runs.DeleteOpRun(pb.DeleteOpRunRequest(), timeout=10))
    assert (empty.code, empty.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    assert "run_id" in empty.violations
    unknown = expect_error(
        lambda: stubs.runs.DeleteOpRun(pb.DeleteOpRunRequest(run_id="run_nope"), timeout=10)
    )
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")
    pending = expect_error(
        lambda: stubs.runs.DeleteOpRun(pb.DeleteOpRunRequest(run_id=run.id), timeout=10)
    )
    assert (pending.code, pending.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RUN_NOT_FINISHED",
    )
    assert "PENDING" in pending.message

    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=run.id), timeout=10)
    reply = stubs.runs.DeleteOpRun(pb.DeleteOpRunRequest(run_id=run.id), timeout=10)
    assert reply.run_id == run.id
    gone = expect_error(lambda: stubs.runs.GetOpRun(pb.GetOpRunRequest(run_id=run.id)))
    assert gone.code == grpc.StatusCode.NOT_FOUND
    listed = stubs.runs.ListOpRuns(pb.ListOpRunsRequest(), timeout=10).op_runs
    assert run.id not in {r.id for r in listed}


def test_drain_and_undrain_reach_the_agent_and_outlive_the_server(
    server_factory: Any,
    database_url: str,
    fake_agent: Callable[..., Any],
    expect_error: ExpectError,
) -> None:
    server = server_factory(database_url)
    stubs = server.stubs()
    for empty_call in (
        lambda: stubs.agents.DrainAgent(apb.DrainAgentRequest(), timeout=10),
        lambda: stubs.agents.UndrainAgent(apb.UndrainAgentRequest(), timeout=10),
    ):
        empty = expect_error(empty_call)
        assert (empty.code, empty.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_INPUT")
    unknown = expect_error(
        lambda: stubs.agents.UndrainAgent(apb.UndrainAgentRequest(name="nobody"), timeout=10)
    )
    assert (unknown.code, unknown.reason) == (grpc.StatusCode.NOT_FOUND, "NOT_FOUND")

    agent = fake_agent(server.channel(), "gpu-1")
    drained = stubs.agents.DrainAgent(apb.DrainAgentRequest(name="gpu-1"), timeout=10).agent
    assert drained.state == agent_pb2.AGENT_STATE_DRAINING
    assert agent.receive("drain").drain.reason
    run = stubs.runs.CreateOpRun(pb.CreateOpRunRequest(image="busybox"), timeout=10).op_run
    agent.close()

    assert server.terminate() == 0
    server = server_factory(database_url)
    stubs = server.stubs()
    # Before it is back, a drained agent is listed (disconnected) and stays drainable.
    listed = stubs.agents.ListAgents(apb.ListAgentsRequest(include_disconnected=True)).agents
    assert [(a.name, a.state) for a in listed] == [("gpu-1", agent_pb2.AGENT_STATE_DISCONNECTED)]
    stubs.agents.DrainAgent(apb.DrainAgentRequest(name="gpu-1"), timeout=10)
    agent = fake_agent(server.channel(), "gpu-1")
    agent.receive("drain")  # the new session is told again, before any assignment
    listed = stubs.agents.ListAgents(apb.ListAgentsRequest(), timeout=10).agents
    assert [(a.name, a.state) for a in listed] == [("gpu-1", agent_pb2.AGENT_STATE_DRAINING)]

    undrained = stubs.agents.UndrainAgent(apb.UndrainAgentRequest(name="gpu-1"), timeout=10)
    assert undrained.agent.state == agent_pb2.AGENT_STATE_CONNECTED
    assert agent.receive("undrain").undrain.reason
    assignment = agent.receive("assignment").assignment  # placement considers it at once
    assert assignment.run_id == run.id
    state = stubs.runs.GetOpRun(pb.GetOpRunRequest(run_id=run.id), timeout=10).op_run.state
    assert state == resources_pb2.OP_RUN_STATE_ASSIGNED
    agent.close()
