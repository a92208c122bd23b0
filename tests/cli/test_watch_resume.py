"""Where ``gyoza runs watch`` resumes after the server went away.

The client's stream is replaced by a scripted one at the client boundary, so that the
server goes away at an exact point (after the snapshot, before the events it
announces): the end-to-end test across a real restart cannot place it there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from gyoza import mapping
from gyoza.api.v1 import op_run_service_pb2, resources_pb2
from gyoza.cli.watch import run_changes
from gyoza.client.errors import GyozaClientError
from gyoza.models.op_run import OpRun

COMPLETED = resources_pb2.OP_RUN_STATE_COMPLETED
_RUN = mapping.run_to_proto(OpRun.create(image="busybox"))


def _response(sequence: int, *, event_seq: int = 0, state: int = 0) -> Any:
    response = op_run_service_pb2.WatchOpRunResponse(sequence=sequence)
    response.op_run.CopyFrom(_RUN)
    if state:
        response.op_run.state = state  # type: ignore[assignment]
    if event_seq:
        response.event.seq = event_seq
    return response


class _Api:
    """First stream: the snapshot of a run with two events, then the server is gone.
    Second stream: what the server sends after the position it is given."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def watch_op_run(self, run_id: str, after_sequence: int) -> Iterator[Any]:
        self.asked.append(after_sequence)
        if len(self.asked) == 1:
            yield _response(2)  # the snapshot: two events so far, not sent yet
            raise GyozaClientError(grpc.StatusCode.UNAVAILABLE, "server gone")
        yield _response(2, state=COMPLETED)  # the resumed stream's snapshot
        for seq in range(after_sequence + 1, 3):
            yield _response(seq, event_seq=seq, state=COMPLETED)


class _Client:
    def __init__(self) -> None:
        self.api = _Api()


def test_a_watch_that_lost_the_server_after_the_snapshot_resumes_from_the_start() -> None:
    client = _Client()
    changes = list(run_changes(client, "run_w", sleep=lambda _: None))  # type: ignore[arg-type]
    assert client.api.asked == [0, 0]
    assert [c.event.seq for c in changes if c.HasField("event")] == [1, 2]
