"""What a run records, end to end: declared outputs are kept or the run fails naming what
broke them; an event's time is when it happened on the agent, also after an outage."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from google.protobuf import struct_pb2

from gyoza.api.v1 import (
    definition_service_pb2,
    definition_service_pb2_grpc,
    op_definition_pb2,
    op_run_pb2,
    op_run_service_pb2,
    resources_pb2,
)

S = resources_pb2


def _ended(run: op_run_pb2.OpRun) -> bool:
    return run.state in (
        S.OP_RUN_STATE_COMPLETED,
        S.OP_RUN_STATE_FAILED,
        S.OP_RUN_STATE_CANCELLED,
    )


def _running(run: op_run_pb2.OpRun) -> bool:
    return run.state == S.OP_RUN_STATE_RUNNING


def _deploy_with_outputs(cluster: Any) -> None:
    stub = definition_service_pb2_grpc.DefinitionServiceStub(cluster.channel)
    definition = op_definition_pb2.OpDefinition(
        name="measure",
        image="scripted",
        inputs=[
            resources_pb2.InputSpec(name="outputs", type=S.INPUT_TYPE_OBJECT),
            resources_pb2.InputSpec(name="progress_steps", type=S.INPUT_TYPE_INT),
        ],
        outputs=[
            resources_pb2.OutputSpec(name="url", type=S.INPUT_TYPE_STRING, required=True),
            resources_pb2.OutputSpec(name="count", type=S.INPUT_TYPE_INT, required=True),
        ],
        retry_policy=resources_pb2.RetryPolicy(max_attempts=1),
    )
    stub.CreateOpDefinition(
        definition_service_pb2.CreateOpDefinitionRequest(op_definition=definition), timeout=10
    )


def _run_measure(cluster: Any, outputs: dict[str, Any]) -> op_run_pb2.OpRun:
    inputs = struct_pb2.Struct()
    inputs.update({"outputs": outputs, "progress_steps": 1})
    created = cluster.runs.CreateOpRun(
        op_run_service_pb2.CreateOpRunRequest(op_definition="measure", inputs=inputs), timeout=10
    ).op_run
    return cluster.watch_until(created.id, _ended)


def test_declared_outputs_are_kept_or_the_run_fails_naming_every_violation(cluster: Any) -> None:
    cluster.add_agent("a1")
    _deploy_with_outputs(cluster)

    good = _run_measure(cluster, {"url": "s3://bucket/x", "count": 3, "extra": True})
    assert good.state == S.OP_RUN_STATE_COMPLETED, good
    assert dict(good.outputs)["url"] == "s3://bucket/x"

    bad = _run_measure(cluster, {"count": "three"})
    assert bad.state == S.OP_RUN_STATE_FAILED, bad
    summary = bad.execution_summary
    assert summary.failure_class == S.FAILURE_CLASS_OUTPUT_INVALID
    assert "outputs.url is required (STRING)" in summary.error_message
    assert "outputs.count expected INT, got STRING" in summary.error_message


def test_event_times_are_the_agents_and_survive_a_server_outage(cluster: Any) -> None:
    cluster.add_agent("a1")
    run = cluster.create(sleep_ms=3_000, progress_steps=6)
    cluster.watch_until(run.id, _running)
    cluster.server.kill9()
    time.sleep(1.0)  # the outage: the agent goes on and keeps its reports in its outbox
    back = datetime.now(UTC)
    cluster.start_server()
    done = cluster.watch_until(run.id, _ended, timeout=60)
    assert done.state == S.OP_RUN_STATE_COMPLETED, done

    (attempt,) = cluster.attempts(run.id)
    times = [
        (e.time.ToDatetime(tzinfo=UTC), e.apply_time.ToDatetime(tzinfo=UTC)) for e in attempt.events
    ]
    assert all(happened <= applied for happened, applied in times)
    assert [happened for happened, _ in times] == sorted(happened for happened, _ in times)
    replayed = [(h, a) for h, a in times if h < back <= a]
    assert replayed, "no event happened during the outage and was applied after it"
    progress = [e for e in attempt.events if e.type == S.EVENT_TYPE_PROGRESS]
    assert [e.message for e in progress] == [f"step {i}/6" for i in range(1, 7)]
