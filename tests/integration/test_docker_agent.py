"""A real agent running real containers survives its own death (kill -9) mid-run, and
its stop (SIGTERM), leaving the container to the next agent process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf import struct_pb2

from gyoza.api.v1 import op_run_service_pb2, resources_pb2

S = resources_pb2
IMAGE = "gyoza-test/steps:latest"

# Reports progress in steps; between steps it waits for a file (or a short time), so the
# test decides when the op may go on, without sleeping for it.
STEPS_OP = r"""#!/bin/sh
set -eu
out=${GYOZA_OUTPUTS_DIR:-/gyoza/outputs}
for step in 1 2 3 4; do
    echo "step $step"
    printf '::gyoza::{"type":"progress","progress":%d}\n' $((step * 25))
    if [ "$step" = 1 ]; then
        while [ ! -e "$out/go" ]; do sleep 0.05; done
    fi
done
printf '{"steps":4}' >"$out/outputs.json"
"""


@pytest.fixture(scope="module")
def steps_image(docker_client: Any, test_image: str, tmp_path_factory: Any) -> str:
    context: Path = tmp_path_factory.mktemp("steps-op")
    (context / "op.sh").write_text(STEPS_OP)
    (context / "Dockerfile").write_text(
        f'FROM {test_image}\nCOPY op.sh /op.sh\nENTRYPOINT ["/bin/sh", "/op.sh"]\n'
    )
    docker_client.images.build(path=str(context), tag=IMAGE, rm=True, network_mode="none")
    return IMAGE


def _create(cluster: Any) -> str:
    request = op_run_service_pb2.CreateOpRunRequest(image=IMAGE, inputs=struct_pb2.Struct())
    return str(cluster.runs.CreateOpRun(request, timeout=10).op_run.id)


def _container(docker_client: Any, run_id: str) -> Any:
    (container,) = docker_client.containers.list(
        all=True, filters={"label": f"gyoza.run_id={run_id}"}
    )
    return container


def _go(docker_client: Any, run_id: str, state_dir: Path) -> None:
    """Let the op past its first step (the outputs folder is mounted from the agent)."""
    container = _container(docker_client, run_id)
    mounts = {m["Destination"]: m["Source"] for m in container.attrs["Mounts"]}
    Path(mounts["/gyoza/outputs"], "go").touch()


def _check_once(cluster: Any, run_id: str) -> None:
    (attempt,) = cluster.attempts(run_id)
    types = [S.EventType.Name(e.type) for e in attempt.events]
    assert types.count("EVENT_TYPE_STARTED") == 1
    assert types[-1] == "EVENT_TYPE_COMPLETED" and types.count("EVENT_TYPE_COMPLETED") == 1
    progress = [e.progress for e in attempt.events if e.type == S.EVENT_TYPE_PROGRESS]
    assert progress == [25, 50, 75, 100]
    logs = cluster.runs.GetOpRunLogs(op_run_service_pb2.GetOpRunLogsRequest(run_id=run_id))
    lines = [line.text for batch in logs for line in batch.lines]
    assert lines == ["step 1", "step 2", "step 3", "step 4"]


def _first_progress(run: Any) -> bool:
    return any(e.type == S.EVENT_TYPE_PROGRESS for e in run.events)


def _ended(run: Any) -> bool:
    return run.state in (
        S.OP_RUN_STATE_COMPLETED,
        S.OP_RUN_STATE_FAILED,
        S.OP_RUN_STATE_CANCELLED,
    )


def test_running_container_is_adopted_after_agent_kill(
    patient_cluster: Any, docker_client: Any, steps_image: str
) -> None:
    cluster = patient_cluster
    agent = cluster.add_agent("d1", executor="docker")
    run_id = _create(cluster)
    cluster.watch_until(run_id, _first_progress)
    agent.kill9()
    agent.start()  # finds the container by its labels and follows it again
    _go(docker_client, run_id, cluster.tmp)
    done = cluster.watch_until(run_id, _ended, timeout=60)
    assert done.state == S.OP_RUN_STATE_COMPLETED, done
    assert dict(done.outputs) == {"steps": 4}
    _check_once(cluster, run_id)


def test_sigterm_leaves_the_container_running_for_the_next_agent_process(
    patient_cluster: Any, docker_client: Any, steps_image: str
) -> None:
    cluster = patient_cluster
    agent = cluster.add_agent("d1", executor="docker")
    run_id = _create(cluster)
    cluster.watch_until(run_id, _first_progress)
    agent.stop()  # SIGTERM; the default --on-stop leave exits without touching it
    assert agent.popen is not None and agent.popen.returncode == 0
    container = _container(docker_client, run_id)
    container.reload()
    assert container.status == "running"
    agent.start()
    _go(docker_client, run_id, cluster.tmp)
    done = cluster.watch_until(run_id, _ended, timeout=60)
    assert done.state == S.OP_RUN_STATE_COMPLETED, done
    _check_once(cluster, run_id)


def test_container_that_ended_while_the_agent_was_down_is_reported(
    patient_cluster: Any, docker_client: Any, steps_image: str
) -> None:
    cluster = patient_cluster
    agent = cluster.add_agent("d1", executor="docker")
    run_id = _create(cluster)
    cluster.watch_until(run_id, _first_progress)
    agent.kill9()
    _go(docker_client, run_id, cluster.tmp)
    assert _container(docker_client, run_id).wait(timeout=30)["StatusCode"] == 0
    agent.start()
    done = cluster.watch_until(run_id, _ended, timeout=60)
    assert done.state == S.OP_RUN_STATE_COMPLETED, done
    _check_once(cluster, run_id)


def test_agent_start_removes_containers_of_attempts_it_no_longer_holds(
    patient_cluster: Any, docker_client: Any, test_image: str
) -> None:
    from gyoza.agent.docker.contract import LABEL_AGENT, LABEL_ATTEMPT, LABEL_RUN_ID

    labels = {LABEL_AGENT: "d1", LABEL_RUN_ID: "run_0123456789ab", LABEL_ATTEMPT: "1"}
    leftover = docker_client.containers.create(
        test_image, ["true"], labels=labels, network_mode="none"
    )
    try:
        patient_cluster.add_agent("d1", executor="docker")  # returns once connected
        remaining = docker_client.containers.list(
            all=True, filters={"label": f"{LABEL_RUN_ID}=run_0123456789ab"}
        )
        assert remaining == []
    finally:
        for container in docker_client.containers.list(all=True, filters={"id": leftover.id}):
            container.remove(force=True)


BIG_INT_IMAGE = "gyoza-test/big-int:latest"


@pytest.fixture(scope="module")
def big_int_image(docker_client: Any, test_image: str, tmp_path_factory: Any) -> str:
    context: Path = tmp_path_factory.mktemp("big-int-op")
    # 2**53 + 1: a double (what a JSON number in a Struct is) cannot hold it.
    (context / "op.sh").write_text(
        "#!/bin/sh\nprintf '{\"big\":9007199254740993}' >/gyoza/outputs/outputs.json\n"
    )
    (context / "Dockerfile").write_text(
        f'FROM {test_image}\nCOPY op.sh /op.sh\nENTRYPOINT ["/bin/sh", "/op.sh"]\n'
    )
    docker_client.images.build(path=str(context), tag=BIG_INT_IMAGE, rm=True, network_mode="none")
    return BIG_INT_IMAGE


def test_an_integer_output_a_double_cannot_hold_fails_the_run_clearly(
    cluster: Any, big_int_image: str
) -> None:
    # The agent converts values as the server does: it never rounds 2**53 + 1 to
    # 2**53 silently; the run fails OUTPUT_INVALID and says which output and why.
    cluster.add_agent("d1", executor="docker")
    request = op_run_service_pb2.CreateOpRunRequest(image=big_int_image)
    run_id = str(cluster.runs.CreateOpRun(request, timeout=10).op_run.id)
    done = cluster.watch_until(run_id, _ended, timeout=60)
    assert done.state == S.OP_RUN_STATE_FAILED, done
    summary = done.execution_summary
    assert summary.failure_class == S.FAILURE_CLASS_OUTPUT_INVALID
    assert "outputs.big" in summary.error_message and "2**53" in summary.error_message


def test_the_readme_run_completes_with_empty_outputs(
    cluster: Any, docker_client: Any, test_image: str
) -> None:
    # README's grpcurl example: the busybox image's own command exits 0 and writes no
    # outputs file, which is a success with outputs {}.
    cluster.add_agent("d-readme", executor="docker")
    request = op_run_service_pb2.CreateOpRunRequest(image=test_image)
    run_id = str(cluster.runs.CreateOpRun(request, timeout=10).op_run.id)
    done = cluster.watch_until(run_id, _ended, timeout=60)
    assert done.state == S.OP_RUN_STATE_COMPLETED, done
    assert dict(done.outputs) == {}


SELECTOR = "executor = docker"


def test_docker_selector_never_lands_on_a_scripted_agent(
    cluster: Any, docker_client: Any, test_image: str
) -> None:
    # The scripted agent is the tighter fit: best fit alone would place the runs there.
    cluster.add_agent("scripted-small", extra=("--cpu", "0.15", "--ram-mb", "64"))
    cluster.add_agent("d1", executor="docker")
    run_ids = []
    for _ in range(3):
        request = op_run_service_pb2.CreateOpRunRequest(
            image=test_image,
            constraints=S.Constraints(cpu=0.1, selector=SELECTOR),
            retry_policy=S.RetryPolicy(max_attempts=1),
        )
        run_ids.append(cluster.runs.CreateOpRun(request, timeout=10).op_run.id)
    for run_id in run_ids:
        done = cluster.watch_until(run_id, _ended, timeout=60)
        assert done.execution_summary.worker_id == "d1", done
