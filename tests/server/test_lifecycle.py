"""SIGTERM and restart on the same database; metrics; the server's log."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from gyoza.api.v1 import definition_service_pb2 as dpb
from gyoza.api.v1 import op_definition_pb2, resources_pb2
from gyoza.api.v1 import op_run_service_pb2 as pb

ExpectError = Callable[[Callable[[], Any]], Any]


def test_restart_keeps_definitions_runs_events_and_queue_order(
    server_factory: Callable[..., Any],
    database_url: str,
    fake_agent: Callable[..., Any],
) -> None:
    first = server_factory(database_url)
    stubs = first.stubs()
    stubs.definitions.CreateOpDefinition(
        dpb.CreateOpDefinitionRequest(
            op_definition=op_definition_pb2.OpDefinition(
                name="keep", image="busybox:latest", description="survives restarts"
            )
        )
    )
    inputs = struct_pb2.Struct()
    inputs.update({"k": "v"})
    low = stubs.runs.CreateOpRun(pb.CreateOpRunRequest(op_definition="keep", priority=1)).op_run
    high_a = stubs.runs.CreateOpRun(pb.CreateOpRunRequest(image="img", priority=5)).op_run
    high_b = stubs.runs.CreateOpRun(
        pb.CreateOpRunRequest(image="img", priority=5, inputs=inputs)
    ).op_run
    bumped = stubs.runs.CreateOpRun(pb.CreateOpRunRequest(image="img", priority=0)).op_run
    stubs.runs.UpdateOpRunPriority(pb.UpdateOpRunPriorityRequest(run_id=bumped.id, priority=9))
    gone = stubs.runs.CreateOpRun(pb.CreateOpRunRequest(image="img", priority=7)).op_run
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=gone.id))
    events_before = {
        run.id: list(stubs.runs.ListOpRunEvents(pb.ListOpRunEventsRequest(run_id=run.id)).events)
        for run in (low, high_a, high_b, bumped, gone)
    }

    assert first.terminate() == 0
    messages = [e.get("msg") for e in first.log_events()]
    assert "server stopping" in messages and "server stopped" in messages

    second = server_factory(database_url)
    stubs = second.stubs()
    kept = stubs.definitions.GetOpDefinition(dpb.GetOpDefinitionRequest(name="keep"))
    assert kept.op_definition.description == "survives restarts"
    assert stubs.runs.GetOpRun(pb.GetOpRunRequest(run_id=gone.id)).op_run.state == (
        resources_pb2.OP_RUN_STATE_CANCELLED
    )
    assert stubs.runs.GetOpRun(pb.GetOpRunRequest(run_id=high_b.id)).op_run.inputs["k"] == "v"
    for run_id, events in events_before.items():
        after = list(stubs.runs.ListOpRunEvents(pb.ListOpRunEventsRequest(run_id=run_id)).events)
        assert after == events
    listed = stubs.runs.ListOpRuns(
        pb.ListOpRunsRequest(states=[resources_pb2.OP_RUN_STATE_PENDING])
    ).op_runs
    assert {r.id for r in listed} == {low.id, high_a.id, high_b.id, bumped.id}

    # The queue was rebuilt in its order: priority first, then first come first served.
    agent = fake_agent(second.channel())
    order = [agent.receive("assignment").assignment.run_id for _ in range(4)]
    assert order == [bumped.id, high_a.id, high_b.id, low.id]


def test_sigterm_ends_open_streams_and_exits_promptly(
    server_factory: Callable[..., Any], fake_agent: Callable[..., Any]
) -> None:
    # A grace far longer than the test may take: exiting at all shows it was not waited.
    server = server_factory(args=["--shutdown-grace", "3600"])
    stubs = server.stubs()
    agent = fake_agent(server.channel(), cpu=4)
    # Too big for the agent: it stays PENDING, so the watch sees nothing new until the end.
    run = stubs.runs.CreateOpRun(
        pb.CreateOpRunRequest(image="busybox", constraints=resources_pb2.Constraints(cpu=64))
    ).op_run
    watch = stubs.runs.WatchOpRun(pb.WatchOpRunRequest(run_id=run.id), timeout=60)
    snapshot = next(watch)
    for _ in range(snapshot.sequence):
        next(watch)
    topic = stubs.runs.SubscribeEvents(pb.SubscribeEventsRequest(topic="t"), timeout=60)
    topic.initial_metadata()

    assert server.popen is not None
    server.popen.send_signal(15)
    with pytest.raises(grpc.RpcError) as caught:
        next(watch)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert f"after_sequence={snapshot.sequence}" in caught.value.details()  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as caught:
        next(topic)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert server.popen.wait(60) == 0
    with pytest.raises(grpc.RpcError) as caught:  # the agent's session ended, to reconnect
        agent.receive("no-such-message", timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert "shutting down" in caught.value.details()  # type: ignore[attr-defined]
    assert "server stopped" in [e.get("msg") for e in server.log_events()]


def test_metrics_endpoint(server_factory: Callable[..., Any]) -> None:
    server = server_factory(args=["--metrics-port", "0"])
    assert server.metrics_port
    stubs = server.stubs()
    run = stubs.runs.CreateOpRun(pb.CreateOpRunRequest(image="busybox")).op_run
    stubs.runs.CreateOpRun(pb.CreateOpRunRequest(image="busybox"))
    stubs.runs.CancelOpRun(pb.CancelOpRunRequest(run_id=run.id))
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['gyoza_runs{state="PENDING"}'] == 1
    assert samples['gyoza_runs_finished_total{state="CANCELLED"}'] == 1
    assert samples["gyoza_queue_depth"] == 1
    assert samples["gyoza_connected_agents"] == 0
    assert (
        samples[
            'gyoza_rpc_duration_seconds_count{code="OK",method="/gyoza.api.v1.OpRunService/CreateOpRun"}'
        ]
        == 2
    )
    assert "gyoza_event_apply_seconds_count" in samples
    assert "gyoza_hub_subscribers" in samples


def test_metrics_are_off_by_default(sqlite_server: Any) -> None:
    assert sqlite_server.metrics_port is None


def test_default_database_is_a_sqlite_file_in_the_working_directory(
    server_factory: Callable[..., Any], tmp_path: Any
) -> None:
    server = server_factory(database_url="")  # no --database flag
    server.stubs().runs.CreateOpRun(pb.CreateOpRunRequest(image="busybox"))
    assert (tmp_path / "gyoza.db").exists()
    listening = next(e for e in server.log_events() if e.get("msg") == "server listening")
    assert listening["database"].startswith("sqlite:")


def test_database_url_from_the_environment(
    server_factory: Callable[..., Any], tmp_path: Any
) -> None:
    path = tmp_path / "from-env.db"
    server = server_factory(database_url="", env={"GYOZA_DATABASE_URL": f"sqlite:///{path}"})
    server.stubs().runs.CreateOpRun(pb.CreateOpRunRequest(image="busybox"))
    assert path.exists()


def test_a_taken_port_or_bad_setting_stops_the_server_with_an_error(
    sqlite_server: Any, tmp_path: Any
) -> None:
    import subprocess
    import sys

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gyoza.server", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={**os.environ, **(env or {})},
            check=False,
        )

    taken = run("--listen", sqlite_server.address, "--database", f"sqlite:///{tmp_path / 'b.db'}")
    assert taken.returncode == 1
    assert "server failed" in taken.stderr
    assert "cannot listen" in taken.stderr
    bad = run(env={"GYOZA_LEASE_TIMEOUT_S": "soon"})
    assert bad.returncode == 2
    assert "agent protocol timing" in bad.stderr
    # The first server is unharmed.
    assert sqlite_server.stubs().runs.CreateOpRun(pb.CreateOpRunRequest(image="busybox"))
