"""Several replicas on one PostgreSQL database, as users run them: real processes.

What a user relies on: any replica serves any call and any agent; a replica that dies,
the leader included, loses nothing (every run ends once, every attempt's events are
numbered 1..n with no gap or repeat, no run gets a second attempt, a topic subscriber
that resumes on another replica sees every offset once and in order); a leader that was
paused and comes back commits nothing for what it lost and rejoins as a follower.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from gyoza.api.v1 import op_run_service_pb2, resources_pb2
from tests.replicas.conftest import LEADER_LEASE_S, RETRYABLE, ReplicaCluster

pytestmark = pytest.mark.timeout(300)

COMPLETED = resources_pb2.OP_RUN_STATE_COMPLETED


def _check_runs(cluster: ReplicaCluster, run_ids: list[str], timeout: float = 120) -> None:
    """Every run COMPLETED, started once and completed once, each attempt's events
    numbered 1..n without a gap or repeat (read from the database: the runs are many)."""
    wanted = set(run_ids)

    def finished() -> dict[str, str]:
        with cluster.engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT id, state FROM op_runs WHERE state IN "
                    "('COMPLETED', 'FAILED', 'CANCELLED')"
                )
            ).all()
        return {run_id: state for run_id, state in rows if run_id in wanted}

    cluster.wait_until(lambda: len(finished()) == len(wanted), timeout, "every run to finish")
    states = finished()
    assert set(states.values()) == {"COMPLETED"}, {
        k: v for k, v in states.items() if v != "COMPLETED"
    }
    with cluster.engine.connect() as conn:
        # An assignment that never reached its agent (the leader died between its
        # commit and the send) is released and assigned again: that attempt never
        # started. What must never happen is a run started twice.
        started = dict(
            conn.execute(
                sa.text(
                    "SELECT run_id, count(DISTINCT attempt) FROM op_events "
                    "WHERE type = 'STARTED' GROUP BY run_id"
                )
            ).all()
        )
        completed = dict(
            conn.execute(
                sa.text(
                    "SELECT run_id, count(*) FROM op_events WHERE type = 'COMPLETED' "
                    "GROUP BY run_id"
                )
            ).all()
        )
        gaps = conn.execute(
            sa.text(
                "SELECT run_id, attempt, count(*), min(seq), max(seq), count(DISTINCT seq) "
                "FROM op_events GROUP BY run_id, attempt"
            )
        ).all()
    assert {run_id: started.get(run_id) for run_id in run_ids} == dict.fromkeys(run_ids, 1)
    assert {run_id: completed.get(run_id) for run_id in run_ids} == dict.fromkeys(run_ids, 1)
    for run_id, attempt, count, low, high, distinct in gaps:
        assert (low, high, distinct) == (1, count, count), (run_id, attempt)


class TopicReader:
    """Follows a topic on some replica, resuming on another after an error."""

    def __init__(self, cluster: ReplicaCluster, topic: str) -> None:
        self.cluster = cluster
        self.topic = topic
        self.offsets: list[int] = []
        self.runs_done: set[str] = set()
        self.resumes = 0
        self._stop = threading.Event()
        self._errors: queue.Queue[BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._follow, daemon=True)
        self._call: Any = None
        self._thread.start()

    def _follow(self) -> None:
        try:
            while not self._stop.is_set():
                replica = self.cluster.any_replica()
                after = self.offsets[-1] if self.offsets else 0
                request = op_run_service_pb2.SubscribeEventsRequest(
                    topic=self.topic, after_offset=after
                )
                try:
                    self._call = replica.runs.SubscribeEvents(request)
                    for record in self._call:
                        self.offsets.append(record.offset)
                        if record.event.type == resources_pb2.EVENT_TYPE_COMPLETED:
                            self.runs_done.add(record.run_id)
                except grpc.RpcError as error:
                    if self._stop.is_set():
                        return
                    if error.code() not in RETRYABLE:
                        raise
                    self.resumes += 1
                    time.sleep(0.1)
        except BaseException as error:  # reported to the test
            self._errors.put(error)

    def wait_runs(self, run_ids: set[str], timeout: float = 120) -> None:
        ReplicaCluster.wait_until(
            lambda: run_ids <= self.runs_done or not self._errors.empty(),
            timeout,
            "the subscriber to see every run complete",
        )
        if not self._errors.empty():
            raise self._errors.get()

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(10)


ENDING = {
    resources_pb2.EVENT_TYPE_COMPLETED,
    resources_pb2.EVENT_TYPE_FAILED,
    resources_pb2.EVENT_TYPE_CANCELLED,
}


class RunWatcher:
    """Watches one run on random replicas (WatchOpRun), resuming from the last sequence
    on another replica after an error, until its attempt's ending event (the runs here
    are not retried)."""

    def __init__(self, cluster: ReplicaCluster, run_id: str) -> None:
        self.cluster = cluster
        self.run_id = run_id
        self.sequences: list[int] = []
        self.types: list[int] = []
        self.resumes = 0
        self._errors: queue.Queue[BaseException] = queue.Queue()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        try:
            while True:
                after = self.sequences[-1] if self.sequences else 0
                request = op_run_service_pb2.WatchOpRunRequest(
                    run_id=self.run_id, after_sequence=after
                )
                try:
                    for change in self.cluster.any_replica().runs.WatchOpRun(request, timeout=120):
                        if not change.HasField("event"):
                            continue  # the snapshot: replayed events carry the run as now
                        self.sequences.append(change.sequence)
                        self.types.append(change.event.type)
                        if change.event.type in ENDING:
                            return
                except grpc.RpcError as error:
                    if error.code() not in RETRYABLE:
                        raise
                    self.resumes += 1
                    time.sleep(0.1)
        except BaseException as error:  # reported to the test
            self._errors.put(error)

    def result(self, timeout: float = 120) -> list[int]:
        """The event sequences seen, once the run ended (raises what the watch raised)."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the watch of {self.run_id} did not end"
        if not self._errors.empty():
            raise self._errors.get()
        return self.sequences


def _create_many(
    cluster: ReplicaCluster, count: int, topic: str, at: int, event: Callable[[], None]
) -> list[str]:
    """Create *count* runs with request ids on random replicas, 16 clients at once;
    *event* happens once *at* runs were created, while the others are being created."""
    tag = uuid.uuid4().hex[:6]
    created = iter(range(count))
    lock = threading.Lock()

    def create(i: int) -> str:
        run_id = cluster.create(f"req-{tag}-{i}", sleep_ms=20, topic=topic).id
        with lock:
            if next(created) == at:
                event()
        return run_id

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(create, range(count)))


def test_any_replica_serves_and_a_run_created_on_one_runs_on_an_agent_of_another(
    replica_cluster: Callable[..., ReplicaCluster],
) -> None:
    cluster = replica_cluster(2)
    leader = cluster.leader()
    follower = next(r for r in cluster.replicas if r is not leader)
    # The agent is on the follower, the client on the leader, and the other way round.
    cluster.add_agent("far", addresses=[follower.address])
    cluster.wait_agents({"far"})
    request = op_run_service_pb2.CreateOpRunRequest(image="scripted")
    for client in (leader, follower):
        run = client.runs.CreateOpRun(request, timeout=10).op_run
        seen = []
        other = follower if client is leader else leader
        for change in other.runs.WatchOpRun(
            op_run_service_pb2.WatchOpRunRequest(run_id=run.id), timeout=30
        ):
            seen.append(change.op_run.state)
            if change.op_run.state == COMPLETED:
                break
        assert seen[-1] == COMPLETED
        assert run.id in {
            r.id
            for r in client.runs.ListOpRuns(
                op_run_service_pb2.ListOpRunsRequest(), timeout=10
            ).op_runs
        }
    # Both replicas list the whole fleet, and say which replica holds the agent.
    for replica in cluster.replicas:
        agents = {a.name: a for a in cluster.list_agents(replica)}
        assert agents["far"].replica == follower.replica_id
    # A missing run is NOT_FOUND through the follower too, with its reason.
    with pytest.raises(grpc.RpcError) as caught:
        follower.runs.GetOpRun(op_run_service_pb2.GetOpRunRequest(run_id="nope"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("victim", ["leader", "follower"])
def test_a_replica_killed_mid_load_loses_and_doubles_nothing(
    replica_cluster: Callable[..., ReplicaCluster], victim: str
) -> None:
    cluster = replica_cluster(3)
    names = {f"agent-{i}" for i in range(20)}
    for name in sorted(names):
        cluster.add_agent(name)
    cluster.wait_agents(names)
    topic = f"load-{victim}"
    reader = TopicReader(cluster, topic)
    _, term, _ = cluster.leadership()
    leader = cluster.leader()
    killed = leader if victim == "leader" else next(r for r in cluster.replicas if r is not leader)

    watchers: list[RunWatcher] = []

    def kill() -> None:
        # Watchers on random replicas of runs that live across the kill.
        for i in range(3):
            run_id = cluster.create(f"watched-{victim}-{i}", sleep_ms=2000).id
            watchers.append(RunWatcher(cluster, run_id))
        killed.proc.kill9()

    try:
        run_ids = _create_many(cluster, 2000, topic, 1000, kill)
        if victim == "leader":
            new = cluster.wait_new_leader(term)
            assert new is not killed
        _check_runs(cluster, run_ids)
        reader.wait_runs(set(run_ids))
        # Every topic offset once, in order, across the subscriber's resumes.
        assert reader.offsets == sorted(set(reader.offsets))
        assert reader.resumes >= (1 if victim == "leader" else 0)
        # Each watcher saw every change of its run once, in order, across its resumes.
        _check_runs(cluster, [w.run_id for w in watchers])
        for watcher in watchers:
            sequences = watcher.result()
            assert sequences == list(range(1, len(sequences) + 1)), watcher.run_id
            assert len(sequences) == len(cluster.events(watcher.run_id)), watcher.run_id
        # The whole fleet came back, to the replicas that are left.
        cluster.wait_agents(names)
        holders = {a.replica for a in cluster.list_agents()}
        assert killed.replica_id not in holders
    finally:
        reader.stop()


def test_a_paused_leader_is_fenced_out_and_rejoins_as_a_follower(
    replica_cluster: Callable[..., ReplicaCluster],
) -> None:
    # An agent whose stream hangs on the paused leader leaves it within ~15 s (an
    # unanswered keepalive ping): lease + grace must cover that (docs/server.md), else
    # its held attempts would be declared lost and started again.
    cluster = replica_cluster(2, {"GYOZA_LEASE_TIMEOUT_S": "10.0", "GYOZA_GRACE_S": "20.0"})
    cluster.add_agent("a1")
    cluster.add_agent("a2")
    cluster.wait_agents({"a1", "a2"})
    zombie = cluster.leader()
    _, term, _ = cluster.leadership()
    # Long runs: the agents hold attempts through the pause.
    held = [cluster.create(f"long-{i}", sleep_ms=3000).id for i in range(4)]
    zombie.signal(signal.SIGSTOP)
    try:
        new = cluster.wait_new_leader(term, timeout=LEADER_LEASE_S * 10)
        assert new is not zombie
        # Work goes on under the new leader while the old one is paused.
        # (on the new leader: a call to the paused one would hang to its deadline)
        during = [cluster.create(f"during-{i}", sleep_ms=10, on=new).id for i in range(10)]
        time.sleep(LEADER_LEASE_S)  # paused for twice its lease in all
    finally:
        zombie.signal(signal.SIGCONT)
    # It finds out at once, commits nothing, and follows the new leader.
    cluster.wait_until(
        lambda: "replica lost the leadership" in zombie.proc.log_path.read_text(),
        30,
        "the old leader to step down",
    )
    cluster.wait_until(zombie.serving, 30, "the old leader to serve as a follower")
    assert cluster.leadership()[0] == new.replica_id
    after = [cluster.create(f"after-{i}").id for i in range(5)]
    run = zombie.runs.GetOpRun(op_run_service_pb2.GetOpRunRequest(run_id=after[0]), timeout=10)
    assert run.op_run.id == after[0]
    _check_runs(cluster, held + during + after)


def test_the_leaders_lease_connection_cut_loses_nothing(
    replica_cluster: Callable[..., ReplicaCluster],
) -> None:
    """Cut by the database (``pg_terminate_backend``): either the leader renews on a
    new connection first, or a follower sees the session gone and takes over; either
    way one replica leads and no run or event is lost or doubled."""
    cluster = replica_cluster(2)
    cluster.add_agent("a1")
    cluster.wait_agents({"a1"})
    reader = TopicReader(cluster, "cut")
    first = [cluster.create(f"before-{i}", sleep_ms=500, topic="cut").id for i in range(5)]
    watchers = [RunWatcher(cluster, run_id) for run_id in first]
    with cluster.engine.connect() as conn:
        cut = conn.execute(
            sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = 'gyoza-leadership' AND pid = "
                "(SELECT session_pid FROM leadership WHERE name = 'control')"
            )
        ).all()
        conn.commit()
    assert cut == [(True,)]
    cluster.wait_until(lambda: cluster.leadership()[2] > 0, 30, "a live lease")
    cluster.wait_until(lambda: cluster.leader().serving(), 30, "the leader serving")
    second = [cluster.create(f"after-{i}", topic="cut").id for i in range(5)]
    _check_runs(cluster, first + second)
    # No watcher and no subscriber missed or repeated a change across the cut.
    try:
        reader.wait_runs(set(first + second))
        assert reader.offsets == sorted(set(reader.offsets))
        events = sum(len(cluster.events(run_id)) for run_id in first + second)
        assert len(reader.offsets) == events
    finally:
        reader.stop()
    for watcher, run_id in zip(watchers, first, strict=True):
        sequences = watcher.result()
        assert sequences == list(range(1, len(sequences) + 1)), (run_id, sequences)
        assert len(sequences) == len(cluster.events(run_id)), run_id
        assert watcher.types[-1] == resources_pb2.EVENT_TYPE_COMPLETED


def test_a_leader_stopped_cleanly_hands_over_at_once(
    replica_cluster: Callable[..., ReplicaCluster],
) -> None:
    cluster = replica_cluster(2)
    cluster.add_agent("a1")
    cluster.wait_agents({"a1"})
    leader = cluster.leader()
    _, term, _ = cluster.leadership()
    leader.proc.stop()
    assert leader.proc.popen is not None and leader.proc.popen.returncode == 0
    new = cluster.wait_new_leader(term, timeout=LEADER_LEASE_S * 3)
    assert new is not leader
    _check_runs(cluster, [cluster.create("after-stop").id])
