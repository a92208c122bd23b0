"""DockerExecutor against the real Docker engine, with an in-memory ReportSink."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from gyoza.agent.docker_executor import DockerExecutor
from gyoza.agent.executor import Assignment
from gyoza.models.resources import Constraints, EventType, FailureClass

pytestmark = pytest.mark.docker

T = TypeVar("T")
ExecutorFactory = Callable[..., DockerExecutor]
SinkFactory = Callable[[], Any]


def run(coro: Coroutine[Any, Any, T], limit_s: float = 60) -> T:
    """Run a test's async body on a fresh event loop, with a deadline."""
    return asyncio.run(asyncio.wait_for(coro, limit_s))


def new_run_id() -> str:
    return f"run-{uuid.uuid4().hex[:12]}"


def scenario(image: str, name: str, **kwargs: Any) -> Assignment:
    inputs = {"scenario": name, **kwargs.pop("inputs", {})}
    return Assignment(run_id=new_run_id(), attempt=1, image=image, inputs=inputs, **kwargs)


def container_exists(docker_client: Any, container_id: str) -> bool:
    return bool(docker_client.containers.list(all=True, filters={"id": container_id}))


# -- a run from start to end ------------------------------------------------------------------


def test_hello_op_reports_progress_and_outputs(
    new_sink: SinkFactory,
    make_executor: ExecutorFactory,
    op_images: dict[str, str],
    docker_client: Any,
) -> None:
    assignment = Assignment(
        run_id=new_run_id(), attempt=1, image=op_images["hello"], inputs={"name": "gyoza"}
    )
    sink = new_sink()

    async def body() -> None:
        async with make_executor() as executor:
            await executor.start(assignment, sink)
            assert sink.types == [EventType.STARTED]
            assert executor.held == [assignment.key]
            await executor.join(*assignment.key)
            assert executor.held == []
            files = executor.attempt_files(assignment.run_id, assignment.attempt)
            assert not files.root.exists()

    run(body())
    assert sink.types == [
        EventType.STARTED,
        EventType.INFO,
        EventType.PROGRESS,
        EventType.PROGRESS,
        EventType.PROGRESS,
        EventType.COMPLETED,
    ]
    started, info, *progress, completed = sink.events
    assert started.payload is not None
    assert started.payload["worker_id"] == started.payload["agent"]
    assert started.payload["gpu_ids"] == []
    assert info.message == "greeting gyoza"
    assert [p.progress for p in progress] == [33, 66, 100]
    assert [p.message for p in progress] == ["step 1 of 3", "step 2 of 3", "step 3 of 3"]
    assert completed.outputs == {"greeting": "hello, gyoza", "steps": 3}
    assert completed.exit_code == 0
    assert completed.failure_class is None
    assert completed.duration_ms is not None and completed.duration_ms >= 0
    # Each stream keeps its order; how the two interleave is up to Docker's log copiers.
    assert [text for text, stream in sink.lines if stream == "stdout"] == [
        "working on step 1",
        "working on step 2",
        "working on step 3",
    ]
    assert [text for text, stream in sink.lines if stream == "stderr"] == [
        "this line goes to stderr"
    ]
    # The cursor counts every output line (events too), after STARTED's 1.
    assert completed.cursor == 1 + 8
    assert started.payload["container_id"]
    assert not container_exists(docker_client, started.payload["container_id"])


def test_container_gets_the_contract(
    new_sink: SinkFactory, make_executor: ExecutorFactory, op_images: dict[str, str]
) -> None:
    assignment = scenario(
        op_images["scenarios"], "env", inputs={"nested": {"a": [1, 2]}, "text": "x y"}
    )
    sink = new_sink()

    async def body() -> None:
        async with make_executor() as executor:
            await executor.start(assignment, sink)
            await sink.wait_terminal()
            await executor.join(*assignment.key)

    run(body())
    end = sink.terminal
    assert end is not None and end.type is EventType.COMPLETED, end
    assert end.outputs == {
        "run_id": assignment.run_id,
        "attempt": "1",
        "gpu_ids": "",
        "visible": "void",
        "inputs_file": assignment.inputs,
        "inputs_env": assignment.inputs,
        "inputs_ro": True,
        "nets": "lo ",
        "inputs_file_env": "/gyoza/inputs.json",
        "outputs_dir_env": "/gyoza/outputs",
    }


def test_marked_lines_become_events_and_malformed_ones_stay_logs(
    new_sink: SinkFactory,
    make_executor: ExecutorFactory,
    op_images: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    assignment = scenario(op_images["scenarios"], "malformed")
    sink = new_sink()

    async def body() -> None:
        async with make_executor() as executor:
            await executor.start(assignment, sink)
            await sink.wait_terminal()
            await executor.join(*assignment.key)

    with caplog.at_level(logging.WARNING, logger="gyoza.agent.docker.reporting"):
        run(body())
    assert sink.types == [
        EventType.STARTED,
        EventType.PROGRESS,
        EventType.ERROR,
        EventType.COMPLETED,
    ]
    progress, error = sink.events[1:3]
    assert (progress.progress, progress.message) == (70, "fine")
    assert (error.message, error.payload) == ("recoverable", {"code": 7})
    assert sink.lines == [
        ("::gyoza::{not json", "stdout"),
        ('::gyoza::{"type":"bogus","message":"x"}', "stdout"),
        ('::gyoza::{"type":"progress","progress":"lots"}', "stdout"),
        ('::gyoza::["a list"]', "stdout"),
        ("last line without a newline", "stdout"),
    ]
    warnings = [r for r in caplog.records if "malformed event line" in r.getMessage()]
    assert len(warnings) == 4


def test_many_lines_arrive_once_and_in_order(
    new_sink: SinkFactory, make_executor: ExecutorFactory, op_images: dict[str, str]
) -> None:
    lines = 20_000
    assignment = scenario(op_images["scenarios"], "chatty", inputs={"lines": lines})
    sink = new_sink()

    async def body() -> float:
        async with make_executor() as executor:
            began = time.monotonic()
            await executor.start(assignment, sink)
            await sink.wait_terminal()
            await executor.join(*assignment.key)
            return time.monotonic() - began

    elapsed = run(body())
    assert sink.terminal is not None and sink.terminal.type is EventType.COMPLETED
    assert sink.lines == [(str(i), "stdout") for i in range(1, lines + 1)]
    batches = [r for r in sink.reports if isinstance(r, list)]
    print(f"{lines} lines in {elapsed:.2f} s, {len(batches)} log reports")


# -- failures ---------------------------------------------------------------------------------


def test_nonzero_exit_fails_with_code_and_last_lines(
    new_sink: SinkFactory, make_executor: ExecutorFactory, op_images: dict[str, str]
) -> None:
    assignment = scenario(op_images["scenarios"], "fail")
    sink = new_sink()

    async def body() -> None:
        async with make_executor() as executor:
            await executor.start(assignment, sink)
            await sink.wait_terminal()
            await executor.join(*assignment.key)

    run(body())
    end = sink.terminal
    assert end is not None
    assert (end.type, end.failure_class, end.exit_code) == (
        EventType.FAILED,
        FailureClass.EXIT_CODE,
        3,
    )
    assert end.error_message is not None
    assert "exited with code 3" in end.error_message
    assert "about to fail" in end.error_message
    assert "something went wrong" in end.error_message


def test_out_of_memory_fails_as_oom(
    new_sink: SinkFactory, make_executor: ExecutorFactory, op_images: dict[str, str]
) -> None:
    assignment = scenario(op_images["scenarios"], "oom", constraints=Constraints(ram_mb=8))
    sink = new_sink()

    async def body() -> None:
        async with make_executor() as executor:
            await executor.start(assignment, sink)
            await sink.wait_terminal()
            await executor.join(*assignment.key)

    run(body())
    end = sink.terminal
    assert end is not None
    assert (end.type, end.failure_class) == (EventType.FAILED, FailureClass.OOM), end
    assert end.error_message is not None and "8 MiB" in end.error_message


def test_time_limit_stops_the_container(
    new_sink: SinkFactory, make_executor: ExecutorFactory, op_images: dict[str, str]
) -> None:
    assignment = scenario(op_images["scenarios"], "sleep", constraints=Constraints(timeout_s=1))
    sink = new_sink()

    async def body() -> float:
        async with make_executor() as executor:
            began = time.monotonic()
            await executor.start(assignment, sink)
            await sink.wait_terminal()
            await executor.join(*assignment.key)
            return time.monotonic() - began

    elapsed = run(body())
    end = sink.terminal
    assert end is not None
    assert (end.type, end.failure_class) == (EventType.FAILED, FailureClass.TIMEOUT), end
    assert end.error_message is not None and "time limit of 1 s" in end.error_message
    assert 1.0 <= elapsed < 3.0, elapsed


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("bad_outputs", "not valid JSON"),
        ("array_outputs", "must hold a JSON object, not list"),
        ("big_outputs", "the limit is 1048576"),
    ],
)
def test_exit_zero_with_invalid_outputs_fails(
    new_sink: SinkFactory,
    make_executor: ExecutorFactory,
    op_images: dict[str, str],
    name: str,
    reason: str,
) -> None:
    assignment = scenario(op_images["scenarios"], name)
    sink = new_sink()

    async def body() -> None:
        async with make_executor() as executor:
            await executor.start(assignment, sink)
            await sink.wait_terminal()
            await executor.join(*assignment.key)

    run(body())
    end = sink.terminal
    assert end is not None
    assert (end.type, end.failure_class, end.exit_code) == (
        EventType.FAILED,
        FailureClass.OUTPUT_INVALID,
        0,
    )
    assert end.error_message is not None and reason in end.error_message


def test_exit_zero_without_outputs_file_completes_with_empty_outputs(
    new_sink: SinkFactory, make_executor: ExecutorFactory, op_images: dict[str, str]
) -> None:
    assignment = scenario(op_images["scenarios"], "no_outputs")
    sink = new_sink()

    async def body() -> None:
        async with make_executor() as executor:
            await executor.start(assignment, sink)
            await sink.wait_terminal()
            await executor.join(*assignment.key)

    run(body())
    end = sink.terminal
    assert end is not None
    assert (end.type, end.outputs, end.exit_code) == (EventType.COMPLETED, {}, 0), end


def test_missing_image_fails_fast(
    new_sink: SinkFactory, make_executor: ExecutorFactory, docker_client: Any
) -> None:
    assignment = Assignment(run_id=new_run_id(), attempt=1, image="gyoza-test/no-such-image:never")
    sink = new_sink()

    async def body() -> float:
        async with make_executor() as executor:
            began = time.monotonic()
            await executor.start(assignment, sink)
            return time.monotonic() - began

    elapsed = run(body())
    assert sink.types == [EventType.FAILED]
    end = sink.events[0]
    assert end.failure_class is FailureClass.IMAGE_MISSING
    assert end.error_message is not None
    assert "gyoza-test/no-such-image:never" in end.error_message
    assert elapsed < 10, elapsed


@pytest.fixture
def silent_registry() -> Iterator[int]:
    """A TCP port that accepts connections and never answers: a hung registry."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            accepted.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        server.close()


def test_pull_that_stalls_fails_after_the_stall_timeout(
    new_sink: SinkFactory, make_executor: ExecutorFactory, silent_registry: int
) -> None:
    assignment = Assignment(
        run_id=new_run_id(), attempt=1, image=f"127.0.0.1:{silent_registry}/gyoza/stuck:1"
    )
    sink = new_sink()

    async def body() -> float:
        async with make_executor(pull_stall_timeout_s=1) as executor:
            began = time.monotonic()
            await executor.start(assignment, sink)
            return time.monotonic() - began

    elapsed = run(body())
    assert sink.types == [EventType.FAILED]
    assert sink.events[0].failure_class is FailureClass.IMAGE_MISSING
    assert elapsed < 5, elapsed


def test_gpus_reach_the_device_request(
    new_sink: SinkFactory,
    make_executor: ExecutorFactory,
    op_images: dict[str, str],
    docker_client: Any,
    agent_name: str,
) -> None:
    assignment = Assignment(
        run_id=new_run_id(),
        attempt=2,
        image=op_images["scenarios"],
        constraints=Constraints(cpu=0.5, ram_mb=64, vram_mb=1000, gpu_count=2),
        gpu_ids=(0, 3),
        gpu_uuids=("GPU-11111111-aaaa", "GPU-22222222-bbbb"),
    )
    sink = new_sink()
    created: list[dict[str, Any]] = []

    async def inspect(container_id: str) -> None:
        created.append(await asyncio.to_thread(docker_client.api.inspect_container, container_id))

    async def body() -> None:
        async with make_executor(on_created=inspect) as executor:
            await executor.start(assignment, sink)

    run(body())
    [info] = created
    host = info["HostConfig"]
    [request] = host["DeviceRequests"]
    assert request["Driver"] == "nvidia"
    assert request["DeviceIDs"] == ["GPU-11111111-aaaa", "GPU-22222222-bbbb"]
    assert request["Capabilities"] == [["gpu"]]
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == host["MemorySwap"] == 64 * 1024 * 1024
    assert host["Init"] is True
    assert host["NetworkMode"] == "none"
    env = dict(item.split("=", 1) for item in info["Config"]["Env"])
    assert env["NVIDIA_VISIBLE_DEVICES"] == "GPU-11111111-aaaa,GPU-22222222-bbbb"
    assert env["GYOZA_GPU_IDS"] == "0,3"
    assert env["GYOZA_ATTEMPT"] == "2"
    assert info["Config"]["Labels"] == {
        "gyoza.run_id": assignment.run_id,
        "gyoza.attempt": "2",
        "gyoza.agent": agent_name,
        "org.gyoza.test-image": "busybox",  # inherited from the image
    }
    # No GPU on this machine: start fails, the container is removed, the report says why.
    assert sink.types == [EventType.FAILED]
    end = sink.events[0]
    assert end.failure_class is FailureClass.EXECUTOR_ERROR
    assert end.error_message is not None and end.error_message.startswith("start: ")
    assert not container_exists(docker_client, info["Id"])


# -- cancel ------------------------------------------------------------------------------------


def test_cancel_stops_a_running_op(
    new_sink: SinkFactory,
    make_executor: ExecutorFactory,
    op_images: dict[str, str],
    docker_client: Any,
) -> None:
    assignment = scenario(op_images["scenarios"], "sleep")
    sink = new_sink()

    async def body() -> float:
        async with make_executor(stop_grace_s=5) as executor:
            await executor.start(assignment, sink)
            await sink.wait_for(lambda s: EventType.PROGRESS in s.types)
            began = time.monotonic()
            await executor.cancel(assignment.run_id, assignment.attempt, "user asked")
            elapsed = time.monotonic() - began
            # Once cancel returns the attempt is over and reported.
            assert sink.terminal is not None
            await executor.cancel(assignment.run_id, assignment.attempt, "again")  # no-op
            return elapsed

    elapsed = run(body())
    assert sink.types == [EventType.STARTED, EventType.PROGRESS, EventType.CANCELLED]
    end = sink.events[-1]
    assert end.failure_class is FailureClass.CANCELLED
    assert end.message == "user asked"
    assert elapsed < 5, f"TERM should end it well within the grace: {elapsed:.2f} s"
    print(f"cancel took {elapsed * 1000:.0f} ms")


def test_cancel_kills_an_op_that_ignores_term_after_the_grace(
    new_sink: SinkFactory, make_executor: ExecutorFactory, op_images: dict[str, str]
) -> None:
    assignment = scenario(op_images["scenarios"], "ignore_term")
    sink = new_sink()

    async def body() -> float:
        async with make_executor(stop_grace_s=1) as executor:
            await executor.start(assignment, sink)
            await sink.wait_for(lambda s: EventType.PROGRESS in s.types)
            began = time.monotonic()
            await executor.cancel(assignment.run_id, assignment.attempt, "stop")
            return time.monotonic() - began

    elapsed = run(body())
    assert sink.types[-1] is EventType.CANCELLED
    assert 0.9 <= elapsed < 4, elapsed


def test_cancel_while_the_container_starts(
    new_sink: SinkFactory, make_executor: ExecutorFactory, op_images: dict[str, str]
) -> None:
    assignment = scenario(op_images["scenarios"], "sleep")
    sink = new_sink()
    cancels: list[asyncio.Task[None]] = []

    executors: list[DockerExecutor] = []

    async def cancel_soon(_container_id: str) -> None:
        # The task runs while start() waits for Docker to start the container.
        cancels.append(asyncio.create_task(executors[0].cancel(*assignment.key, "changed my mind")))

    async def body() -> None:
        async with make_executor(on_created=cancel_soon) as executor:
            executors.append(executor)
            await executor.start(assignment, sink)
            await cancels[0]
            assert executor.held == []

    run(body())
    assert sink.types in (
        [EventType.STARTED, EventType.CANCELLED],
        [EventType.STARTED, EventType.PROGRESS, EventType.CANCELLED],
    )
    assert sink.events[-1].message == "changed my mind"


def test_cancel_of_an_unknown_attempt_is_a_no_op(make_executor: ExecutorFactory) -> None:
    async def body() -> None:
        async with make_executor() as executor:
            await executor.cancel("no-such-run", 1, "whatever")

    run(body())


# -- adoption after an agent restart -----------------------------------------------------------


def test_adopt_a_running_container_reports_each_event_once(
    new_sink: SinkFactory,
    make_executor: ExecutorFactory,
    op_images: dict[str, str],
    docker_client: Any,
) -> None:
    assignment = scenario(op_images["scenarios"], "wait_file")
    sink = new_sink()  # stands for the outbox: it survives the agent

    async def body() -> None:
        async with make_executor() as first:
            await first.start(assignment, sink)
            await sink.wait_for(lambda s: ("before go", "stdout") in s.lines)
        # The first agent is gone; its container runs on.
        async with make_executor() as second:
            assert await second.adopt(assignment, sink)
            files = second.attempt_files(assignment.run_id, assignment.attempt)
            (files.outputs_dir / "go").touch()
            await sink.wait_terminal()
            await second.join(*assignment.key)

    run(body())
    assert sink.types == [
        EventType.STARTED,
        EventType.PROGRESS,
        EventType.PROGRESS,
        EventType.COMPLETED,
    ]
    assert [e.progress for e in sink.events[1:3]] == [10, 50]
    assert sink.terminal is not None and sink.terminal.outputs == {"went": True}
    assert sorted(sink.lines) == [
        ("after go", "stdout"),
        ("before go", "stdout"),
        ("finishing", "stderr"),
    ]
    assert sink.lines[0] == ("before go", "stdout")


def test_adopt_a_container_that_ended_while_the_agent_was_down(
    new_sink: SinkFactory,
    make_executor: ExecutorFactory,
    op_images: dict[str, str],
    docker_client: Any,
) -> None:
    # It lingers past its time limit after "go", with no agent to enforce it.
    assignment = scenario(
        op_images["scenarios"],
        "wait_file",
        inputs={"linger": "1.2"},
        constraints=Constraints(timeout_s=1),
    )
    sink = new_sink()

    async def body() -> None:
        async with make_executor() as first:
            await first.start(assignment, sink)
            await sink.wait_for(lambda s: EventType.PROGRESS in s.types)
            container_id = sink.events[0].payload["container_id"]  # type: ignore[index]
        # While no agent runs, the op goes on and exits; its time limit no longer applies.
        files = first.attempt_files(assignment.run_id, assignment.attempt)
        (files.outputs_dir / "go").touch()
        await asyncio.to_thread(docker_client.api.wait, container_id, timeout=30)
        async with make_executor() as second:
            assert await second.adopt(assignment, sink)
            await sink.wait_terminal()
            await second.join(*assignment.key)

    run(body())
    assert sink.types == [
        EventType.STARTED,
        EventType.PROGRESS,
        EventType.PROGRESS,
        EventType.COMPLETED,
    ]
    assert sink.terminal is not None and sink.terminal.outputs == {"went": True}
    assert sorted(line for line, _ in sink.lines) == ["after go", "before go", "finishing"]
    assert sink.lines[0] == ("before go", "stdout")


def test_adopt_without_a_container_returns_false(
    new_sink: SinkFactory, make_executor: ExecutorFactory, op_images: dict[str, str]
) -> None:
    assignment = scenario(op_images["scenarios"], "sleep")

    async def body() -> bool:
        async with make_executor() as executor:
            return await executor.adopt(assignment, new_sink())

    assert run(body()) is False


def test_prune_removes_containers_of_attempts_not_held(
    new_sink: SinkFactory,
    make_executor: ExecutorFactory,
    op_images: dict[str, str],
    docker_client: Any,
) -> None:
    kept = scenario(op_images["scenarios"], "sleep")
    stale = scenario(op_images["scenarios"], "sleep")
    sinks = {kept.run_id: new_sink(), stale.run_id: new_sink()}

    async def body() -> list[tuple[str, int]]:
        async with make_executor() as first:
            for assignment in (kept, stale):
                await first.start(assignment, sinks[assignment.run_id])
        async with make_executor() as second:
            removed = await second.prune(keep={kept.key})
            assert await second.adopt(kept, sinks[kept.run_id])
            await second.cancel(kept.run_id, kept.attempt, "done")
            return removed

    assert run(body()) == [stale.key]
    assert sinks[kept.run_id].types[-1] is EventType.CANCELLED
