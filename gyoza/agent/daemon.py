"""The agent daemon: one object that runs an agent from start to stop.

:class:`Agent` opens the outbox in its state directory, adopts the attempts a previous
run left unfinished, then keeps one stream session to the server: connect, Hello,
Welcome, serve; after any failure, back off (exponential, with jitter) and connect again.
Given several server addresses (the replicas of one control plane), it uses one at a
time and moves on to the next when the stream breaks or the connection cannot be made
within :data:`CONNECT_TIMEOUT_S`, staying on the address that works.
It decides what the session cannot: which assignments to take, how to cancel, what to
drop. Sub-tasks fail fast (the first unexpected error stops the agent and is raised from
:meth:`Agent.run`), and shutting down drains: no new work, then, within
``shutdown_timeout_s``, held attempts end and their reports are acknowledged. Containers
are never stopped by a shutdown; the next start adopts them.

Use it as the CLI does::

    await run_agent(AgentConfig(server="10.0.0.5:50051", executor="docker"))

or as a context manager that runs it in the background (tests, benchmarks)::

    async with Agent(config) as agent:
        await agent.wait_for_state(ConnectionState.CONNECTED)
        ...
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import logging
import math
import os
import signal
from collections.abc import Callable, Coroutine
from functools import partial
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from gyoza.agent import metrics
from gyoza.agent.backoff import Backoff
from gyoza.agent.capacity import CapacityInfo, probe_capacity
from gyoza.agent.config import AgentConfig
from gyoza.agent.executor import Assignment, Executor
from gyoza.agent.labels import agent_labels
from gyoza.agent.mapping import assignment_from_proto, capacity_to_proto
from gyoza.agent.outbox import OUTBOX_FILE, Outbox
from gyoza.agent.scripted import ScriptedExecutor
from gyoza.agent.session import Session, SessionEnded
from gyoza.agent.sink import OutboxSink
from gyoza.api.v1 import agent_pb2
from gyoza.api.v1 import agent_service_pb2 as pb
from gyoza.api.v1 import agent_service_pb2_grpc as pb_grpc
from gyoza.metrics_endpoint import MetricsEndpoint
from gyoza.models.reports import ReportedEvent
from gyoza.models.resources import EventType, FailureClass

log = logging.getLogger(__name__)

#: Error message of an attempt that a restarted agent could not take over.
NOT_ADOPTED = "agent restarted and the attempt could not be adopted"

#: Status codes that no reconnect can fix: the agent stops with :class:`AgentError`.
FATAL_CODES = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)

CapacityProbe = Callable[[], CapacityInfo]


class ConnectionState(enum.Enum):
    """Where the agent stands with the server."""

    DISCONNECTED = "DISCONNECTED"
    """No stream; waiting to (re)connect."""
    CONNECTING = "CONNECTING"
    """Stream opened, Hello sent, no Welcome yet."""
    CONNECTED = "CONNECTED"
    """Welcomed; taking work."""
    DRAINING = "DRAINING"
    """Welcomed; finishing what it holds, taking no new work."""
    STOPPED = "STOPPED"
    """Shut down (or never started)."""


class AgentError(RuntimeError):
    """The agent cannot go on (refused by the server, state directory in use...).

    Parameters
    ----------
    message : str
        What happened.
    code : grpc.StatusCode | None
        The status the server refused the stream with, when it did. (The cause is then a
        ``grpc.aio.AioRpcError``, which is a ``grpc.RpcError`` but not a ``grpc.Call``.)
    """

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def agent_version() -> str:
    """Version of the installed gyoza package (``"0+unknown"`` when not installed)."""
    try:
        return metadata.version("gyoza")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def create_executor(config: AgentConfig) -> Executor:
    """The executor ``config.executor`` names."""
    if config.executor == "scripted":
        return ScriptedExecutor()
    # Imported here: the Docker SDK is heavy and a scripted agent never needs it.
    from gyoza.agent.docker_executor import DockerExecutor

    return DockerExecutor(
        state_dir=config.state_dir, agent_name=config.name, network=config.network
    )


CHANNEL_MAX_BACKOFF_S = 1.0
"""Longest wait between the channel's connection tries while the server is away."""


CONNECT_TIMEOUT_S = 3.0
"""With several server addresses: how long a connection to one may take before the
agent tries the next."""


def create_channel(config: AgentConfig, address: str | None = None) -> grpc.aio.Channel:
    """An aio channel to *address* (by default the first of ``config.servers``), secure
    when TLS is configured.

    The channel's own reconnect backoff (1 s growing to 120 s by default) is what finds
    a server that came back: the agent's Connect waits for the channel to be ready, so
    it is capped at :data:`CHANNEL_MAX_BACKOFF_S` (and at the agent's own cap), which
    puts every agent back on its stream within about that long of the server serving.
    """
    initial_ms = int(config.reconnect_initial_s * 1000)
    maximum_ms = max(int(min(config.reconnect_max_s, CHANNEL_MAX_BACKOFF_S) * 1000), initial_ms)
    options = [
        ("grpc.initial_reconnect_backoff_ms", initial_ms),
        ("grpc.min_reconnect_backoff_ms", initial_ms),
        ("grpc.max_reconnect_backoff_ms", maximum_ms),
        # Ping an idle stream so that a server that vanished without closing the
        # connection (a dead machine, a dropped route) is noticed in seconds, not at
        # TCP's retransmission timeout. The server permits pings every 5 s. While the
        # agent writes (heartbeats), an unanswered ping times out after
        # ping_timeout_ms (60 s by default), not keepalive_timeout_ms: both are 5 s, so a
        # hung server (stopped process, dead machine) is left within 15 s.
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.http2.ping_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    target = address or config.servers[0]
    if not config.uses_tls:
        return grpc.aio.insecure_channel(target, options=options)

    def read(path: Path | None) -> bytes | None:
        return None if path is None else path.read_bytes()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(config.ca_cert),
        private_key=read(config.client_key),
        certificate_chain=read(config.client_cert),
    )
    return grpc.aio.secure_channel(target, credentials, options=options)


async def channel_reached(channel: grpc.aio.Channel, timeout_s: float) -> bool:
    """Connect *channel*; False when it fails, or is not connected within *timeout_s*.

    A failure counts once the channel has tried again: a channel that starts in
    ``TRANSIENT_FAILURE`` (from an earlier try) is given its next try.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    state = channel.get_state(try_to_connect=True)
    first = True
    while state is not grpc.ChannelConnectivity.READY:
        if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE and not first:
            return False
        first = False
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        try:
            await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
        except TimeoutError:
            return False
        state = channel.get_state(try_to_connect=True)
    return True


class _StateDirLock:
    """An exclusive ``flock`` on ``state_dir/agent.lock``: one agent per outbox."""

    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / "agent.lock"
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise AgentError(f"another agent is running with state directory {state_dir}") from None

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)


class Agent:
    """A gyoza agent: an async context manager with a :meth:`run` method.

    Parameters
    ----------
    config : AgentConfig
        The configuration.
    executor : Executor | None
        Executor to use instead of the one ``config.executor`` names (tests).
    capacity_probe : Callable[[], CapacityInfo] | None
        Measures the capacity for the Hello and each heartbeat; by default
        :func:`~gyoza.agent.capacity.probe_capacity` (cgroups, NVML) with the declared
        GPUs and the configured CPU and memory overrides. Runs in a worker thread.
    channel : grpc.aio.Channel | None
        Channel to the server, shared by the caller (not closed by the agent); by default
        the agent makes its own from the configuration.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        executor: Executor | None = None,
        capacity_probe: CapacityProbe | None = None,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.config = config
        self._executor = executor
        self._probe: CapacityProbe = capacity_probe or partial(
            probe_capacity, config.declared_gpus, cpu=config.cpu, ram_mb=config.ram_mb
        )
        # One channel per server address, made when first used; a given channel is the
        # only one (its address is the caller's business).
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._given_channel = channel
        self._address_index = 0
        # The address a round of failed tries began at (None: connected since).
        self._round_start: int | None = None
        self._address: str | None = None
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {config.token}"),) if config.token else ()
        )
        self._backoff = Backoff(config.reconnect_initial_s, config.reconnect_max_s)
        self._state = ConnectionState.DISCONNECTED
        self._state_changed = asyncio.Event()
        self._draining = False  # drained locally (drain())
        # Drained by the server: for this session only, as the server tells each new
        # session again while an operator's drain lasts (it is stored there).
        self._drained_by_server = False
        self._stopping = False
        self._running = False
        self._opened = asyncio.Event()
        self._stop = asyncio.Event()
        self._done = asyncio.Event()
        self._failure: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._starts: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._outbox: Outbox | None = None
        self._session: Session | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._lock: _StateDirLock | None = None
        self._capacity: agent_pb2.Capacity | None = None

    # -- what the agent is doing -----------------------------------------------------

    @property
    def name(self) -> str:
        """The agent's name."""
        return self.config.name

    @property
    def state(self) -> ConnectionState:
        """The connection state."""
        return self._state

    @property
    def draining(self) -> bool:
        """True once told to drain (by the server or :meth:`drain`), or shutting down."""
        return self._draining or self._drained_by_server or self._stopping

    @property
    def outbox_depth(self) -> int:
        """Reports stored and not acknowledged yet (0 before the agent started)."""
        return 0 if self._outbox is None else self._outbox.depth

    @property
    def held_attempts(self) -> int:
        """Attempts the agent holds (0 before the agent started)."""
        return 0 if self._outbox is None else len(self._outbox.held())

    @property
    def outbox(self) -> Outbox:
        """The outbox (once the agent has started)."""
        if self._outbox is None:
            raise RuntimeError("the agent has not started")
        return self._outbox

    @property
    def executor(self) -> Executor:
        """The executor (once the agent has started, or when one was given)."""
        if self._executor is None:
            raise RuntimeError("the agent has not started")
        return self._executor

    @property
    def session(self) -> Session | None:
        """The current stream session, if any."""
        return self._session

    async def wait_for_state(self, *states: ConnectionState) -> ConnectionState:
        """Return the state once it is one of *states* (wrap in a timeout).

        Raises
        ------
        AgentError
            When the agent stopped first (and STOPPED was not asked for).
        """
        while self._state not in states:
            if self._state is ConnectionState.STOPPED:
                raise AgentError("the agent stopped") from self._failure
            await self._state_changed.wait()
        return self._state

    def drain(self, reason: str = "drain requested locally") -> None:
        """Take no new work from now on; held attempts go on."""
        if not self._draining:
            log.info("agent %s draining: %s", self.name, reason)
        self._draining = True
        if self._state is ConnectionState.CONNECTED:
            self._set_state(ConnectionState.DRAINING)

    def undrain(self, reason: str = "undrain requested locally") -> None:
        """End a local :meth:`drain`; a drain by the server or a shutdown still holds."""
        if self._draining:
            log.info("agent %s ends its local drain: %s", self.name, reason)
        self._draining = False
        self._update_draining_state()

    def _update_draining_state(self) -> None:
        if self._state is ConnectionState.DRAINING and not self.draining:
            self._set_state(ConnectionState.CONNECTED)
        elif self._state is ConnectionState.CONNECTED and self.draining:
            self._set_state(ConnectionState.DRAINING)

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        """Start :meth:`run` in the background; return once the outbox is open and held
        attempts are adopted (raises what made the start fail)."""
        self._run_task = asyncio.create_task(self.run(), name=f"agent {self.name}")
        opened = asyncio.create_task(self._opened.wait())
        await asyncio.wait({self._run_task, opened}, return_when=asyncio.FIRST_COMPLETED)
        opened.cancel()
        if self._run_task.done():
            self._run_task.result()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Shut down (see :meth:`shutdown`); raise the agent's failure, if any."""
        await self.shutdown()
        if self._run_task is not None and self._run_task.done():
            failure = None if self._run_task.cancelled() else self._run_task.exception()
            if failure is not None and exc is None:
                raise failure
            if failure is not None:
                log.error("agent %s failed: %r", self.name, failure)

    async def run(self) -> None:
        """Run the agent until :meth:`shutdown` (or a fatal error).

        Raises
        ------
        AgentError
            The server refused the agent, or the state directory is in use.
        Exception
            The first unexpected error of any sub-task (fail fast).
        """
        if self._running or self._done.is_set():
            raise RuntimeError("an Agent runs once")
        self._running = True
        try:
            await self._open()
            self._opened.set()
            await self._serve()
        finally:
            await self._close()
            self._set_state(ConnectionState.STOPPED)
            self._done.set()
        if self._failure is not None:
            raise self._failure

    async def shutdown(self, drain_timeout_s: float | None = None) -> None:
        """Stop the agent, draining first.

        Parameters
        ----------
        drain_timeout_s : float | None
            How long to wait for held attempts to end and be acknowledged, refusing new
            work meanwhile; ``config.shutdown_timeout_s`` when ``None``. Zero stops at
            once. Containers still running are left running for the next start.
        """
        timeout = drain_timeout_s
        if timeout is None:
            timeout = self.config.shutdown_timeout_s
            if self.config.on_stop == "drain" and timeout == 0:
                timeout = math.inf  # --on-stop drain: as long as the held runs take
        first = not self._stopping
        self._stopping = True
        if first and self._state is ConnectionState.CONNECTED:
            self._set_state(ConnectionState.DRAINING)
        # A later call (a second Ctrl-C) with no timeout stops at once.
        if first and timeout > 0 and self._outbox is not None and not self._done.is_set():
            waits = {
                asyncio.create_task(self._outbox.wait_empty()),
                asyncio.create_task(self._done.wait()),
                asyncio.create_task(self._stop.wait()),
            }
            if math.isinf(timeout):
                log.info(
                    "agent %s drains before stopping: %d attempt(s) held",
                    self.name,
                    len(self._outbox.held()),
                )
            _, pending = await asyncio.wait(
                waits,
                timeout=None if math.isinf(timeout) else timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
            for task in pending:
                task.cancel()
            if not self._outbox.empty:
                log.warning(
                    "agent %s stops with %d attempt(s) held", self.name, len(self._outbox.held())
                )
        self._stop.set()
        if self._running:
            await self._done.wait()

    # -- start and stop ----------------------------------------------------------------

    async def _open(self) -> None:
        config = self.config
        self._lock = _StateDirLock(config.state_dir)
        self._outbox = await Outbox.open(
            config.state_dir / OUTBOX_FILE,
            agent_name=config.name,
            synchronous=config.outbox_synchronous,
        )
        self._outbox.on_failure(self._fail)
        if self._executor is None:
            self._executor = create_executor(config)
        await self._adopt()

    async def _adopt(self) -> None:
        """Hand the attempts a previous run left unfinished to the executor."""
        outbox, executor = self.outbox, self.executor

        async def adopt(message: pb.Assignment) -> None:
            assignment = assignment_from_proto(message)
            sink = OutboxSink(outbox, assignment.run_id, assignment.attempt)
            try:
                adopted = await executor.adopt(assignment, sink)
            except Exception:
                log.exception("agent: adopting %s/%d failed", *assignment.key)
                adopted = False
            if adopted:
                log.info("agent: adopted %s/%d", *assignment.key)
            elif not sink.finished:
                await sink.event(
                    ReportedEvent(
                        EventType.FAILED,
                        NOT_ADOPTED,
                        failure_class=FailureClass.EXECUTOR_ERROR,
                        error_message=NOT_ADOPTED,
                    )
                )

        await asyncio.gather(*(adopt(a) for a in outbox.unfinished()))
        try:
            pruned = await executor.prune({(h.run_id, h.attempt) for h in outbox.held()})
        except Exception:
            log.exception("agent: removing leftovers of earlier attempts failed")
        else:
            for run_id, attempt in pruned:
                log.info("agent: removed what was left of %s/%d", run_id, attempt)

    async def _close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._executor is not None:
            try:
                await self._executor.close()
            except Exception:
                log.exception("agent %s: closing the executor failed", self.name)
        if self._outbox is not None:
            await self._outbox.close()
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _fail(self, exc: BaseException) -> None:
        """Fail fast: remember the first error and stop."""
        if self._failure is None:
            log.error("agent %s failed: %r", self.name, exc)
            self._failure = exc
        self._stop.set()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and task.exception() is not None:
                self._fail(task.exception())  # type: ignore[arg-type]

        task.add_done_callback(done)
        return task

    def _set_state(self, state: ConnectionState) -> None:
        if state is self._state:
            return
        welcomed = state in (ConnectionState.CONNECTED, ConnectionState.DRAINING)
        metrics.CONNECTED.set(1 if welcomed else 0)
        log.debug("agent %s: %s -> %s", self.name, self._state.value, state.value)
        self._state = state
        event, self._state_changed = self._state_changed, asyncio.Event()
        event.set()

    # -- the connection loop -----------------------------------------------------------

    async def _serve(self) -> None:
        connection = asyncio.create_task(self._connect_loop(), name=f"agent {self.name} stream")
        stop = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({connection, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (connection, stop):
                task.cancel()
            await asyncio.gather(connection, stop, return_exceptions=True)
        if not connection.cancelled() and connection.exception() is not None:
            self._fail(connection.exception())  # type: ignore[arg-type]

    @property
    def address(self) -> str | None:
        """The server address in use (being connected to, or connected), if any."""
        return self._address

    def _channel_to(self, address: str) -> grpc.aio.Channel:
        if self._given_channel is not None:
            return self._given_channel
        if address not in self._channels:
            self._channels[address] = create_channel(self.config, address)
        return self._channels[address]

    async def _connect_loop(self) -> None:
        servers = self.config.servers
        failover = len(servers) > 1 and self._given_channel is None
        heartbeat_s = self.config.heartbeat_interval_s
        while True:
            self._set_state(ConnectionState.CONNECTING)
            self._drained_by_server = False  # a drain that still holds is sent again
            address = self._address = servers[self._address_index % len(servers)]
            channel = self._channel_to(address)
            if failover and not await channel_reached(channel, CONNECT_TIMEOUT_S):
                log.warning("agent %s: cannot connect to %s", self.name, address)
                await self._next_address(servers)
                continue
            session = Session(
                pb_grpc.AgentServiceStub(channel),
                self.outbox,
                self,
                metadata=self._metadata,
                heartbeat_interval_s=heartbeat_s,
                welcome_timeout_s=self.config.welcome_timeout_s,
                wait_for_ready=not failover,
                coalesce_s=self.config.coalesce_ms / 1000,
            )
            self._session = session
            try:
                await session.run()
            except grpc.aio.AioRpcError as exc:
                if exc.code() in FATAL_CODES:
                    raise AgentError(
                        f"the server refused agent {self.name}: {exc.code().name}: {exc.details()}",
                        exc.code(),
                    ) from exc
                log.warning(
                    "agent %s: stream to %s failed: %s: %s",
                    self.name,
                    address,
                    exc.code().name,
                    exc.details(),
                )
            except (SessionEnded, TimeoutError, asyncio.InvalidStateError) as exc:
                log.warning(
                    "agent %s: stream to %s ended: %s",
                    self.name,
                    address,
                    exc or type(exc).__name__,
                )
            finally:
                self._session = None
                heartbeat_s = session.heartbeat_interval_s
            await self._next_address(servers)

    async def _next_address(self, servers: tuple[str, ...]) -> None:
        """Pause, then try the next address (the same one when there is only one): the
        shortest pause while this round of failed tries has addresses left, the growing
        backoff once every address failed (or the only one)."""
        self._set_state(ConnectionState.DISCONNECTED)
        metrics.RECONNECTS.inc()
        failed = self._address_index
        if self._round_start is None:
            self._round_start = failed
        self._address_index = (failed + 1) % len(servers)
        if self._address_index != self._round_start:
            # Another address of this round is still untried: go to it after the
            # shortest pause, so that a dead replica costs one failed try, not a
            # growing backoff. A whole round that failed backs off as one try.
            delay = self._backoff.initial
        else:
            delay = self._backoff.next_delay()
        log.info(
            "agent %s: reconnecting to %s in %.2fs",
            self.name,
            servers[self._address_index],
            delay,
        )
        await asyncio.sleep(delay)

    # -- SessionHandler ----------------------------------------------------------------

    async def hello(self) -> pb.Hello:
        """The Hello: capacity, every held attempt with its last seq, draining."""
        capacity = await self.capacity()
        held = [
            pb.HeldAttempt(
                run_id=h.run_id, attempt=h.attempt, last_seq=h.last_seq, finished=h.finished
            )
            for h in self.outbox.held()
        ]
        return pb.Hello(
            agent_name=self.name,
            capacity=capacity,
            held=held,
            labels=agent_labels(
                self.config.labels,
                executor=self.config.executor,
                capacity=capacity,
                version=agent_version(),
            ),
            version=agent_version(),
            # The agent's own drain only: the server keeps (and re-sends) its own.
            draining=self._draining or self._stopping,
        )

    async def capacity(self) -> agent_pb2.Capacity:
        """Fresh capacity (the last one measured when the probe fails)."""
        try:
            measured = await asyncio.to_thread(self._probe)
        except Exception:
            if self._capacity is None:
                raise
            log.exception("agent %s: capacity probe failed; reporting the last one", self.name)
            return self._capacity
        self._capacity = capacity_to_proto(measured)
        return self._capacity

    def on_welcome(self, session: Session, welcome: pb.Welcome) -> None:
        """Welcomed: the connection works; reset the backoff."""
        self._backoff.reset()
        self._round_start = None
        lease_s = welcome.lease_timeout.ToNanoseconds() / 1e9
        if lease_s > 0:
            # Never back off so long that the server declares this agent lost: its runs
            # would fail while it merely waits to reconnect. (Jitter still applies.)
            self._backoff.maximum = max(
                min(self.config.reconnect_max_s, lease_s / 3), self._backoff.initial
            )
        self._set_state(ConnectionState.DRAINING if self.draining else ConnectionState.CONNECTED)
        log.info(
            "agent %s connected to %s (session %s, %d held)",
            self.name,
            self._address,
            welcome.session_id,
            len(self.outbox.held()),
        )

    async def on_assignment(self, session: Session, assignment: pb.Assignment) -> None:
        """Accept (hold durably, reply, start in the background) or refuse."""
        run_id, attempt = assignment.run_id, assignment.attempt
        if self.outbox.holds(run_id, attempt):
            session.reply(run_id, attempt, accepted=True)  # a repeat: already ours
            return
        refusal = self._refusal(assignment)
        if refusal is not None:
            log.info("agent %s refuses %s/%d: %s", self.name, run_id, attempt, refusal)
            session.reply(run_id, attempt, accepted=False, reason=refusal)
            return
        # Holding, replying and starting happen together or not at all: the stream may
        # end (and this handler be cancelled) while the hold commits, and an attempt held
        # but never started would wait forever (the next Hello lists it as held). So they
        # run in a task of the agent's own, which a session's end does not cancel; the
        # handler waits for it to keep the stream's messages in order.
        accept = self._spawn(self._accept(session, assignment), name=f"accept {run_id}/{attempt}")
        await asyncio.shield(accept)

    async def _accept(self, session: Session, assignment: pb.Assignment) -> None:
        run_id, attempt = assignment.run_id, assignment.attempt
        await self.outbox.hold(assignment)
        session.reply(run_id, attempt, accepted=True)  # a no-op once the session ended
        log.info(
            "agent %s accepted %s/%d",
            self.name,
            run_id,
            attempt,
            extra={"run_id": run_id, "attempt": attempt, "gpu_ids": list(assignment.gpu_ids)},
        )
        task = self._spawn(
            self._start(assignment_from_proto(assignment)), name=f"start {run_id}/{attempt}"
        )
        self._starts[(run_id, attempt)] = task
        task.add_done_callback(lambda _: self._starts.pop((run_id, attempt), None))

    def _refusal(self, assignment: pb.Assignment) -> str | None:
        if self._stopping:
            return "agent is shutting down"
        if self._draining or self._drained_by_server:
            return "agent is draining"
        try:
            return self.executor.refusal(assignment_from_proto(assignment))
        except Exception as exc:
            return f"cannot read the assignment: {exc}"

    async def _start(self, assignment: Assignment) -> None:
        sink = OutboxSink(self.outbox, assignment.run_id, assignment.attempt)
        try:
            await self.executor.start(assignment, sink)
        except Exception as exc:
            log.exception(
                "agent %s: the executor failed to start %s/%d", self.name, *assignment.key
            )
            if not sink.finished:
                message = f"the executor failed to start the attempt: {exc}"
                await sink.event(
                    ReportedEvent(
                        EventType.FAILED,
                        message,
                        failure_class=FailureClass.EXECUTOR_ERROR,
                        error_message=message,
                    )
                )

    def on_cancel(self, cancel: pb.Cancel) -> None:
        """Cancel in the executor, once its start (if under way) returned."""
        if not self.outbox.holds(cancel.run_id, cancel.attempt):
            log.info("agent %s: cancel of unknown %s/%d", self.name, cancel.run_id, cancel.attempt)
            return
        self._spawn(
            self._cancel(cancel.run_id, cancel.attempt, cancel.reason or "cancelled"),
            name=f"cancel {cancel.run_id}/{cancel.attempt}",
        )

    async def _cancel(self, run_id: str, attempt: int, reason: str) -> None:
        start = self._starts.get((run_id, attempt))
        if start is not None:
            await asyncio.wait({start})
        sink = OutboxSink(self.outbox, run_id, attempt)
        try:
            await self.executor.cancel(run_id, attempt, reason)
        except Exception as exc:
            log.exception(
                "agent %s: the executor failed to cancel %s/%d", self.name, run_id, attempt
            )
            reason = f"{reason} (the executor failed to stop it: {exc})"
        # An attempt the executor does not know (or failed to stop) must still end.
        if not sink.finished:
            await sink.event(
                ReportedEvent(EventType.CANCELLED, reason, failure_class=FailureClass.CANCELLED)
            )

    def on_nack(self, nack: pb.Nack) -> None:
        """A refused message; with ``drop_attempt`` the attempt is no longer ours."""
        log.warning(
            "agent %s: nack %s for %s/%d seq %d: %s",
            self.name,
            nack.reason,
            nack.run_id,
            nack.attempt,
            nack.seq,
            nack.message,
        )
        if not nack.drop_attempt or not self.outbox.holds(nack.run_id, nack.attempt):
            return
        # Forget first: whatever the executor reports while it stops is discarded.
        self.outbox.forget(nack.run_id, nack.attempt)
        self._spawn(
            self._drop(nack.run_id, nack.attempt, f"dropped by the server: {nack.reason}"),
            name=f"drop {nack.run_id}/{nack.attempt}",
        )

    async def _drop(self, run_id: str, attempt: int, reason: str) -> None:
        start = self._starts.get((run_id, attempt))
        if start is not None:
            await asyncio.wait({start})
        try:
            await self.executor.cancel(run_id, attempt, reason)
        except Exception:
            log.exception("agent %s: the executor failed to stop %s/%d", self.name, run_id, attempt)

    def on_drain(self, drain: pb.Drain) -> None:
        """The server asked the agent to drain (for this session; see ``draining``)."""
        if not self._drained_by_server:
            log.info("agent %s draining: %s", self.name, drain.reason or "drain requested")
        self._drained_by_server = True
        self._update_draining_state()

    def on_undrain(self, undrain: pb.Undrain) -> None:
        """The server ended its drain: take work again (unless drained locally or
        shutting down)."""
        if self._drained_by_server:
            log.info("agent %s takes work again: %s", self.name, undrain.reason or "undrained")
        self._drained_by_server = False
        self._update_draining_state()


async def run_agent(config: AgentConfig) -> None:
    """Run an agent until SIGINT or SIGTERM (the ``gyoza agent`` command).

    The first signal shuts down: with ``on_stop="leave"`` after
    ``config.shutdown_timeout_s`` of draining (0: at once), leaving containers running
    for the next agent process to adopt; with ``on_stop="drain"`` once every held
    attempt has ended and been acknowledged. A second signal stops at once.
    """
    agent = Agent(config)
    loop = asyncio.get_running_loop()
    endpoint: MetricsEndpoint | None = None
    if config.metrics_port is not None:
        endpoint = MetricsEndpoint("0.0.0.0", config.metrics_port)
        metrics.OUTBOX_REPORTS.set_function(lambda: agent.outbox_depth)
        metrics.HELD_ATTEMPTS.set_function(lambda: agent.held_attempts)
        log.info(
            "agent %s serves metrics on port %d",
            config.name,
            endpoint.port,
            extra={"metrics_port": endpoint.port},
        )
    signals = (signal.SIGINT, signal.SIGTERM)
    stopping: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        log.info("agent %s: %s received, shutting down", config.name, signal.Signals(signum).name)
        timeout = None if not stopping else 0.0
        stopping.append(loop.create_task(agent.shutdown(timeout)))

    for signum in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, on_signal, signum)
    try:
        await agent.run()
    finally:
        for signum in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signum)
        await asyncio.gather(*stopping, return_exceptions=True)
        if endpoint is not None:
            endpoint.close()
