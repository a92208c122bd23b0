"""A follower replica's forwarding of calls to the leader, as raw bytes.

A follower serves health and reflection itself; every other method reaches
:class:`Forwarder`'s generic handler, which opens the same method on the leader and
pumps messages both ways without decoding them: on the wire a unary call is a stream of
one request and one response, so one bidirectional handler forwards unary calls,
server streams and the agents' ``Connect`` alike.

What travels with a call: its metadata (API keys, agent tokens, request ids) less the
transport's own headers, plus :data:`REPLICA_METADATA_KEY` naming this replica; its
deadline; cancellation both ways. What comes back: the leader's initial metadata, every
response, and its status with details and trailing metadata, including
``grpc-status-details-bin``, so the google.rpc.ErrorInfo reasons a client reads are the
leader's own.

When the leader changes (:meth:`Forwarder.set_target`), every call forwarded to the
old one ends ``UNAVAILABLE`` (``LEADER_CHANGED``): clients retry, watchers and
subscribers resume from their position, agents reconnect and are reconciled by the new
leader.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import grpc.aio

from gyoza.server.errors import ApiError, status_for

REPLICA_METADATA_KEY = "x-gyoza-replica"
"""Metadata a follower adds to each call it forwards: its replica id."""

NO_LEADER = "NO_LEADER"
LEADER_CHANGED = "LEADER_CHANGED"
LEADER_UNREACHABLE = "LEADER_UNREACHABLE"

_LOCAL_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Headers of the transport itself, which the outgoing call sets on its own.
_HOP_HEADERS = frozenset({"user-agent", "te", "content-type", "host", "grpc-timeout"})
# Channel options a forwarding channel takes from the server's own.
_CHANNEL_OPTIONS = ("grpc.max_receive_message_length", "grpc.max_send_message_length")


def _kept(metadata: Sequence[tuple[str, Any]] | None) -> list[tuple[str, Any]]:
    return [
        (key, value)
        for key, value in metadata or ()
        if not key.startswith((":", "grpc-"))
        and key not in _HOP_HEADERS
        and key != REPLICA_METADATA_KEY
    ]


def _trailing(metadata: Sequence[tuple[str, Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Trailing metadata to pass back: the leader's, with its status details."""
    return tuple(
        (key, value)
        for key, value in metadata or ()
        if not key.startswith(":")
        and (not key.startswith("grpc-") or key == "grpc-status-details-bin")
    )


class _Forwarded:
    """One call in flight to the leader."""

    __slots__ = ("call", "moved")

    def __init__(self) -> None:
        self.call: Any = None
        self.moved = False


class Forwarder:
    """Forwards calls to the current leader.

    Parameters
    ----------
    replica_id : str
        This replica's id, sent with every forwarded call.
    credentials : grpc.ChannelCredentials | None
        TLS to reach the leader; None: plaintext.
    options : Sequence[tuple[str, Any]]
        The server's channel options; the message size limits are taken from them.
    """

    def __init__(
        self,
        *,
        replica_id: str,
        credentials: grpc.ChannelCredentials | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        self.replica_id = replica_id
        self._credentials = credentials
        self._options = [(k, v) for k, v in options if k in _CHANNEL_OPTIONS]
        self._target: str | None = None
        self._channel: grpc.aio.Channel | None = None
        self._methods: dict[str, Any] = {}
        self._calls: set[_Forwarded] = set()
        self._closing: set[asyncio.Task[None]] = set()
        self.forwarded = 0

    @property
    def target(self) -> str | None:
        """The leader's address calls go to (None: no leader known)."""
        return self._target

    @property
    def open_calls(self) -> int:
        """Calls being forwarded now (agents' streams, watches, unary calls)."""
        return len(self._calls)

    def set_target(self, address: str | None) -> None:
        """Forward to *address* from now on; calls in flight to the previous leader end
        UNAVAILABLE (LEADER_CHANGED). None: no leader known, calls fail NO_LEADER."""
        if address == self._target:
            return
        old, self._channel = self._channel, None
        self._target = address
        self._methods = {}
        for forwarded in list(self._calls):
            forwarded.moved = True
            if forwarded.call is not None:
                forwarded.call.cancel()
        if address is not None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(address, options=self._options)
            else:
                self._channel = grpc.aio.secure_channel(
                    address, self._credentials, options=self._options
                )
        if old is not None:
            task = asyncio.ensure_future(old.close(grace=None))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def handler(self) -> grpc.GenericRpcHandler:
        """The generic handler forwarding every method but health and reflection."""
        return _Handler(self)

    async def close(self) -> None:
        """End what is forwarded and close the channel."""
        self.set_target(None)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def forward(
        self,
        method: str,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[bytes]:
        """Forward one call of *method* (the behaviour of every forwarded method)."""
        channel = self._channel
        if channel is None:
            await _abort(context, NO_LEADER, "no replica leads at the moment; retry shortly")
            return
        multicallable = self._methods.get(method)
        if multicallable is None:
            multicallable = channel.stream_stream(method)
            self._methods[method] = multicallable
        forwarded = _Forwarded()
        self._calls.add(forwarded)
        self.forwarded += 1
        try:
            metadata = _kept(context.invocation_metadata())
            metadata.append((REPLICA_METADATA_KEY, self.replica_id))
            call = multicallable(
                requests, metadata=tuple(metadata), timeout=context.time_remaining()
            )
            forwarded.call = call
            try:
                initial = await call.initial_metadata()
                if initial:
                    await context.send_initial_metadata(_trailing(initial))
                async for response in call:
                    yield response
                trailing = await call.trailing_metadata()
                if trailing:
                    context.set_trailing_metadata(_trailing(trailing))
            except grpc.aio.AioRpcError as error:
                if forwarded.moved:
                    await _abort(context, LEADER_CHANGED, "the leading replica changed; retry")
                    return
                await _pass_back(context, error)
            except asyncio.CancelledError:
                if forwarded.moved:
                    await _abort(context, LEADER_CHANGED, "the leading replica changed; retry")
                    return
                raise
        finally:
            self._calls.discard(forwarded)
            if forwarded.call is not None and not forwarded.call.done():
                forwarded.call.cancel()


class _Handler(grpc.GenericRpcHandler):
    def __init__(self, forwarder: Forwarder) -> None:
        self._forwarder = forwarder
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        if method.startswith(_LOCAL_PREFIXES):
            return None
        handler = self._handlers.get(method)
        if handler is None:
            if len(self._handlers) > 256:  # method names come from callers: bounded
                self._handlers.clear()
            behavior = functools.partial(self._forwarder.forward, method)
            handler = grpc.stream_stream_rpc_method_handler(behavior)
            self._handlers[method] = handler
        return handler


async def _pass_back(
    context: grpc.aio.ServicerContext[Any, Any], error: grpc.aio.AioRpcError
) -> None:
    """End the call as the leader ended it; a leader that cannot be reached at all is
    LEADER_UNREACHABLE (the client retries, likely on a replica that knows better)."""
    trailing = _trailing(error.trailing_metadata())
    code = error.code()
    if code is grpc.StatusCode.UNAVAILABLE and not any(
        key == "grpc-status-details-bin" for key, _ in trailing
    ):
        await _abort(
            context, LEADER_UNREACHABLE, f"the leading replica is unreachable: {error.details()}"
        )
        return
    await context.abort(code, error.details() or "", trailing)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], reason: str, message: str) -> None:
    wire = status_for(ApiError(grpc.StatusCode.UNAVAILABLE, reason, message)).to_grpc_status()
    await context.abort(wire.code, wire.details, tuple(wire.trailing_metadata))
