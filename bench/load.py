"""The client side of the benchmark: grpc.aio stubs creating runs and watching them.

Two ways of observing runs:

* :class:`TopicListener`: one ``SubscribeEvents`` stream on the benchmark's topic (every
  run is created with ``event_delivery.topic = "bench"``). It resolves each run's
  completion and, for PROGRESS events, measures how long after the agent stamped the
  event it reached the subscriber.
* :func:`watched_lifecycles`: one ``WatchOpRun`` stream per run, for the event latency
  as a watcher of one run sees it.

Times are ``time.time_ns()`` in every process: the server, the agents and this client run
on one machine, so their clocks are the same clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc
import grpc.aio
from google.protobuf import struct_pb2

from bench.common import SENT_NS_KEY, TOPIC
from gyoza.api.v1 import (
    agent_pb2,
    agent_service_pb2,
    agent_service_pb2_grpc,
    op_run_pb2,
    op_run_service_pb2,
    op_run_service_pb2_grpc,
    resources_pb2,
)

#: Image named by the ad-hoc benchmark runs (the scripted executor never pulls it).
IMAGE = "gyoza-bench/scripted:latest"

TERMINAL_STATES = frozenset(
    {
        resources_pb2.OP_RUN_STATE_COMPLETED,
        resources_pb2.OP_RUN_STATE_FAILED,
        resources_pb2.OP_RUN_STATE_CANCELLED,
    }
)
TERMINAL_EVENTS = frozenset(
    {
        resources_pb2.EVENT_TYPE_COMPLETED,
        resources_pb2.EVENT_TYPE_FAILED,
        resources_pb2.EVENT_TYPE_CANCELLED,
    }
)


def open_channel(address: str) -> grpc.aio.Channel:
    """An insecure grpc.aio channel to the server."""
    return grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            # Several stubs may share one channel; no need for more connections.
            ("grpc.use_local_subchannel_pool", 1),
        ],
    )


#: CPU cores each benchmark run reserves on its agent, so that runs spread over the fleet.
RUN_CPU = 1.0

TOPIC_BATCH = 100
"""Most topic records the listener takes per SubscribeEvents message."""


def create_request(*, sleep_ms: int, progress_steps: int) -> op_run_service_pb2.CreateOpRunRequest:
    """An ad-hoc scripted run published on the benchmark's topic, reserving
    :data:`RUN_CPU` cores."""
    inputs = struct_pb2.Struct()
    inputs.update({"sleep_ms": sleep_ms, "progress_steps": progress_steps})
    return op_run_service_pb2.CreateOpRunRequest(
        image=IMAGE,
        inputs=inputs,
        constraints=resources_pb2.Constraints(cpu=RUN_CPU),
        event_delivery=resources_pb2.EventDelivery(topic=TOPIC),
    )


def stamp_of(event: op_run_pb2.OpRunEvent) -> int | None:
    """The agent's send time stamped in a PROGRESS event's payload, if any."""
    if event.type != resources_pb2.EVENT_TYPE_PROGRESS:
        return None
    value = event.payload.fields.get(SENT_NS_KEY)
    if value is None or not value.string_value:
        return None
    try:
        return int(value.string_value)
    except ValueError:
        return None


async def connected_agents(channel: grpc.aio.Channel, prefix: str) -> int:
    """How many agents whose name starts with *prefix* are connected now."""
    stub: agent_service_pb2_grpc.AgentServiceAsyncStub = agent_service_pb2_grpc.AgentServiceStub(
        channel
    )
    count = 0
    token = ""
    while True:  # every page
        response = await stub.ListAgents(
            agent_service_pb2.ListAgentsRequest(page_token=token), timeout=30
        )
        count += sum(
            1
            for agent in response.agents
            if agent.name.startswith(prefix) and agent.state == agent_pb2.AGENT_STATE_CONNECTED
        )
        token = response.next_page_token
        if not token:
            return count


async def wait_for_agents(
    channel: grpc.aio.Channel,
    prefix: str,
    count: int,
    timeout_s: float,
    alive: Callable[[], bool] = lambda: True,
) -> float:
    """Wait until *count* agents named ``prefix*`` are connected; the seconds it took.

    Raises
    ------
    TimeoutError
        When they are not all connected in time (or *alive* turns False).
    """
    start = time.monotonic()
    seen = 0
    while time.monotonic() - start < timeout_s and alive():
        seen = await connected_agents(channel, prefix)
        if seen >= count:
            return time.monotonic() - start
        await asyncio.sleep(0.25)
    raise TimeoutError(f"{seen} of {count} agents connected after {timeout_s:.0f} s")


@dataclass
class TopicListener:
    """One ``SubscribeEvents`` stream on the benchmark topic, running in the background.

    ``expect(run_id)`` returns a future resolved with the time (ns) the run's terminal
    event arrived; PROGRESS latencies (ms) accumulate in :attr:`progress_latency_ms`
    while :attr:`measuring` is true. :attr:`batch` is the stream's ``max_batch``.
    """

    channel: grpc.aio.Channel
    terminal_ns: dict[str, int] = field(default_factory=dict)
    terminal_state: dict[str, int] = field(default_factory=dict)
    progress_latency_ms: list[float] = field(default_factory=list)
    measuring: bool = False
    batch: int = TOPIC_BATCH
    received: int = 0
    _waiters: dict[str, asyncio.Future[int]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _call: object | None = None
    _failure: BaseException | None = None

    async def start(self) -> None:
        """Open the stream (from offset 0: the topic's log is empty when the benchmark
        starts, so nothing is missed however late the server registers the stream)."""
        stub: op_run_service_pb2_grpc.OpRunServiceAsyncStub = (
            op_run_service_pb2_grpc.OpRunServiceStub(self.channel)
        )
        call = stub.SubscribeEvents(
            op_run_service_pb2.SubscribeEventsRequest(topic=TOPIC, max_batch=self.batch)
        )
        self._call = call
        # The server sends the headers once the subscription is in place.
        await asyncio.wait_for(call.initial_metadata(), 30)
        self._task = asyncio.create_task(self._read(call), name="topic listener")

    async def _read(
        self,
        call: grpc.aio.UnaryStreamCall[
            op_run_service_pb2.SubscribeEventsRequest, op_run_service_pb2.SubscribeEventsResponse
        ],
    ) -> None:
        try:
            async for batch in call:
                now = time.time_ns()
                self._take(batch, now)
                for message in batch.more:
                    self._take(message, now)
        except asyncio.CancelledError:
            raise
        except BaseException as error:  # the stream broke: fail every waiter
            self._failure = error
            for waiter in self._waiters.values():
                if not waiter.done():
                    waiter.set_exception(RuntimeError(f"topic stream ended: {error}"))
            self._waiters.clear()

    def _take(self, message: op_run_service_pb2.SubscribeEventsResponse, now: int) -> None:
        """Note one record that arrived at *now* (ns)."""
        self.received += 1
        event = message.event
        if self.measuring:
            stamp = stamp_of(event)
            if stamp is not None:
                self.progress_latency_ms.append((now - stamp) / 1e6)
        if event.type in TERMINAL_EVENTS:
            run_id = message.run_id
            self.terminal_ns[run_id] = now
            self.terminal_state[run_id] = message.run_state
            waiter = self._waiters.pop(run_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(now)

    def expect(self, run_id: str) -> asyncio.Future[int]:
        """A future resolved with the time the run's terminal event arrived."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        done = self.terminal_ns.get(run_id)
        if done is not None:
            future.set_result(done)
        elif self._failure is not None:
            future.set_exception(RuntimeError(f"topic stream ended: {self._failure}"))
        else:
            self._waiters[run_id] = future
        return future

    async def stop(self) -> None:
        """Close the stream."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


@dataclass
class BatchResult:
    """What one batch of closed-loop lifecycles measured on the client side."""

    runs: int
    concurrency: int
    wall_s: float
    sent_ns: dict[str, int]
    created_ms: list[float]
    completed: int
    failed: int
    errors: list[str]
    cut_short: bool = False

    @property
    def per_second(self) -> float:
        """Completed lifecycles per second of wall time."""
        return self.completed / self.wall_s if self.wall_s > 0 else 0.0


async def lifecycle_batch(
    channel: grpc.aio.Channel,
    listener: TopicListener,
    *,
    runs: int,
    concurrency: int,
    progress_steps: int = 3,
    sleep_ms: int = 0,
    run_timeout_s: float = 30.0,
    deadline_s: float | None = None,
) -> BatchResult:
    """Run lifecycles with *concurrency* in flight: each worker creates a run, waits for
    its terminal event on the topic, and creates the next, until *runs* were created (or
    *deadline_s* passed, when given: the batch is then cut short, and says so).

    The wall time runs from the first create to the last terminal event.
    """
    stub: op_run_service_pb2_grpc.OpRunServiceAsyncStub = op_run_service_pb2_grpc.OpRunServiceStub(
        channel
    )
    request = create_request(sleep_ms=sleep_ms, progress_steps=progress_steps)
    sent_ns: dict[str, int] = {}
    created_ms: list[float] = []
    errors: list[str] = []
    counter = iter(range(runs))
    finished: list[int] = []
    start_ns = time.time_ns()
    stop_at = None if deadline_s is None else time.monotonic() + deadline_s
    cut_short = False

    async def worker() -> None:
        nonlocal cut_short
        for _ in counter:
            if stop_at is not None and time.monotonic() > stop_at:
                cut_short = True
                return
            t0 = time.time_ns()
            try:
                response = await stub.CreateOpRun(request, timeout=run_timeout_s)
            except grpc.aio.AioRpcError as error:
                errors.append(f"CreateOpRun: {error.code().name}: {error.details()}")
                continue
            t1 = time.time_ns()
            run_id = response.op_run.id
            sent_ns[run_id] = t0
            created_ms.append((t1 - t0) / 1e6)
            try:
                finished.append(await asyncio.wait_for(listener.expect(run_id), run_timeout_s))
            except (TimeoutError, RuntimeError) as error:
                errors.append(f"{run_id}: {error or 'no terminal event in time'}")

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    end_ns = max(finished, default=time.time_ns())
    completed = sum(
        1
        for run_id in sent_ns
        if listener.terminal_state.get(run_id) == resources_pb2.OP_RUN_STATE_COMPLETED
    )
    failed = sum(
        1
        for run_id in sent_ns
        if listener.terminal_state.get(run_id, resources_pb2.OP_RUN_STATE_COMPLETED)
        != resources_pb2.OP_RUN_STATE_COMPLETED
    )
    return BatchResult(
        runs=len(sent_ns),
        concurrency=concurrency,
        wall_s=(end_ns - start_ns) / 1e9,
        sent_ns=sent_ns,
        created_ms=created_ms,
        completed=completed,
        failed=failed,
        errors=errors,
        cut_short=cut_short,
    )


@dataclass
class WatchResult:
    """What the WatchOpRun phase measured on the client side."""

    runs: int
    wall_s: float
    sent_ns: dict[str, int]
    event_latency_ms: list[float]
    completed: int
    errors: list[str]


async def watched_lifecycles(
    channel: grpc.aio.Channel,
    *,
    runs: int,
    concurrency: int,
    sleep_ms: int,
    progress_steps: int = 3,
    run_timeout_s: float = 30.0,
    deadline_s: float | None = None,
) -> WatchResult:
    """Run lifecycles with *concurrency* in flight, each followed by its own WatchOpRun
    stream opened right after the create; every PROGRESS event delivered *live* (its
    change committed after the watch's snapshot) gives one event latency sample.

    *sleep_ms* spreads the script's steps out so that the watch is open before the first
    PROGRESS is sent. With *deadline_s*, no run is created after that many seconds.
    """
    stub: op_run_service_pb2_grpc.OpRunServiceAsyncStub = op_run_service_pb2_grpc.OpRunServiceStub(
        channel
    )
    request = create_request(sleep_ms=sleep_ms, progress_steps=progress_steps)
    sent_ns: dict[str, int] = {}
    latencies: list[float] = []
    errors: list[str] = []
    completed = 0
    counter = iter(range(runs))
    stop_at = None if deadline_s is None else time.monotonic() + deadline_s

    async def follow(run_id: str) -> bool:
        call = stub.WatchOpRun(op_run_service_pb2.WatchOpRunRequest(run_id=run_id))
        snapshot_sequence: int | None = None
        try:
            async for message in call:
                now = time.time_ns()
                if snapshot_sequence is None:
                    snapshot_sequence = message.sequence
                elif message.sequence > snapshot_sequence and message.HasField("event"):
                    stamp = stamp_of(message.event)
                    if stamp is not None:
                        latencies.append((now - stamp) / 1e6)
                if message.op_run.state in TERMINAL_STATES:
                    return message.op_run.state == resources_pb2.OP_RUN_STATE_COMPLETED
        finally:
            call.cancel()
        return False

    async def worker() -> None:
        nonlocal completed
        for _ in counter:
            if stop_at is not None and time.monotonic() > stop_at:
                return
            t0 = time.time_ns()
            try:
                response = await stub.CreateOpRun(request, timeout=run_timeout_s)
                run_id = response.op_run.id
                sent_ns[run_id] = t0
                if await asyncio.wait_for(follow(run_id), run_timeout_s):
                    completed += 1
            except grpc.aio.AioRpcError as error:
                errors.append(f"{error.code().name}: {error.details()}")
            except TimeoutError:
                errors.append("a watched run did not end in time")

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return WatchResult(
        runs=len(sent_ns),
        wall_s=time.monotonic() - start,
        sent_ns=sent_ns,
        event_latency_ms=latencies,
        completed=completed,
        errors=errors,
    )


def dispatch_latencies_ms(sent_ns: dict[str, int], received_ns: dict[str, int]) -> list[float]:
    """For every run in both maps: agent receive time minus client send time, in ms."""
    return [(received_ns[r] - sent) / 1e6 for r, sent in sent_ns.items() if r in received_ns]


def first_errors(errors: Iterable[str], limit: int = 5) -> list[str]:
    """The first few distinct errors."""
    seen: list[str] = []
    for error in errors:
        if error not in seen:
            seen.append(error)
        if len(seen) >= limit:
            break
    return seen
