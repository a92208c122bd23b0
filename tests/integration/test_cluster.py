"""The agent stream and the scheduler, end to end: real server and agent processes."""

from __future__ import annotations

from typing import Any

from gyoza.api.v1 import op_run_pb2, op_run_service_pb2, resources_pb2

S = resources_pb2


def _state(run: op_run_pb2.OpRun) -> int:
    return run.state


def _types(events: Any) -> list[str]:
    return [S.EventType.Name(e.type).removeprefix("EVENT_TYPE_") for e in events]


def _running(run: op_run_pb2.OpRun) -> bool:
    return run.state == S.OP_RUN_STATE_RUNNING


def _placed(run: op_run_pb2.OpRun) -> bool:
    return run.state in (S.OP_RUN_STATE_ASSIGNED, S.OP_RUN_STATE_RUNNING)


def _completed(run: op_run_pb2.OpRun) -> bool:
    return run.state == S.OP_RUN_STATE_COMPLETED


def _ended(run: op_run_pb2.OpRun) -> bool:
    return run.state in (
        S.OP_RUN_STATE_COMPLETED,
        S.OP_RUN_STATE_FAILED,
        S.OP_RUN_STATE_CANCELLED,
    )


def _assert_exactly_once(attempt: op_run_pb2.OpAttempt, steps: int) -> None:
    """An attempt's full timeline: every event once, in order, numbered 1..n."""
    types = _types(attempt.events)
    assert [e.seq for e in attempt.events] == list(range(1, len(attempt.events) + 1))
    assert types.count("STARTED") == 1
    assert types.count("COMPLETED") == 1
    assert types[-1] == "COMPLETED"
    progress = [e.progress for e in attempt.events if e.type == S.EVENT_TYPE_PROGRESS]
    assert progress == sorted(set(progress)), progress
    assert len(progress) == steps
    assert progress[-1] == 100


def test_placement_respects_vram_budgets_priority_and_pins(cluster: Any) -> None:
    # Everything is queued before any agent exists, so placement order is the queue's.
    low = [cluster.create(priority=0, sleep_ms=60_000, vram_mb=40_000) for _ in range(3)]
    high = [cluster.create(priority=5, sleep_ms=60_000, vram_mb=40_000) for _ in range(3)]
    huge = cluster.create(priority=9, sleep_ms=60_000, vram_mb=100_000)
    small = [cluster.create(priority=1, sleep_ms=60_000, vram_mb=10_000) for _ in range(4)]
    pinned = cluster.create(priority=0, sleep_ms=60_000, vram_mb=1_000, gpu_id=3)

    cluster.add_agent("big", gpus="2x80G")
    for run in [*high, *small]:
        placed = cluster.watch_until(run.id, _placed)
        assert placed.execution_summary.worker_id == "big"
    # The higher-priority 40G runs took the room: the low ones wait; the huge one fits
    # nowhere and did not block the smaller runs behind it; GPU 3 does not exist yet.
    for run in [*low, huge, pinned]:
        assert cluster.get(run.id).state == S.OP_RUN_STATE_PENDING

    cluster.add_agent("small", gpus="4x24G")
    placed = cluster.watch_until(pinned.id, _placed)
    assert placed.execution_summary.worker_id == "small"
    assert list(placed.execution_summary.gpu_ids) == [3]
    for run in [*low, huge]:
        assert cluster.get(run.id).state == S.OP_RUN_STATE_PENDING

    agents = {a.name: a for a in cluster.list_agents()}
    for agent in agents.values():
        totals = {g.index: g.vram_total_mb for g in agent.capacity.gpus}
        for reservation in agent.gpu_reservations:
            assert reservation.vram_reserved_mb <= totals[reservation.index]
    big = {g.index: g.vram_reserved_mb for g in agents["big"].gpu_reservations}
    assert sorted(big.values()) == [80_000, 80_000]
    assert len(agents["big"].runs) == 7

    # Cancelling frees room: the low-priority runs move in, never over-committing.
    for run in high:
        cluster.runs.CancelOpRun(_cancel(run.id), timeout=10)
    for run in low:
        assert cluster.watch_until(run.id, _placed).execution_summary.worker_id == "big"


def _cancel(run_id: str) -> Any:
    from gyoza.api.v1 import op_run_service_pb2

    return op_run_service_pb2.CancelOpRunRequest(run_id=run_id, reason="test")


def test_cancel_reaches_the_agent_and_never_reads_completed(cluster: Any) -> None:
    cluster.add_agent("a1")
    run = cluster.create(sleep_ms=30_000, progress_steps=30)
    cluster.watch_until(run.id, _running)
    reply = cluster.runs.CancelOpRun(_cancel(run.id), timeout=10).op_run
    assert reply.cancel_requested
    ended = cluster.watch_until(run.id, _ended, timeout=20)
    assert ended.state == S.OP_RUN_STATE_CANCELLED
    assert "COMPLETED" not in _types(cluster.attempts(run.id)[-1].events)


def test_killed_agent_fails_as_agent_lost_and_is_retried_elsewhere(cluster: Any) -> None:
    cluster.add_agent("a1")
    cluster.add_agent("a2")
    run = cluster.create(sleep_ms=4_000, progress_steps=4, max_attempts=2)
    holder = cluster.watch_until(run.id, _running).execution_summary.worker_id
    other = ({"a1", "a2"} - {holder}).pop()
    cluster.agents[holder].kill9()  # never restarted

    done = cluster.watch_until(
        run.id, lambda r: _completed(r) and r.current_attempt == 2, timeout=40
    )
    assert done.execution_summary.worker_id == other
    attempts = cluster.attempts(run.id)
    assert attempts[0].state == S.OP_RUN_STATE_FAILED
    assert attempts[0].execution_summary.failure_class == S.FAILURE_CLASS_AGENT_LOST
    assert _types(attempts[1].events)[0] == "RETRIED"


def test_a_crash_looping_server_still_fails_a_dead_agents_runs(slow_lease_cluster: Any) -> None:
    """The server restarts faster than lease + grace (5 s here) again and again; the dead
    agent's run must still end AGENT_LOST, its lease counted from when it was last heard
    from (at most one lease later), not from each restart."""
    cluster = slow_lease_cluster
    cluster.add_agent("a1")
    run = cluster.create(sleep_ms=60_000, progress_steps=2)
    cluster.watch_until(run.id, _running)
    cluster.agents["a1"].kill9()  # never restarted
    done = None
    for _ in range(10):
        cluster.server.kill9()
        cluster.start_server()  # each server lives only until it serves: well under 5 s
        seen = cluster.get(run.id)
        if _ended(seen):
            done = seen
            break
    assert done is not None, "the run was still held by the dead agent after 10 restarts"
    assert done.state == S.OP_RUN_STATE_FAILED
    assert done.execution_summary.failure_class == S.FAILURE_CLASS_AGENT_LOST


def test_agent_killed_and_restarted_within_grace_goes_on(patient_cluster: Any) -> None:
    cluster = patient_cluster
    agent = cluster.add_agent("a1")
    # Long enough that the restart lands mid-run, well within the grace period.
    run = cluster.create(sleep_ms=4_000, progress_steps=6)
    cluster.watch_until(run.id, lambda r: any(e.type == S.EVENT_TYPE_PROGRESS for e in r.events))
    agent.kill9()
    agent.start()
    done = cluster.watch_until(run.id, _ended, timeout=40)
    assert done.state == S.OP_RUN_STATE_COMPLETED, done
    assert done.current_attempt == 1
    (attempt,) = cluster.attempts(run.id)
    _assert_exactly_once(attempt, steps=6)


def test_server_killed_mid_run_loses_and_doubles_nothing(cluster: Any) -> None:
    cluster.add_agent("a1")
    cluster.add_agent("a2")
    runs = [cluster.create(sleep_ms=2_500, progress_steps=5) for _ in range(6)]
    for run in runs:
        cluster.watch_until(run.id, _running)
    cluster.server.kill9()
    cluster.start_server()
    for run in runs:
        done = cluster.watch_until(run.id, _ended, timeout=60)
        assert done.state == S.OP_RUN_STATE_COMPLETED, done
        (attempt,) = cluster.attempts(run.id)
        _assert_exactly_once(attempt, steps=5)


def test_stale_attempt_reports_are_refused_after_a_retry(cluster: Any) -> None:
    old = cluster.add_agent("old")
    run = cluster.create(sleep_ms=4_000, progress_steps=8, max_attempts=2)
    cluster.watch_until(run.id, _running)
    old.kill9()
    cluster.add_agent("new")
    retried = cluster.watch_until(
        run.id, lambda r: r.current_attempt == 2 and _running(r), timeout=40
    )
    assert retried.execution_summary.worker_id == "new"
    first_attempt = cluster.attempts(run.id)[0]

    # The old agent comes back holding attempt 1 and its unsent reports.
    old.start()
    cluster.wait_agents({"old"})
    done = cluster.watch_until(run.id, _ended, timeout=40)
    assert done.state == S.OP_RUN_STATE_COMPLETED
    assert done.current_attempt == 2
    attempts = cluster.attempts(run.id)
    assert list(attempts[0].events) == list(first_attempt.events)
    _assert_exactly_once(attempts[1], steps=8)


def test_server_killed_repeatedly_while_agents_replay_loses_no_event_or_log_line(
    cluster: Any,
) -> None:
    """kill -9 the server again and again while agents report and replay; afterwards
    every attempt has each event once, in order, and every log line its op wrote, once,
    in order: a watermark never acknowledges lines that were not stored."""
    for name in ("a1", "a2"):
        cluster.add_agent(name)
    steps = 40
    runs = [cluster.create(sleep_ms=5_000, progress_steps=steps) for _ in range(4)]
    for run in runs:
        cluster.watch_until(run.id, _running)
    for _ in range(3):
        cluster.server.kill9()
        cluster.start_server()
        cluster.wait_agents({"a1", "a2"})  # agents reconnect and replay their outboxes
    for run in runs:
        done = cluster.watch_until(run.id, _ended, timeout=60)
        assert done.state == S.OP_RUN_STATE_COMPLETED, done
        (attempt,) = cluster.attempts(run.id)
        _assert_exactly_once(attempt, steps=steps)
        lines = [
            (line.number, line.text)
            for chunk in cluster.runs.GetOpRunLogs(
                op_run_service_pb2.GetOpRunLogsRequest(run_id=run.id), timeout=10
            )
            for line in chunk.lines
        ]
        assert lines == [(i, f"step {i}/{steps}") for i in range(1, steps + 1)], run.id
