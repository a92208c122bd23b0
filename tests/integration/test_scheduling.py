"""Scheduling rules through real processes: a server and scripted agents that declare
their GPUs and CPUs. Whole GPUs, the starvation bound, selectors, pending reasons and the
queue timeout, as a user of the API sees them."""

from __future__ import annotations

import subprocess
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from gyoza.api.v1 import op_run_pb2, op_run_service_pb2, resources_pb2

from .conftest import GYOZA, Cluster, event_types, free_port

S = resources_pb2


def _started(run: op_run_pb2.OpRun) -> bool:
    return run.state in (S.OP_RUN_STATE_RUNNING, S.OP_RUN_STATE_COMPLETED)


def _ended(run: op_run_pb2.OpRun) -> bool:
    return run.state in (S.OP_RUN_STATE_COMPLETED, S.OP_RUN_STATE_FAILED, S.OP_RUN_STATE_CANCELLED)


def _event_time(attempt: op_run_pb2.OpAttempt, kind: int) -> datetime:
    (event,) = [e for e in attempt.events if e.type == kind]
    return event.time.ToDatetime()


def _window(cluster: Cluster, run_id: str) -> tuple[datetime, datetime, str]:
    """When the (only) attempt started and ended, and on which agent."""
    (attempt,) = cluster.attempts(run_id)
    return (
        _event_time(attempt, S.EVENT_TYPE_STARTED),
        _event_time(attempt, S.EVENT_TYPE_COMPLETED),
        attempt.execution_summary.worker_id,
    )


def _reason_events(cluster: Cluster, run_id: str) -> list[str]:
    """The pending reasons recorded in the current attempt's timeline."""
    run = cluster.get(run_id)
    return [
        e.payload["pending_reason"]
        for e in run.events
        if e.type == S.EVENT_TYPE_INFO and "pending_reason" in e.payload
    ]


def _wait_reason(cluster: Cluster, run_id: str, code: int) -> op_run_pb2.OpRun:
    cluster.wait_until(
        lambda: cluster.get(run_id).pending_reason.code == code,
        30,
        f"{run_id} pending with {S.PendingReasonCode.Name(code)}",
    )
    return cluster.get(run_id)


# -- a GPU asked for is a GPU held ---------------------------------------------------------


def test_gpu_runs_without_vram_never_share_a_gpu(cluster: Cluster) -> None:
    cluster.add_agent("one-gpu", gpus="1x80G")
    first = cluster.create(sleep_ms=1500, gpu_count=1)
    second = cluster.create(sleep_ms=1500, gpu_count=1)
    cluster.watch_until(first.id, _started)
    waiting = _wait_reason(cluster, second.id, S.PENDING_REASON_CODE_AGENTS_BUSY)
    assert waiting.state == S.OP_RUN_STATE_PENDING
    for run in (first, second):
        cluster.watch_until(run.id, _ended)
    start_1, end_1, _ = _window(cluster, first.id)
    start_2, end_2, _ = _window(cluster, second.id)
    assert end_1 <= start_2 or end_2 <= start_1


def test_gpu_runs_with_vram_share_a_gpu_within_the_budget(cluster: Cluster) -> None:
    cluster.add_agent("one-gpu", gpus="1x80G")
    runs = [cluster.create(sleep_ms=60_000, gpu_count=1, vram_mb=30_000) for _ in range(3)]
    for run in runs[:2]:
        placed = cluster.watch_until(run.id, _started)
        assert list(placed.execution_summary.gpu_ids) == [0]
    # Both hold the GPU at once; the third does not fit the 80G budget.
    assert {cluster.get(r.id).state for r in runs[:2]} == {S.OP_RUN_STATE_RUNNING}
    _wait_reason(cluster, runs[2].id, S.PENDING_REASON_CODE_AGENTS_BUSY)
    for run in runs:
        cluster.runs.CancelOpRun(op_run_service_pb2.CancelOpRunRequest(run_id=run.id), timeout=10)


# -- no run starves --------------------------------------------------------------------------


@pytest.fixture
def starving_cluster(tmp_path: Path) -> Any:
    c = Cluster(tmp_path, server_args=("--starvation-s", "2"))
    c.start_server()
    try:
        yield c
    finally:
        c.close()


def test_a_large_run_starts_within_the_starvation_bound(starving_cluster: Cluster) -> None:
    cluster = starving_cluster
    cluster.add_agent("pair", extra=("--cpu", "2"))
    cluster.add_agent("side", extra=("--cpu", "1"))
    # The pair agent is busy with small runs when the large one arrives...
    early = [cluster.create(sleep_ms=1500, cpu=1) for _ in range(3)]
    for run in early:
        cluster.watch_until(run.id, _started)
    large = cluster.create(sleep_ms=200, cpu=2)
    # ...and a stream of small runs, all created after it, would keep taking the CPU
    # the pair agent frees one at a time.
    stream = [cluster.create(sleep_ms=1500, cpu=1) for _ in range(12)]
    cluster.watch_until(large.id, lambda r: r.state == S.OP_RUN_STATE_COMPLETED, timeout=60)
    for run in stream:
        cluster.watch_until(run.id, _ended, timeout=60)

    large_start, _, large_agent = _window(cluster, large.id)
    assert large_agent == "pair"
    windows = [_window(cluster, r.id) for r in stream]
    # Runs created after the large one did not postpone it forever: some of them still
    # had to wait for it...
    assert any(start >= large_start for start, _, agent in windows if agent == "pair")
    # ...and while the pair agent was held, small runs kept completing on the other one.
    assert any(end <= large_start for _, end, agent in windows if agent == "side")
    # The large run said it was being made room for, once.
    assert _reason_events(cluster, large.id).count("MAKING_ROOM") <= 1
    (attempt,) = cluster.attempts(large.id)
    reasons = [e.payload["pending_reason"] for e in attempt.events if "pending_reason" in e.payload]
    assert reasons == ["AGENTS_BUSY", "MAKING_ROOM"]


# -- selectors ---------------------------------------------------------------------------------


def test_selector_keeps_a_docker_run_off_scripted_agents(cluster: Cluster) -> None:
    # An operator label cannot pretend a scripted agent is a docker one.
    cluster.add_agent("scripted-1", extra=("--labels", "executor=docker,zone=eu-1"))
    (agent,) = cluster.list_agents()
    assert agent.labels["executor"] == "scripted"
    assert agent.labels["zone"] == "eu-1"
    assert agent.labels["gpu.count"] == "0"
    assert agent.labels["agent.version"]

    docker_only = cluster.create(sleep_ms=10, selector="executor=docker")
    waiting = _wait_reason(cluster, docker_only.id, S.PENDING_REASON_CODE_SELECTOR_UNMATCHED)
    assert waiting.pending_reason.message == "no agent matches selector executor=docker"
    assert waiting.state == S.OP_RUN_STATE_PENDING

    in_zone = cluster.create(sleep_ms=10, selector="zone in (eu-1, eu-2), executor != docker")
    placed = cluster.watch_until(in_zone.id, _ended)
    assert placed.execution_summary.worker_id == "scripted-1"
    assert placed.constraints.selector == "zone in (eu-1, eu-2), executor != docker"
    assert cluster.get(docker_only.id).state == S.OP_RUN_STATE_PENDING


def test_a_selector_that_cannot_be_parsed_is_refused(cluster: Cluster) -> None:
    import grpc

    with pytest.raises(grpc.RpcError) as caught:
        cluster.create(selector="zone in (eu-1")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "selector" in (caught.value.details() or "")


# -- pending reasons --------------------------------------------------------------------------


def test_pending_reason_follows_the_fleet_and_is_recorded_once(tmp_path: Path) -> None:
    metrics_port = free_port()
    cluster = Cluster(tmp_path, server_args=("--metrics-port", str(metrics_port)))
    cluster.start_server()
    try:
        cluster.add_agent("small", extra=("--cpu", "2"))
        big = cluster.create(sleep_ms=10, cpu=64)
        gpu = cluster.create(sleep_ms=10, gpu_count=1)
        waiting = _wait_reason(cluster, big.id, S.PENDING_REASON_CODE_INSUFFICIENT_CPU)
        assert waiting.pending_reason.message == "needs 64 CPU; the largest agent has 2"
        waiting = _wait_reason(cluster, gpu.id, S.PENDING_REASON_CODE_INSUFFICIENT_GPU)
        assert waiting.pending_reason.message == "needs 1 GPU; no agent has a GPU"
        # ListOpRuns shows the reason too.
        listed = cluster.runs.ListOpRuns(op_run_service_pb2.ListOpRunsRequest(), timeout=10)
        by_id = {r.id: r for r in listed.op_runs}
        assert by_id[big.id].pending_reason.code == S.PENDING_REASON_CODE_INSUFFICIENT_CPU
        # So does the CLI.
        shown = subprocess.run(
            [GYOZA, "--server", cluster.address, "runs", "get", big.id],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
        assert "needs 64 CPU; the largest agent has 2" in shown
        # The metric counts both as unschedulable.
        cluster.wait_until(
            lambda: _gauge(metrics_port, "gyoza_runs_unschedulable") == 2.0, 30, "metric at 2"
        )
        # More agent traffic (other runs placed) records nothing new.
        for _ in range(3):
            cluster.watch_until(cluster.create(sleep_ms=10).id, _ended)
        cluster.wait_until(
            lambda: _reason_events(cluster, big.id) == ["INSUFFICIENT_CPU"], 30, "one event"
        )
        # The fleet changes: a big agent comes and the run starts there.
        cluster.add_agent("big", gpus="1x24G", extra=("--cpu", "64"))
        done = cluster.watch_until(big.id, _ended)
        assert done.state == S.OP_RUN_STATE_COMPLETED
        assert not done.HasField("pending_reason")
        assert cluster.watch_until(gpu.id, _ended).state == S.OP_RUN_STATE_COMPLETED
        cluster.wait_until(
            lambda: _gauge(metrics_port, "gyoza_runs_unschedulable") == 0.0, 30, "metric at 0"
        )
        assert event_types(list(done.events))[0] == "INFO"
    finally:
        cluster.close()


def _gauge(port: int, name: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


# -- queue timeout -----------------------------------------------------------------------------


def test_queue_timeout_fails_the_run_with_its_own_class(cluster: Cluster) -> None:
    cluster.add_agent("small", extra=("--cpu", "2"))
    stuck = cluster.create(cpu=64, queue_timeout_seconds=1.0)
    failed = cluster.watch_until(stuck.id, _ended)
    assert failed.state == S.OP_RUN_STATE_FAILED
    assert failed.execution_summary.failure_class == S.FAILURE_CLASS_QUEUE_TIMEOUT
    assert "queue timeout of 1s" in failed.execution_summary.error_message
    assert not failed.HasField("next_retry_time")  # not retried by the default policy
    # A run that is placed in time is not affected.
    fine = cluster.create(sleep_ms=10, cpu=1, queue_timeout_seconds=30.0)
    assert cluster.watch_until(fine.id, _ended).state == S.OP_RUN_STATE_COMPLETED


def test_queue_timeout_is_retried_when_the_policy_says_so(cluster: Cluster) -> None:
    cluster.add_agent("small", extra=("--cpu", "2"))
    stuck = cluster.create(
        cpu=64,
        queue_timeout_seconds=0.5,
        max_attempts=2,
        retry_on=(S.FAILURE_CLASS_QUEUE_TIMEOUT,),
    )
    cluster.wait_until(lambda: len(cluster.attempts(stuck.id)) == 2, 30, "a second attempt")
    final = cluster.watch_until(stuck.id, lambda r: r.current_attempt == 2 and _ended(r))
    assert final.execution_summary.failure_class == S.FAILURE_CLASS_QUEUE_TIMEOUT
    attempts = cluster.attempts(stuck.id)
    assert [a.execution_summary.failure_class for a in attempts] == [
        S.FAILURE_CLASS_QUEUE_TIMEOUT
    ] * 2
