"""The synchronous Python client of a gyoza server.

::

    from gyoza.client import Client

    with Client("gyoza.example.com:50051", api_key="...", tls=True) as client:
        run = client.create_run(definition="render", inputs={"prompt": "a cat"})
        for sequence, run, event in client.watch_run(run.id):
            print(sequence, run.state, event)

Every method returns domain objects (:class:`~gyoza.models.op_run.OpRun`,
:class:`~gyoza.models.op_definition.OpDefinition`...) and raises a
:class:`~gyoza.client.errors.GyozaClientError` subclass when the server refuses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc

from gyoza import mapping
from gyoza.api.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    definition_service_pb2,
    definition_service_pb2_grpc,
    op_run_service_pb2,
    op_run_service_pb2_grpc,
)
from gyoza.client.agents import Agent, agent_from_proto
from gyoza.client.errors import error_from_rpc
from gyoza.client.streams import AttemptEvent, LogLine, RunChange, TopicEvent
from gyoza.models.op_attempt import OpAttempt
from gyoza.models.op_definition import OpDefinition
from gyoza.models.op_run import OpRun
from gyoza.models.resources import Constraints, EventDelivery, OpRunState, RetryPolicy

__all__ = ["DEFAULT_SERVER", "Client", "Page", "RunFilter", "open_channel"]

#: Where the client connects by default: the server's default listen address.
DEFAULT_SERVER = "127.0.0.1:50051"

T = TypeVar("T")
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list call.

    Parameters
    ----------
    items : list[T]
        The page's items.
    next_page_token : str
        Token for the next page; empty on the last page.
    """

    items: list[T]
    next_page_token: str = ""


@dataclass(frozen=True)
class RunFilter:
    """Filters of :meth:`Client.list_runs`; they combine with AND.

    Parameters
    ----------
    states : Sequence[OpRunState]
        Only runs in one of these states; empty means any.
    definition : str | None
        Only runs created from this definition.
    image : str | None
        Only runs of this image.
    created_after, created_before : datetime | None
        Only runs created at or after / before these (aware) times.
    oldest_first : bool
        Oldest first instead of newest first.
    """

    states: Sequence[OpRunState] = field(default_factory=tuple)
    definition: str | None = None
    image: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    oldest_first: bool = False


class Client:
    """A synchronous client over one gRPC channel.

    Parameters
    ----------
    target : str
        ``HOST:PORT`` of the server.
    api_key : str | None
        Sent as ``authorization: Bearer <key>`` metadata on every call.
    tls : bool
        Use TLS with the system's root certificates. Implied by any of the files below.
    tls_ca : str | Path | None
        PEM file of the CA that signed the server's certificate.
    tls_cert, tls_key : str | Path | None
        PEM files of this client's certificate and key, for mutual TLS (both or neither).
    timeout : float | None
        Deadline in seconds of each unary call (``None``: none). Streams have none.
    channel : grpc.Channel | None
        Use this channel instead of opening one (the TLS options are then ignored and
        :meth:`close` leaves it open).
    channel_options : Sequence[tuple[str, Any]]
        gRPC channel arguments of the channel it opens (``grpc.max_reconnect_backoff_ms``...).

    Raises
    ------
    ValueError
        If only one of ``tls_cert`` and ``tls_key`` is given.
    OSError
        If a certificate file cannot be read.
    """

    def __init__(
        self,
        target: str = DEFAULT_SERVER,
        *,
        api_key: str | None = None,
        tls: bool = False,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        timeout: float | None = 30.0,
        channel: grpc.Channel | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.target = target
        self.timeout = timeout
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )
        self._owns_channel = channel is None
        self._channel = (
            channel
            if channel is not None
            else open_channel(
                target,
                tls=tls,
                tls_ca=tls_ca,
                tls_cert=tls_cert,
                tls_key=tls_key,
                options=channel_options,
            )
        )
        self._definitions = definition_service_pb2_grpc.DefinitionServiceStub(self._channel)
        self._runs = op_run_service_pb2_grpc.OpRunServiceStub(self._channel)
        self._agents = agent_service_pb2_grpc.AgentServiceStub(self._channel)

    # ------------------------------------------------------------------
    # Lifecycle
    # ------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel (when the client opened it); streams in progress end."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------
    # Definitions
    # ------------------------------------------------------------------

    def create_definition(self, definition: OpDefinition) -> OpDefinition:
        """Store a new version of a named op; returns it with its version.

        Raises
        ------
        InvalidArgumentError
            With every violation (name, image, input specs, constraints, policy).
        """
        request = definition_service_pb2.CreateOpDefinitionRequest(
            op_definition=mapping.definition_to_proto(definition)
        )
        response = self._call(self._definitions.CreateOpDefinition, request)
        return mapping.definition_from_proto(response.op_definition)

    def get_definition(self, name: str, version: int | None = None) -> OpDefinition:
        """One version of a named op, the latest when *version* is ``None``.

        Raises
        ------
        NotFoundError
            No such name or version.
        """
        request = definition_service_pb2.GetOpDefinitionRequest(name=name, version=version or 0)
        response = self._call(self._definitions.GetOpDefinition, request)
        return mapping.definition_from_proto(response.op_definition)

    def list_definitions(
        self, name: str | None = None, page_size: int = 0, page_token: str = ""
    ) -> Page[OpDefinition]:
        """One page of definitions: the latest version of each name, ordered by name, or
        every version of *name*, newest first."""
        request = definition_service_pb2.ListOpDefinitionsRequest(
            name=name or "", page_size=page_size, page_token=page_token
        )
        response = self._call(self._definitions.ListOpDefinitions, request)
        return Page(
            [mapping.definition_from_proto(d) for d in response.op_definitions],
            response.next_page_token,
        )

    def iter_definitions(
        self, name: str | None = None, page_size: int = 0
    ) -> Iterator[OpDefinition]:
        """Every definition :meth:`list_definitions` would list, page after page."""
        return _all_pages(lambda token: self.list_definitions(name, page_size, token))

    def delete_definition(self, name: str, version: int | None = None) -> int:
        """Delete one version of a named op, or every version; returns how many went.

        Raises
        ------
        NotFoundError
            No such name or version.
        """
        request = definition_service_pb2.DeleteOpDefinitionRequest(name=name, version=version or 0)
        return self._call(self._definitions.DeleteOpDefinition, request).deleted_count

    # ------------------------------------------------------------------
    # Runs
    # ------------------------------------------------------------------

    def create_run(
        self,
        *,
        definition: str | None = None,
        definition_version: int | None = None,
        image: str | None = None,
        inputs: Mapping[str, Any] | None = None,
        priority: int = 0,
        constraints: Constraints | None = None,
        retry_policy: RetryPolicy | None = None,
        event_delivery: EventDelivery | None = None,
        request_id: str | None = None,
    ) -> OpRun:
        """Create a run from a definition (by name) or ad hoc from an image.

        Settings left ``None`` take the definition's (or the server's defaults);
        given, they replace them whole.

        Raises
        ------
        InvalidArgumentError
            Neither or both of definition and image, inputs that do not fit the
            definition (every violation listed), bad constraints, negative priority.
        NotFoundError
            No such definition.
        AlreadyExistsError
            *request_id* was used for a different request.
        TypeError, ValueError
            *inputs* hold something that is not a JSON value.
        """
        request = op_run_service_pb2.CreateOpRunRequest(
            op_definition=definition or "",
            op_definition_version=definition_version or 0,
            image=image or "",
            inputs=mapping.struct_to_proto(inputs or {}, "inputs"),
            priority=priority,
            request_id=request_id or "",
        )
        if constraints is not None:
            request.constraints.CopyFrom(mapping.constraints_to_proto(constraints))
        if retry_policy is not None:
            request.retry_policy.CopyFrom(mapping.retry_policy_to_proto(retry_policy))
        if event_delivery is not None:
            request.event_delivery.CopyFrom(mapping.event_delivery_to_proto(event_delivery))
        return mapping.run_from_proto(self._call(self._runs.CreateOpRun, request).op_run)

    def get_run(self, run_id: str) -> OpRun:
        """A run with its current attempt.

        Raises
        ------
        NotFoundError
            No such run.
        """
        request = op_run_service_pb2.GetOpRunRequest(run_id=run_id)
        return mapping.run_from_proto(self._call(self._runs.GetOpRun, request).op_run)

    def list_runs(
        self, filters: RunFilter | None = None, page_size: int = 0, page_token: str = ""
    ) -> Page[OpRun]:
        """One page of runs, newest first unless ``filters.oldest_first``.

        The runs carry no events (use :meth:`list_events`).
        """
        filters = filters or RunFilter()
        request = op_run_service_pb2.ListOpRunsRequest(
            page_size=page_size,
            page_token=page_token,
            states=[mapping.state_to_proto(s) for s in filters.states],
            op_definition=filters.definition or "",
            image=filters.image or "",
            oldest_first=filters.oldest_first,
        )
        if filters.created_after is not None:
            request.created_after.CopyFrom(mapping.timestamp_to_proto(filters.created_after))
        if filters.created_before is not None:
            request.created_before.CopyFrom(mapping.timestamp_to_proto(filters.created_before))
        response = self._call(self._runs.ListOpRuns, request)
        return Page([mapping.run_from_proto(r) for r in response.op_runs], response.next_page_token)

    def iter_runs(self, filters: RunFilter | None = None, page_size: int = 0) -> Iterator[OpRun]:
        """Every run :meth:`list_runs` would list, page after page (lazily: stop
        iterating to stop asking)."""
        return _all_pages(lambda token: self.list_runs(filters, page_size, token))

    def cancel_run(self, run_id: str, reason: str = "") -> OpRun:
        """Cancel a run: a PENDING run is CANCELLED at once; an ASSIGNED or RUNNING one is
        marked ``cancel_requested`` and reads CANCELLED once its agent stopped it.

        Raises
        ------
        NotFoundError
            No such run.
        FailedPreconditionError
            The run is already terminal (reason ``RUN_LOCKED``).
        """
        request = op_run_service_pb2.CancelOpRunRequest(run_id=run_id, reason=reason)
        return mapping.run_from_proto(self._call(self._runs.CancelOpRun, request).op_run)

    def retry_run(self, run_id: str) -> OpRun:
        """Start a new attempt of a FAILED or CANCELLED run; it is PENDING again.

        Raises
        ------
        NotFoundError
            No such run.
        FailedPreconditionError
            The run is not FAILED or CANCELLED (reason ``INVALID_TRANSITION``).
        """
        request = op_run_service_pb2.RetryOpRunRequest(run_id=run_id)
        return mapping.run_from_proto(self._call(self._runs.RetryOpRun, request).op_run)

    def delete_run(self, run_id: str) -> None:
        """Delete a finished run with its attempts, events, log lines and topic records.

        Raises
        ------
        NotFoundError
            No such run.
        FailedPreconditionError
            The run may still change: it is active or waits for an automatic retry
            (reason ``RUN_NOT_FINISHED``).
        """
        request = op_run_service_pb2.DeleteOpRunRequest(run_id=run_id)
        self._call(self._runs.DeleteOpRun, request)

    def set_priority(self, run_id: str, priority: int) -> OpRun:
        """Change a run's priority (at least 0); a pending run is re-queued at once.

        Raises
        ------
        InvalidArgumentError
            Negative priority.
        NotFoundError
            No such run.
        FailedPreconditionError
            The run is terminal.
        """
        request = op_run_service_pb2.UpdateOpRunPriorityRequest(run_id=run_id, priority=priority)
        return mapping.run_from_proto(self._call(self._runs.UpdateOpRunPriority, request).op_run)

    def list_attempts(self, run_id: str) -> list[OpAttempt]:
        """Every attempt of a run, first to last, each with its events.

        Raises
        ------
        NotFoundError
            No such run.
        """
        request = op_run_service_pb2.ListOpRunAttemptsRequest(run_id=run_id)
        return [
            mapping.attempt_from_proto(a)
            for a in self._call(self._runs.ListOpRunAttempts, request).attempts
        ]

    def list_events(self, run_id: str, attempt: int = 0) -> list[AttemptEvent]:
        """A run's events in order, of one attempt or (``attempt=0``) of every attempt.

        Reads every page.

        Raises
        ------
        NotFoundError
            No such run.
        """
        events: list[AttemptEvent] = []
        token = ""
        while True:
            request = op_run_service_pb2.ListOpRunEventsRequest(
                run_id=run_id, attempt=attempt, page_token=token
            )
            response = self._call(self._runs.ListOpRunEvents, request)
            events.extend(AttemptEvent(*mapping.event_from_proto(e)) for e in response.events)
            token = response.next_page_token
            if not token:
                return events

    def watch_run(
        self, run_id: str, after_sequence: int = 0, *, timeout: float | None = None
    ) -> Iterator[RunChange]:
        """The run's snapshot, then each change as it is committed, ending after the run
        is terminal.

        Each item unpacks as ``(sequence, run, event)`` and also tells the event's
        ``attempt``; resume with the last ``sequence`` seen. From ``after_sequence``, the
        server sends the snapshot, then every event after that sequence (those already
        in the snapshot too), each with the run as it is now. Close the iterator (or stop consuming it and let it go) to end
        the stream early. *timeout* bounds the whole stream (``None``: none).

        Raises
        ------
        NotFoundError
            No such run (when the first item is read).
        UnavailableError
            The server went away; resume from the last sequence.
        """
        request = op_run_service_pb2.WatchOpRunRequest(run_id=run_id, after_sequence=after_sequence)
        for response in self._stream(self._runs.WatchOpRun, request, timeout):
            run = mapping.run_from_proto(response.op_run)
            if response.HasField("event"):
                attempt, event = mapping.event_from_proto(response.event)
                yield RunChange(response.sequence, run, event, attempt)
            else:
                yield RunChange(response.sequence, run, None)

    def subscribe(
        self,
        topic: str,
        after_offset: int = 0,
        *,
        from_latest: bool = False,
        timeout: float | None = None,
    ) -> Iterator[TopicEvent]:
        """Every event of every run delivered on *topic*, in commit order, from the
        server's durable log. The stream stays open (until *timeout*, when given);
        resume with the last ``offset``.

        Raises
        ------
        InvalidArgumentError
            Empty topic.
        """
        request = op_run_service_pb2.SubscribeEventsRequest(
            topic=topic, after_offset=after_offset, from_latest=from_latest
        )
        for response in self._stream(self._runs.SubscribeEvents, request, timeout):
            attempt, event = mapping.event_from_proto(response.event)
            state = None
            if response.run_state:
                state = mapping.state_from_proto(response.run_state)
            yield TopicEvent(
                offset=response.offset,
                topic=response.topic,
                run_id=response.run_id,
                attempt=attempt,
                event=event,
                run_state=state,
                op_definition=response.op_definition or None,
                attributes=dict(response.attributes),
            )

    def logs(
        self,
        run_id: str,
        attempt: int = 0,
        follow: bool = False,
        after_line: int = 0,
        *,
        timeout: float | None = None,
    ) -> Iterator[LogLine]:
        """An attempt's log lines (the current attempt's when *attempt* is 0); with
        *follow*, new lines as they come until the attempt ends. *timeout* bounds the
        whole stream.

        Raises
        ------
        NotFoundError
            No such run or attempt.
        """
        request = op_run_service_pb2.GetOpRunLogsRequest(
            run_id=run_id, attempt=attempt, follow=follow, after_line=after_line
        )
        for response in self._stream(self._runs.GetOpRunLogs, request, timeout):
            for line in response.lines:
                yield LogLine(
                    attempt=response.attempt,
                    number=line.number,
                    text=line.text,
                    stream=mapping.log_stream_from_proto(line.stream, ""),
                    time=mapping.optional_timestamp_from_proto(line, "time"),
                )

    # ------------------------------------------------------------------
    # Agents
    # ------------------------------------------------------------------

    def list_agents(self, include_disconnected: bool = False) -> list[Agent]:
        """The agents the server knows, with capacity, reservations and runs."""
        agents: list[Agent] = []
        token = ""
        while True:  # every page
            request = agent_service_pb2.ListAgentsRequest(
                include_disconnected=include_disconnected, page_token=token
            )
            reply = self._call(self._agents.ListAgents, request)
            agents.extend(agent_from_proto(a) for a in reply.agents)
            token = reply.next_page_token
            if not token:
                return agents

    def drain_agent(self, name: str) -> Agent:
        """Tell an agent to take no new work and finish what it holds; it stays drained
        across its restarts and the server's until :meth:`undrain_agent`.

        Raises
        ------
        NotFoundError
            No such agent.
        """
        request = agent_service_pb2.DrainAgentRequest(name=name)
        return agent_from_proto(self._call(self._agents.DrainAgent, request).agent)

    def undrain_agent(self, name: str) -> Agent:
        """End an agent's drain: it takes new work again (at once, or when it reconnects).

        Raises
        ------
        NotFoundError
            No such agent is known or drained.
        """
        request = agent_service_pb2.UndrainAgentRequest(name=name)
        return agent_from_proto(self._call(self._agents.UndrainAgent, request).agent)

    # ------------------------------------------------------------------
    # Transport
    # ------------------------------------------------------------------

    def _call(
        self, method: grpc.UnaryUnaryMultiCallable[_Request, _Response], request: _Request
    ) -> _Response:
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error

    def _stream(
        self,
        method: grpc.UnaryStreamMultiCallable[_Request, _Response],
        request: _Request,
        timeout: float | None = None,
    ) -> Iterator[_Response]:
        call = method(request, metadata=self._metadata, timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as error:
            raise error_from_rpc(error) from error
        finally:
            # Ends the stream on the server too when the caller stops early.
            call.cancel()


def open_channel(
    target: str,
    *,
    tls: bool = False,
    tls_ca: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """Open a channel to *target*: plain, or TLS when *tls* or any PEM file is given;
    *options* are its gRPC channel arguments.

    Raises
    ------
    ValueError
        If only one of *tls_cert* and *tls_key* is given.
    OSError
        If a PEM file cannot be read.
    """
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("a client certificate needs its key: give both tls_cert and tls_key")
    if not (tls or tls_ca or tls_cert):
        return grpc.insecure_channel(target, options=list(options))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls_ca),
        private_key=_read(tls_key),
        certificate_chain=_read(tls_cert),
    )
    return grpc.secure_channel(target, credentials, options=list(options))


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).expanduser().read_bytes()


def _all_pages(fetch: Callable[[str], Page[T]]) -> Iterator[T]:
    token = ""
    while True:
        page = fetch(token)
        yield from page.items
        token = page.next_page_token
        if not token:
            return
