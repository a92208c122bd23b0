"""The follower's transparent forwarder: every gyoza call, as raw bytes, to the leader.

A replica that is not the leader serves health and reflection itself and hands every
other call to :class:`Forwarder`, which relays it to the leader's address
(:meth:`Forwarder.set_target`) without parsing a message:

- requests and responses travel as the bytes they came as, in both directions: no
  (de)serializer on either side. Each gyoza method is relayed as the kind its
  descriptor declares (unary, server-streaming, the agents' bidi ``Connect``); any
  other method as a bidi stream, which on the wire carries every kind (a unary call is
  a stream of one request and one response). The kind only picks grpc.aio's cheaper
  per-call machinery: a unary call relayed as a stream costs the forwarder half as
  much CPU again (``python -m bench.forward``);
- the invocation metadata goes along (less what gRPC itself owns), with
  ``x-gyoza-replica: <replica id>`` added, and so does the deadline;
- the leader's initial metadata, status code, details and trailing metadata come back
  as they were sent, ``grpc-status-details-bin`` (the ``google.rpc.ErrorInfo``) included;
- a caller that cancels cancels the leader's call; a leader that ends a call ends the
  caller's with the same status.

Guarantees
----------
A call is always forwarded to the target set when it began. :meth:`Forwarder.set_target`
ends every call in flight to the previous target with ``UNAVAILABLE``
(``LEADER_CHANGED``): agents reconnect, watchers resume, and no stream stays attached
to a replica that stopped leading. Errors of the forwarder itself come from the error
catalog (:mod:`gyoza.server.errors`): ``NO_LEADER`` while no target is set,
``LEADER_UNREACHABLE`` when the transport to the leader fails.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from gyoza.api.v1 import agent_service_pb2, definition_service_pb2, op_run_service_pb2
from gyoza.server.errors import (
    ApiError,
    leader_changed,
    leader_unreachable,
    no_leader,
    status_for,
)
from gyoza.server.handlers import Context, Handler
from gyoza.server.reflection import SERVICE_NAMES as REFLECTION_SERVICES

log = logging.getLogger("gyoza.server.forward")

REPLICA_METADATA_KEY = "x-gyoza-replica"
"""Metadata a forwarder adds to each call: the id of the replica the caller reached."""

LOCAL_SERVICES = ("grpc.health.v1.Health", *REFLECTION_SERVICES)
"""Services a follower answers itself: never forwarded."""

STATUS_DETAILS_KEY = "grpc-status-details-bin"

# Metadata gRPC sets on each hop itself: forwarding it would duplicate or contradict it
# (the deadline travels as the call's timeout, not as grpc-timeout).
_HOP_KEYS = frozenset({"user-agent", "content-type", "te", "host", REPLICA_METADATA_KEY})

_MAX_CACHED_METHODS = 256
"""Methods whose multi-callable is kept; names come from callers, so the cache is
bounded (a method past it is still forwarded, with a multi-callable made for the call)."""

DEFAULT_CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    # A dead leader is noticed by keepalive even on an idle agent stream; the servers
    # permit pings every 5 s without data (gyoza.server.app.grpc_options).
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
)


def channel_options(max_message_bytes: int) -> list[tuple[str, Any]]:
    """Options of the channel to the leader: the server's message size limits both ways
    (what the follower accepts, the leader may be sent and may answer), and keepalive."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *DEFAULT_CHANNEL_OPTIONS,
    ]


class MethodKind(enum.Enum):
    """How a method's messages travel, as its descriptor says."""

    UNARY = "unary"
    SERVER_STREAMING = "server_streaming"
    STREAMING = "streaming"
    """Client or bidi streaming, and every method this replica has no descriptor of."""


def _method_kinds() -> dict[str, MethodKind]:
    kinds: dict[str, MethodKind] = {}
    for api in (agent_service_pb2, definition_service_pb2, op_run_service_pb2):
        for service in api.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if method.client_streaming:
                    kind = MethodKind.STREAMING
                elif method.server_streaming:
                    kind = MethodKind.SERVER_STREAMING
                else:
                    kind = MethodKind.UNARY
                kinds[f"/{service.full_name}/{method.name}"] = kind
    return kinds


_METHOD_KINDS = _method_kinds()


def method_kind(method: str) -> MethodKind:
    """The kind of *method* (``/package.Service/Method``) as the gyoza API declares it;
    any other method is forwarded as a stream, which carries every kind."""
    return _METHOD_KINDS.get(method, MethodKind.STREAMING)


def is_local(method: str) -> bool:
    """True for a method a follower serves itself (health, reflection)."""
    service = method.lstrip("/").split("/", 1)[0]
    return service in LOCAL_SERVICES


def forwarded_metadata(
    metadata: Iterable[tuple[str, Any]] | None, replica_id: str
) -> list[tuple[str, str | bytes]]:
    """The caller's metadata as the leader gets it: gRPC's own keys (pseudo-headers,
    ``grpc-*``, ``user-agent``...) left out, ``x-gyoza-replica`` set to *replica_id*."""
    kept = [(key, value) for key, value in metadata or () if _passable(key)]
    kept.append((REPLICA_METADATA_KEY, replica_id))
    return kept


def _passable(key: str) -> bool:
    return not key.startswith((":", "grpc-")) and key not in _HOP_KEYS


def _returned(metadata: Iterable[tuple[str, Any]] | None) -> tuple[tuple[str, Any], ...]:
    """The leader's metadata as the caller gets it (gRPC's own keys are set again by
    this hop; the status details are the leader's, kept)."""
    return tuple(
        (key, value)
        for key, value in metadata or ()
        if key == STATUS_DETAILS_KEY or (_passable(key) and key != REPLICA_METADATA_KEY)
    )


class _Forwarded:
    """One call in flight, and why the forwarder ended it (when it did)."""

    __slots__ = ("call", "ended_by", "method")

    def __init__(self, method: str) -> None:
        self.method = method
        self.call: Any = None  # the leader's call: grpc.aio's call of the method's kind
        self.ended_by: ApiError | None = None

    def end(self, status: ApiError) -> None:
        if self.ended_by is None:
            self.ended_by = status
        if self.call is not None:
            self.call.cancel()


class Forwarder:
    """Forwards every gyoza call to one target, the leader, as raw bytes.

    Use it from the event loop that serves the calls. Serve it with::

        server.add_generic_rpc_handlers((forwarder.handler(),))

    next to health and reflection, on a server with the same options as a leader's
    (``gyoza.server.app.grpc_options``).

    Parameters
    ----------
    replica_id : str
        This replica's id, sent to the leader as ``x-gyoza-replica`` on every call.
    credentials : grpc.ChannelCredentials | None
        TLS credentials for the channel to the leader; None: plaintext.
    max_message_bytes : int
        Largest message forwarded either way (the server's ``max_message_bytes``).
    options : Sequence[tuple[str, Any]]
        More channel options, after (and so over) the defaults.
    """

    def __init__(
        self,
        *,
        replica_id: str,
        credentials: grpc.ChannelCredentials | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.replica_id = replica_id
        self._credentials = credentials
        self._options = [*channel_options(max_message_bytes), *options]
        self._target: str | None = None
        self._channel: grpc.aio.Channel | None = None
        self._callables: dict[str, Any] = {}  # method -> its multi-callable
        self._in_flight: set[_Forwarded] = set()
        self._open: Counter[str] = Counter()
        self._forwarded = 0
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    # -- what the replica's role switch uses ---------------------------------------

    @property
    def target(self) -> str | None:
        """The address calls are forwarded to; None while no leader is known."""
        return self._target

    def set_target(self, address: str | None) -> None:
        """Forward to *address* from now on.

        Calls in flight to the previous target end ``UNAVAILABLE`` (``LEADER_CHANGED``)
        and its channel is closed. ``None``: no leader is known, and new calls fail
        ``UNAVAILABLE`` (``NO_LEADER``). Setting the current target again changes
        nothing.
        """
        if address == self._target and not self._closed:
            return
        previous, self._target = self._target, address
        old_channel, self._channel = self._channel, None
        self._callables = {}
        if address is not None and not self._closed:
            self._channel = self._open_channel(address)
        for forwarded in list(self._in_flight):
            forwarded.end(leader_changed(previous, address))
        if old_channel is not None:
            self._close_later(old_channel)
        log.info("forwarding target set", extra={"target": address, "previous": previous})

    def handler(self) -> grpc.GenericRpcHandler:
        """The handler that forwards every method but health and reflection."""
        return _ForwardingHandler(self)

    @property
    def forwarded_calls(self) -> int:
        """Calls forwarded since the forwarder was made (each stream counts once)."""
        return self._forwarded

    @property
    def open_calls(self) -> Mapping[str, int]:
        """Calls in flight now, by full method name (``/gyoza.api.v1.AgentService/Connect``
        counts the agents' streams this replica holds)."""
        return {method: count for method, count in self._open.items() if count}

    async def close(self) -> None:
        """End every call in flight (``LEADER_CHANGED``, as for a new target) and close
        the channel; new calls fail ``NO_LEADER``."""
        self.set_target(None)
        self._closed = True
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- the channel ---------------------------------------------------------------

    def _open_channel(self, address: str) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(address, options=self._options)
        return grpc.aio.secure_channel(address, self._credentials, options=self._options)

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close(grace=None))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _callable(self, channel: grpc.aio.Channel, method: str) -> Any:
        found = self._callables.get(method)
        if found is None:
            # No serializers: the bytes go as they came.
            kind = method_kind(method)
            if kind is MethodKind.UNARY:
                found = channel.unary_unary(method)
            elif kind is MethodKind.SERVER_STREAMING:
                found = channel.unary_stream(method)
            else:
                found = channel.stream_stream(method)
            if len(self._callables) < _MAX_CACHED_METHODS:
                self._callables[method] = found
        return found

    # -- one call --------------------------------------------------------------------

    def _begin(self, method: str, context: Context, request: Any) -> _Forwarded | None:
        """Start the leader's call (None: no leader known)."""
        channel = self._channel
        if channel is None:
            return None
        forwarded = _Forwarded(method)
        # Registered before the first await: a target set from now on ends this call.
        self._in_flight.add(forwarded)
        self._forwarded += 1
        self._open[method] += 1
        call = self._callable(channel, method)(
            request,
            timeout=context.time_remaining(),
            metadata=forwarded_metadata(context.invocation_metadata(), self.replica_id),
        )
        forwarded.call = call
        # The caller cancelling (or its deadline) ends the leader's call, even while a
        # streaming handler waits at a yield, where it may never be resumed.
        context.add_done_callback(lambda _: call.cancel())  # type: ignore[arg-type]
        return forwarded

    def _end(self, forwarded: _Forwarded) -> None:
        self._in_flight.discard(forwarded)
        self._open[forwarded.method] -= 1

    async def forward_unary(self, method: str, request: bytes, context: Context) -> bytes:
        """Relay one unary call to the target, and its answer back to the caller."""
        forwarded = self._begin(method, context, request)
        if forwarded is None:
            await _abort(context, no_leader())
        assert forwarded is not None and forwarded.call is not None
        call = forwarded.call
        try:
            try:
                response: bytes = await call
            except (asyncio.CancelledError, grpc.aio.AioRpcError) as error:
                await self._failed(error, forwarded, context, answered=False)
                raise
            await _pass_initial(call, context)
            context.set_trailing_metadata(_returned(await call.trailing_metadata()))
            return response
        finally:
            self._end(forwarded)

    async def forward_stream(
        self, method: str, request: bytes | AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        """Relay one streaming call (server-streaming: *request* is its one message;
        otherwise the caller's request stream) to the target, and its answers back."""
        forwarded = self._begin(method, context, request)
        if forwarded is None:
            await _abort(context, no_leader())
        assert forwarded is not None and forwarded.call is not None
        call = forwarded.call
        answered = False
        try:
            try:
                # The leader's headers go on as soon as they come, before any message: a
                # subscriber waits for them (SubscribeEvents sends them once the
                # subscription is in place) while no record may come for a long time.
                initial = await call.initial_metadata()
                if not call.done():
                    answered = True
                    await context.send_initial_metadata(_returned(initial))
                async for message in call:
                    if not answered:
                        answered = True
                        await _pass_initial(call, context)
                    yield message
            except (asyncio.CancelledError, grpc.aio.AioRpcError) as error:
                await self._failed(error, forwarded, context, answered=answered)
                raise
            context.set_trailing_metadata(_returned(await call.trailing_metadata()))
        finally:
            self._end(forwarded)

    async def _failed(
        self,
        error: asyncio.CancelledError | grpc.aio.AioRpcError,
        forwarded: _Forwarded,
        context: Context,
        *,
        answered: bool,
    ) -> None:
        """End the caller's call as the leader's ended (or as the forwarder ended it);
        returns only for a cancel of the caller's own, which the caller re-raises."""
        if isinstance(error, asyncio.CancelledError):
            if forwarded.ended_by is None:
                assert forwarded.call is not None
                forwarded.call.cancel()  # the caller went away
                return
            await _abort(context, forwarded.ended_by)
        assert isinstance(error, grpc.aio.AioRpcError)
        trailing = error.trailing_metadata()
        if (
            error.code() is grpc.StatusCode.UNAVAILABLE
            and not answered
            and not any(key == STATUS_DETAILS_KEY for key, _ in trailing or ())
        ):
            # The transport's own UNAVAILABLE (no ErrorInfo: not the leader's answer).
            await _abort(context, leader_unreachable(self._target, error.details() or ""))
        await context.abort(error.code(), error.details() or "", _returned(trailing))


async def _pass_initial(call: Any, context: Context) -> None:
    initial = _returned(await call.initial_metadata())
    if initial:
        await context.send_initial_metadata(initial)


async def _abort(context: Context, error: ApiError) -> None:
    """End the caller's call with *error*, as the error catalog words it."""
    wire = status_for(error).to_grpc_status()
    await context.abort(wire.code, wire.details, wire.trailing_metadata)


class _ForwardingHandler(grpc.GenericRpcHandler):
    """Answers every method but the local ones with the forwarder."""

    def __init__(self, forwarder: Forwarder) -> None:
        self._forwarder = forwarder

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method: str = handler_call_details.method
        if is_local(method):
            return None
        # No (de)serializers: raw bytes in, raw bytes out. Partials of the coroutine and
        # async generator functions, which gRPC recognises as such.
        kind = method_kind(method)
        if kind is MethodKind.UNARY:
            return grpc.unary_unary_rpc_method_handler(
                functools.partial(self._forwarder.forward_unary, method)
            )
        relay = functools.partial(self._forwarder.forward_stream, method)
        if kind is MethodKind.SERVER_STREAMING:
            return grpc.unary_stream_rpc_method_handler(relay)
        return grpc.stream_stream_rpc_method_handler(relay)
