"""The follower's transparent forwarder: every gyoza call, as raw bytes, to the leader.

A replica that is not the leader serves health and reflection itself and hands every
other call to :class:`Forwarder`, which relays it to the leader's address
(:meth:`Forwarder.set_target`) without parsing a message:

- requests and responses travel as the bytes they came as, in both directions, through
  one ``stream_stream`` call per method (on the wire a unary or server-streaming call is
  a stream that carries one request, so unary, server-streaming and the agents' bidi
  ``Connect`` are all forwarded the same way);
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
import functools
import logging
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

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
        self.call: grpc.aio.StreamStreamCall[Any, Any] | None = None
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
        self._callables: dict[str, grpc.aio.StreamStreamMultiCallable[Any, Any]] = {}
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

    def _callable(
        self, channel: grpc.aio.Channel, method: str
    ) -> grpc.aio.StreamStreamMultiCallable[Any, Any]:
        found = self._callables.get(method)
        if found is None:
            # No serializers: the bytes go as they came.
            found = channel.stream_stream(method)
            if len(self._callables) < _MAX_CACHED_METHODS:
                self._callables[method] = found
        return found

    # -- one call --------------------------------------------------------------------

    async def forward(
        self, method: str, requests: AsyncIterator[bytes], context: Context
    ) -> AsyncIterator[bytes]:
        """Relay one call to the target, and its answer back to the caller."""
        channel = self._channel
        if channel is None:
            await _abort(context, no_leader())
        assert channel is not None
        forwarded = _Forwarded(method)
        # Registered before the first await: a target set from now on ends this call.
        self._in_flight.add(forwarded)
        self._forwarded += 1
        self._open[method] += 1
        try:
            call = self._callable(channel, method)(
                requests,
                timeout=context.time_remaining(),
                metadata=forwarded_metadata(context.invocation_metadata(), self.replica_id),
            )
            forwarded.call = call
            # The caller cancelling (or its deadline) ends the leader's call, even while
            # this generator waits at a yield, where it may never be resumed.
            context.add_done_callback(lambda _: call.cancel())  # type: ignore[arg-type]
            async for message in self._relay(call, forwarded, context):
                yield message
        finally:
            self._in_flight.discard(forwarded)
            self._open[method] -= 1

    async def _relay(
        self,
        call: grpc.aio.StreamStreamCall[Any, Any],
        forwarded: _Forwarded,
        context: Context,
    ) -> AsyncIterator[bytes]:
        answered = False
        try:
            async for message in call:
                if not answered:
                    answered = True
                    initial = _returned(await call.initial_metadata())
                    if initial:
                        await context.send_initial_metadata(initial)
                yield message
        except asyncio.CancelledError:
            if forwarded.ended_by is None:
                call.cancel()  # the caller went away
                raise
            await _abort(context, forwarded.ended_by)
        except grpc.aio.AioRpcError as error:
            trailing = error.trailing_metadata()
            if (
                error.code() is grpc.StatusCode.UNAVAILABLE
                and not answered
                and not any(key == STATUS_DETAILS_KEY for key, _ in trailing or ())
            ):
                # The transport's own UNAVAILABLE (no ErrorInfo: not the leader's answer).
                await _abort(context, leader_unreachable(self._target, error.details() or ""))
            await context.abort(error.code(), error.details() or "", _returned(trailing))
        context.set_trailing_metadata(_returned(await call.trailing_metadata()))


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
        # No (de)serializers: raw bytes in, raw bytes out. A partial of the async
        # generator function, which gRPC recognises as one (a plain function returning
        # the generator it does not).
        return grpc.stream_stream_rpc_method_handler(
            functools.partial(self._forwarder.forward, method)
        )
