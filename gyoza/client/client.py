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
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc

from gyoza import mapping
from gyoza.api.v1 import op_run_pb2, op_run_service_pb2
from gyoza.client.agents import Agent, agent_from_proto
from gyoza.client.calls import ApiCalls, RunFilter
from gyoza.client.streams import AttemptEvent, LogLine, RunChange, TopicEvent
from gyoza.models.op_attempt import OpAttempt
from gyoza.models.op_definition import OpDefinition
from gyoza.models.op_run import OpRun
from gyoza.models.resources import Constraints, EventDelivery, RetryPolicy

__all__ = ["DEFAULT_SERVER", "ApiCalls", "Client", "Page", "RunFilter", "open_channel"]

#: Where the client connects by default: the server's default listen address.
DEFAULT_SERVER = "127.0.0.1:50051"

#: A server that went away (a restart) is tried again at most every 2 s, not gRPC's
#: default of up to 2 minutes, so that a resumed watch sees it back soon.
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)

T = TypeVar("T")


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

    Attributes
    ----------
    api : ApiCalls
        The same calls returning the API's response messages as they came (what
        ``gyoza --output json`` prints).

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
        self.api = ApiCalls(self._channel, self._metadata, timeout)

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
        response = self.api.create_op_definition(definition)
        return mapping.definition_from_proto(response.op_definition)

    def get_definition(self, name: str, version: int | None = None) -> OpDefinition:
        """One version of a named op, the latest when *version* is ``None``.

        Raises
        ------
        NotFoundError
            No such name or version.
        """
        response = self.api.get_op_definition(name, version)
        return mapping.definition_from_proto(response.op_definition)

    def list_definitions(
        self, name: str | None = None, page_size: int = 0, page_token: str = ""
    ) -> Page[OpDefinition]:
        """One page of definitions: the latest version of each name, ordered by name, or
        every version of *name*, newest first."""
        response = self.api.list_op_definitions(name, page_size, page_token)
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
        return self.api.delete_op_definition(name, version).deleted_count

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
        response = self.api.create_op_run(
            definition=definition,
            definition_version=definition_version,
            image=image,
            inputs=inputs,
            priority=priority,
            constraints=constraints,
            retry_policy=retry_policy,
            event_delivery=event_delivery,
            request_id=request_id,
        )
        return mapping.run_from_proto(response.op_run)

    def get_run(self, run_id: str) -> OpRun:
        """A run with its current attempt.

        Raises
        ------
        NotFoundError
            No such run.
        """
        return mapping.run_from_proto(self.api.get_op_run(run_id).op_run)

    def list_runs(
        self, filters: RunFilter | None = None, page_size: int = 0, page_token: str = ""
    ) -> Page[OpRun]:
        """One page of runs, newest first unless ``filters.oldest_first``.

        The runs carry no events (use :meth:`list_events`).
        """
        response = self.api.list_op_runs(filters, page_size, page_token)
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
        return mapping.run_from_proto(self.api.cancel_op_run(run_id, reason).op_run)

    def retry_run(self, run_id: str) -> OpRun:
        """Start a new attempt of a FAILED or CANCELLED run; it is PENDING again.

        Raises
        ------
        NotFoundError
            No such run.
        FailedPreconditionError
            The run is not FAILED or CANCELLED (reason ``INVALID_TRANSITION``).
        """
        return mapping.run_from_proto(self.api.retry_op_run(run_id).op_run)

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
        self.api.delete_op_run(run_id)

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
        return mapping.run_from_proto(self.api.update_op_run_priority(run_id, priority).op_run)

    def list_attempts(self, run_id: str) -> list[OpAttempt]:
        """Every attempt of a run, first to last, each with its events.

        Raises
        ------
        NotFoundError
            No such run.
        """
        return [
            mapping.attempt_from_proto(a) for a in self.api.list_op_run_attempts(run_id).attempts
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
            response = self.api.list_op_run_events(run_id, attempt, page_token=token)
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
        for response in self.api.watch_op_run(run_id, after_sequence, timeout=timeout):
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
        for batch in self.api.subscribe_events(
            topic, after_offset, from_latest=from_latest, max_batch=TOPIC_BATCH, timeout=timeout
        ):
            yield _topic_event(batch)
            for response in batch.more:
                yield _topic_event(response)

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
        for response in self.api.get_op_run_logs(
            run_id, attempt, follow, after_line, timeout=timeout
        ):
            for line in response.lines:
                yield log_line_from_proto(line, response.attempt)

    # ------------------------------------------------------------------
    # Agents
    # ------------------------------------------------------------------

    def list_agents(self, include_disconnected: bool = False) -> list[Agent]:
        """The agents the server knows, with capacity, reservations and runs."""
        return [agent_from_proto(a) for a in self.api.list_all_agents(include_disconnected).agents]

    def drain_agent(self, name: str) -> Agent:
        """Tell an agent to take no new work and finish what it holds; it stays drained
        across its restarts and the server's until :meth:`undrain_agent`.

        Raises
        ------
        NotFoundError
            No such agent.
        """
        return agent_from_proto(self.api.drain_agent(name).agent)

    def undrain_agent(self, name: str) -> Agent:
        """End an agent's drain: it takes new work again (at once, or when it reconnects).

        Raises
        ------
        NotFoundError
            No such agent is known or drained.
        """
        return agent_from_proto(self.api.undrain_agent(name).agent)


def log_line_from_proto(line: op_run_pb2.LogLine, attempt: int) -> LogLine:
    """A log line of *attempt* from its API message."""
    return LogLine(
        attempt=attempt,
        number=line.number,
        text=line.text,
        stream=mapping.log_stream_from_proto(line.stream, ""),
        time=mapping.optional_timestamp_from_proto(line, "time"),
    )


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
    # The defaults (a short reconnect backoff), then the caller's, which win.
    arguments = list({**dict(CHANNEL_OPTIONS), **dict(options)}.items())
    if not (tls or tls_ca or tls_cert):
        return grpc.insecure_channel(target, options=arguments)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls_ca),
        private_key=_read(tls_key),
        certificate_chain=_read(tls_cert),
    )
    return grpc.secure_channel(target, credentials, options=arguments)


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


TOPIC_BATCH = 100
"""Most events :meth:`Client.subscribe` takes per ``SubscribeEvents`` message."""


def _topic_event(response: op_run_service_pb2.SubscribeEventsResponse) -> TopicEvent:
    """One topic record of a ``SubscribeEvents`` message."""
    attempt, event = mapping.event_from_proto(response.event)
    state = None
    if response.run_state:
        state = mapping.state_from_proto(response.run_state)
    return TopicEvent(
        offset=response.offset,
        topic=response.topic,
        run_id=response.run_id,
        attempt=attempt,
        event=event,
        run_state=state,
        op_definition=response.op_definition or None,
        attributes=dict(response.attributes),
    )
