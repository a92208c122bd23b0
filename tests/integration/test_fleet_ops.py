"""Operating the fleet through real processes: durable drains, deleting and retaining
finished runs, agent shutdown, lifecycle logs and metrics.

The server, the agents and the ``gyoza`` CLI run as subprocesses on 127.0.0.1; the
store is a SQLite file or a fresh PostgreSQL database.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2

from gyoza.api.v1 import agent_pb2, op_run_service_pb2, resources_pb2
from tests.integration.conftest import GYOZA, Cluster, free_port

S = resources_pb2


def _cluster(request: pytest.FixtureRequest, tmp_path: Path, *extra: str, **env: str) -> Cluster:
    c = Cluster(tmp_path, **env)
    if request.param == "postgres":
        url = request.getfixturevalue("fresh_pg_database")
        index = c.server.args.index("--database")
        c.server.args[index + 1] = url
    c.server.args.extend(extra)
    c.start_server()
    return c


@pytest.fixture(params=["sqlite", "postgres"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """A cluster on either database, whose lost agents get a long grace."""
    c = _cluster(request, tmp_path, GYOZA_GRACE_S="20")
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(params=["sqlite", "postgres"])
def retaining(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """A cluster that deletes finished runs 2 s after they ended."""
    c = _cluster(request, tmp_path, "--retention", "2s", GYOZA_RETENTION_INTERVAL_S="0.2")
    try:
        yield c
    finally:
        c.close()


def cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GYOZA_SERVER": cluster.address}
    return subprocess.run(
        [GYOZA, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def agent_state(cluster: Cluster, name: str) -> int:
    return next(a.state for a in cluster.list_agents() if a.name == name)


def completed(run: Any) -> bool:
    return bool(run.state == S.OP_RUN_STATE_COMPLETED)


def running(run: Any) -> bool:
    return bool(run.state == S.OP_RUN_STATE_RUNNING)


def test_a_drain_lasts_across_agent_and_server_restarts_until_undrained(
    fleet: Cluster,
) -> None:
    first = fleet.add_agent("first")
    drained = cli(fleet, "agents", "drain", "first")
    assert drained.returncode == 0, drained.stderr
    assert agent_state(fleet, "first") == agent_pb2.AGENT_STATE_DRAINING
    waiting = fleet.create(sleep_ms=10)

    first.stop()
    first.start()
    fleet.wait_agents({"first"})
    assert agent_state(fleet, "first") == agent_pb2.AGENT_STATE_DRAINING
    fleet.server.stop()
    fleet.start_server()
    fleet.wait_agents({"first"})
    assert agent_state(fleet, "first") == agent_pb2.AGENT_STATE_DRAINING

    # Had "first" taken work on any of its (re)connects, the run would be on it.
    fleet.add_agent("second")
    done = fleet.watch_until(waiting.id, completed)
    assert done.execution_summary.worker_id == "second"

    fleet.agents["second"].stop()
    undrained = cli(fleet, "agents", "undrain", "first")
    assert undrained.returncode == 0, undrained.stderr
    assert "first takes new work again" in undrained.stdout
    fleet.wait_until(
        lambda: agent_state(fleet, "first") == agent_pb2.AGENT_STATE_CONNECTED, 30, "undrained"
    )
    after = fleet.watch_until(fleet.create(sleep_ms=10).id, completed)
    assert after.execution_summary.worker_id == "first"

    unknown = cli(fleet, "agents", "undrain", "nobody")
    assert unknown.returncode != 0
    assert "nobody" in unknown.stderr


def test_runs_delete_removes_a_finished_run_and_refuses_an_active_one(fleet: Cluster) -> None:
    fleet.add_agent("worker")
    done = fleet.watch_until(fleet.create(sleep_ms=10).id, completed)
    active = fleet.watch_until(fleet.create(sleep_ms=60_000, progress_steps=1).id, running)

    refused = cli(fleet, "runs", "delete", active.id)
    assert refused.returncode != 0
    assert "only finished runs can be deleted" in refused.stderr
    assert fleet.get(active.id).state == S.OP_RUN_STATE_RUNNING

    deleted = cli(fleet, "runs", "delete", done.id)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.strip() == f"deleted {done.id}"
    with pytest.raises(grpc.RpcError) as missing:
        fleet.get(done.id)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as again:
        fleet.runs.DeleteOpRun(op_run_service_pb2.DeleteOpRunRequest(run_id=done.id), timeout=10)
    assert again.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as precondition:
        fleet.runs.DeleteOpRun(op_run_service_pb2.DeleteOpRunRequest(run_id=active.id), timeout=10)
    assert precondition.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def _topic_run(cluster: Cluster, topic: str) -> Any:
    inputs = struct_pb2.Struct()
    inputs.update({"sleep_ms": 0, "progress_steps": 1})
    return cluster.runs.CreateOpRun(
        op_run_service_pb2.CreateOpRunRequest(
            image="scripted", inputs=inputs, event_delivery=S.EventDelivery(topic=topic)
        ),
        timeout=10,
    ).op_run


def _topic_runs(cluster: Cluster, topic: str) -> list[str]:
    stream = cluster.runs.SubscribeEvents(
        op_run_service_pb2.SubscribeEventsRequest(topic=topic, after_offset=0), timeout=3
    )
    seen: list[str] = []
    try:
        for record in stream:
            seen.append(record.run_id)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return seen


def test_retention_deletes_finished_runs_with_their_topic_records(retaining: Cluster) -> None:
    retaining.add_agent("worker")
    active = retaining.watch_until(retaining.create(sleep_ms=60_000, progress_steps=1).id, running)
    old = retaining.watch_until(_topic_run(retaining, "jobs").id, completed)

    def gone() -> bool:
        try:
            retaining.get(old.id)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.NOT_FOUND
        return False

    retaining.wait_until(gone, 30, "the finished run deleted by retention")
    assert retaining.get(active.id).state == S.OP_RUN_STATE_RUNNING
    fresh = retaining.watch_until(_topic_run(retaining, "jobs").id, completed)
    # A subscriber reading the topic from its start gets what remains, in order.
    assert set(_topic_runs(retaining, "jobs")) <= {fresh.id}
    assert "finished runs deleted by retention" in retaining.server.log_path.read_text()


@pytest.fixture
def cluster_on_sqlite(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    c.start_server()
    try:
        yield c
    finally:
        c.close()


def test_agent_on_stop_drain_finishes_its_run_before_exiting(cluster_on_sqlite: Cluster) -> None:
    c = cluster_on_sqlite
    proc = c.add_agent("drainer", start=False)
    proc.args += ["--on-stop", "drain", "--log-format", "json"]
    proc.start()
    c.wait_agents({"drainer"})
    run = c.watch_until(c.create(sleep_ms=1500, progress_steps=2).id, running)
    assert proc.popen is not None
    proc.popen.send_signal(signal.SIGTERM)
    done = c.watch_until(run.id, completed)
    assert done.execution_summary.worker_id == "drainer"
    assert proc.popen.wait(30) == 0
    lines = [json.loads(line) for line in proc.log_path.read_text().splitlines() if line]
    assert any(line["msg"].startswith("agent drainer drains before stopping") for line in lines)
    assert all({"time", "level", "logger", "msg"} <= line.keys() for line in lines)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def test_lifecycle_log_lines_and_metrics(tmp_path: Path) -> None:
    server_metrics, agent_metrics = free_port(), free_port()
    c = Cluster(tmp_path)
    c.server.args += ["--metrics-port", str(server_metrics)]
    c.start_server()
    try:
        proc = c.add_agent("node", gpus="1x24G", start=False)
        proc.args += ["--metrics-port", str(agent_metrics)]
        proc.start()
        c.wait_agents({"node"})
        ok = c.watch_until(c.create(sleep_ms=50, cpu=1, vram_mb=1000).id, completed)
        failed = c.create(exit_code=3)
        c.watch_until(failed.id, lambda r: r.state == S.OP_RUN_STATE_FAILED)
        running_run = c.watch_until(c.create(sleep_ms=60_000, cpu=1).id, running)

        events = [json.loads(line) for line in c.server.log_path.read_text().splitlines()]
        mine = [e for e in events if e.get("logger") == "gyoza.runs" and e["run_id"] == ok.id]
        assert [e["msg"] for e in mine] == [
            "run created",
            "run assigned",
            "run started",
            "run finished",
        ]
        assert mine[1]["agent"] == "node" and mine[1]["queue_wait_s"] >= 0
        assert mine[3]["state"] == "COMPLETED" and mine[3]["duration_s"] >= 0.05
        end = next(
            e
            for e in events
            if e.get("logger") == "gyoza.runs"
            and e["run_id"] == failed.id
            and e["msg"] == "run finished"
        )
        assert (end["state"], end["failure_class"]) == ("FAILED", "EXIT_CODE")

        text = _scrape(server_metrics)
        assert 'gyoza_run_queue_wait_seconds_count{definition=""}' in text
        assert 'gyoza_run_duration_seconds_count{definition="",state="COMPLETED"} 1.0' in text
        assert 'gyoza_run_duration_seconds_count{definition="",state="FAILED"} 1.0' in text
        assert 'gyoza_agent_cpu_reserved{agent="node"} 1.0' in text
        assert 'gyoza_agent_gpu_vram_mb{agent="node",gpu="0"}' in text
        assert 'gyoza_agent_accepting{agent="node"} 1.0' in text

        text = _scrape(agent_metrics)
        assert (
            'gyoza_agent_executor_outcomes_total{failure_class="",outcome="COMPLETED"} 1.0' in text
        )
        assert 'outcome="FAILED"} 1.0' in text
        assert "gyoza_agent_held_attempts 1.0" in text
        assert "gyoza_agent_outbox_reports" in text
        assert "gyoza_agent_connected 1.0" in text
        assert "gyoza_agent_reconnects_total 0.0" in text
        assert running_run.execution_summary.worker_id == "node"
    finally:
        c.close()
