"""The error catalog and the one interceptor that turns exceptions into gRPC statuses.

Servicers never pick status codes for domain errors: they let the error propagate and
:class:`ErrorInterceptor` looks it up here. Each error becomes a status with a
``google.rpc.ErrorInfo`` (UPPER_SNAKE ``reason``, domain ``gyoza``) and, for invalid
input, a ``google.rpc.BadRequest`` listing every field violation. Errors that belong to
the transport rather than the domain (authentication, size limits, lagging watchers) are
raised as :class:`ApiError` with their code. Anything unexpected is ``INTERNAL``: logged
with its traceback and the request id, which the client also gets, and the server keeps
serving.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from gyoza.models.errors import (
    AlreadyExists,
    GyozaError,
    InvalidInput,
    InvalidTransition,
    MalformedReport,
    MaxAttemptsReached,
    NotAssignedToAgent,
    NotFound,
    OpRunLockedException,
    StaleAttempt,
)
from gyoza.server.handlers import Context, Handler, ScopedInterceptor
from gyoza.server.logs import REQUEST_ID_METADATA_KEY, current_request_id, log_event
from gyoza.server.store.leadership import FencedOut

log = logging.getLogger("gyoza.server.errors")

ERROR_DOMAIN = "gyoza"
"""The ``domain`` of every ErrorInfo the server returns."""

MAX_MESSAGE_WIRE_BYTES = 1024
"""Most bytes of a status message as it travels (percent-encoded in ``grpc-message``);
a longer one is cut with "...". Headers over gRPC's limits (8-16 KiB) would reach the
client as RESOURCE_EXHAUSTED instead of the real status."""

MAX_DETAILS_BYTES = 3072
"""Most bytes of the encoded ``google.rpc.Status`` (ErrorInfo and BadRequest) in the
``grpc-status-details-bin`` trailer: violations past it are left out, and a last
violation on the field ``"..."`` says how many."""

MAX_VIOLATION_TEXT = 300
"""Longest field name or description of one violation, and of an ErrorInfo value."""

MORE_VIOLATIONS_FIELD = "..."


class ApiError(Exception):
    """An error the server raises with its status code chosen, outside the domain.

    Parameters
    ----------
    code : grpc.StatusCode
        Status code of the call.
    reason : str
        UPPER_SNAKE reason for the ErrorInfo.
    message : str
        What went wrong, for the caller.
    metadata : Mapping[str, str] | None
        Extra ErrorInfo metadata (a resume position, a size limit, ...).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: str,
        message: str,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})


# Domain error class -> status code. Looked up along the exception's MRO, so the most
# specific class wins (MaxAttemptsReached before InvalidTransition before ValueError).
CATALOG: dict[type[BaseException], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    OpRunLockedException: grpc.StatusCode.FAILED_PRECONDITION,
    InvalidTransition: grpc.StatusCode.FAILED_PRECONDITION,
    MaxAttemptsReached: grpc.StatusCode.FAILED_PRECONDITION,
    StaleAttempt: grpc.StatusCode.ABORTED,
    NotAssignedToAgent: grpc.StatusCode.PERMISSION_DENIED,
    MalformedReport: grpc.StatusCode.INVALID_ARGUMENT,
    GyozaError: grpc.StatusCode.FAILED_PRECONDITION,
    # This replica lost its leadership under the call: another replica serves it.
    FencedOut: grpc.StatusCode.UNAVAILABLE,
    # A ValueError from the domain is a value it refused.
    ValueError: grpc.StatusCode.INVALID_ARGUMENT,
    # What a generated servicer base class raises for a method nobody implemented.
    NotImplementedError: grpc.StatusCode.UNIMPLEMENTED,
}


@dataclass(frozen=True)
class ErrorStatus:
    """What one exception becomes on the wire.

    Attributes
    ----------
    code : grpc.StatusCode
        The status code.
    reason : str
        ErrorInfo reason.
    message : str
        The status message.
    metadata : Mapping[str, str]
        ErrorInfo metadata.
    violations : tuple[tuple[str, str], ...]
        ``(field, description)`` pairs for a BadRequest detail; empty for none.
    """

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: Mapping[str, str]
    violations: tuple[tuple[str, str], ...] = ()

    def to_grpc_status(self) -> grpc.Status:
        """The status with its ErrorInfo (and BadRequest) packed in its details.

        Bounded in encoded bytes whatever the error holds (see
        :data:`MAX_MESSAGE_WIRE_BYTES`, :data:`MAX_DETAILS_BYTES`), so that the real
        status always reaches the client.
        """
        error_info = error_details_pb2.ErrorInfo(
            reason=self.reason,
            domain=ERROR_DOMAIN,
            metadata={
                _cut(k, MAX_VIOLATION_TEXT): _cut(v, MAX_VIOLATION_TEXT)
                for k, v in list(self.metadata.items())[:16]
            },
        )
        message = _cut_for_wire(self.message, MAX_MESSAGE_WIRE_BYTES)
        status = status_pb2.Status(
            code=self.code.value[0], message=message, details=[_pack(error_info)]
        )
        if self.violations:
            _add_violations(status, self.violations)
        result: grpc.Status = rpc_status.to_status(status)
        return result


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _wire_size(char: str) -> int:
    # grpc-message is percent-encoded: printable ASCII but "%" travels as itself.
    if " " <= char <= "~" and char != "%":
        return 1
    return 3 * len(char.encode("utf-8", "surrogatepass"))


def _cut_for_wire(message: str, limit: int) -> str:
    size = 0
    for i, char in enumerate(message):
        size += _wire_size(char)
        if size > limit - 3:
            return message[:i] + "..."
    return message


def _add_violations(status: status_pb2.Status, violations: tuple[tuple[str, str], ...]) -> None:
    """Pack as many violations as fit in :data:`MAX_DETAILS_BYTES`, then a count of
    the rest."""
    budget = MAX_DETAILS_BYTES - status.ByteSize() - 64  # the Any wrapper and the count
    bad_request = error_details_pb2.BadRequest()
    for index, (field, text) in enumerate(violations):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=_cut(field, MAX_VIOLATION_TEXT), description=_cut(text, MAX_VIOLATION_TEXT)
        )
        if bad_request.ByteSize() + violation.ByteSize() + 4 > budget:
            left = len(violations) - index
            bad_request.field_violations.add(
                field=MORE_VIOLATIONS_FIELD, description=f"and {left} more violations"
            )
            break
        bad_request.field_violations.append(violation)
    status.details.append(_pack(bad_request))


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def status_for(error: BaseException, request_id: str | None = None) -> ErrorStatus:
    """Look *error* up in the catalog.

    Parameters
    ----------
    error : BaseException
        What the handler raised.
    request_id : str | None
        Named in the message of an INTERNAL error, so a user can quote it.
    """
    if isinstance(error, ApiError):
        return ErrorStatus(error.code, error.reason, error.message, error.metadata)
    code = next((CATALOG[c] for c in type(error).__mro__ if c in CATALOG), None)
    if code is None:
        suffix = f" (request id {request_id})" if request_id else ""
        return ErrorStatus(grpc.StatusCode.INTERNAL, "INTERNAL", f"internal error{suffix}", {})
    reason = error.reason if isinstance(error, GyozaError | FencedOut) else code.name
    violations: tuple[tuple[str, str], ...] = ()
    if isinstance(error, InvalidInput):
        violations = tuple((v.field, v.description) for v in error.violations)
    return ErrorStatus(code, reason, str(error) or reason, {}, violations)


@asynccontextmanager
async def _error_scope(details: grpc.HandlerCallDetails, context: Context) -> AsyncIterator[None]:
    try:
        yield
    except grpc.aio.AbortError:
        raise  # the handler aborted with a status of its own
    except Exception as error:
        request_id = current_request_id()
        status = status_for(error, request_id)
        if status.code is grpc.StatusCode.INTERNAL:
            log_event(
                log,
                logging.ERROR,
                "unexpected error",
                exc_info=True,
                method=details.method,
                error=repr(error),
            )
        wire = status.to_grpc_status()
        trailing = tuple(wire.trailing_metadata)
        if request_id is not None:
            # abort() replaces the trailing metadata set earlier: keep the request id.
            trailing += ((REQUEST_ID_METADATA_KEY, request_id),)
        await context.abort(wire.code, wire.details, trailing)


class ErrorInterceptor(ScopedInterceptor):
    """Maps every exception a handler (unary or streaming) raises to its status."""

    def __init__(self) -> None:
        super().__init__(_error_scope)


MALFORMED_REQUEST = "MALFORMED_REQUEST"
"""ErrorInfo reason of a request whose bytes are not a message of the method's type."""


class _Undecodable:
    """Stands in for a request message whose bytes failed to parse."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def malformed_request(error: Exception | None = None) -> ApiError:
    """The INVALID_ARGUMENT for request bytes that do not parse."""
    detail = f": {error}" if error is not None and str(error) else ""
    return ApiError(
        grpc.StatusCode.INVALID_ARGUMENT,
        MALFORMED_REQUEST,
        "the request is not a valid protobuf message of the method's type" + detail[:200],
    )


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:  # DecodeError, RecursionError, bad UTF-8...
            return _Undecodable(error)

    return parse


def _checked(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise malformed_request(request.error)
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(request)


def _decoding(handler: Handler) -> Handler:
    """*handler* with a deserializer that never raises and a behaviour that turns an
    unparsable request into :func:`malformed_request`, raised where the handler reads it
    (so the error interceptor answers it, with the call's request id)."""
    if handler.request_deserializer is None:
        return handler
    parse = _tolerant(handler.request_deserializer)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        behavior: Callable[..., Any] = handler.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            result = behavior(_checked(request), context)
            return await result if inspect.isawaitable(result) else result

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, request_deserializer=parse, response_serializer=serialize
        )
    if handler.unary_stream is not None:
        streaming: Callable[..., Any] = handler.unary_stream

        def unary_stream(request: Any, context: Context) -> Any:
            return streaming(_checked(request), context)

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, request_deserializer=parse, response_serializer=serialize
        )
    if handler.stream_unary is not None:
        collecting: Callable[..., Any] = handler.stream_unary

        def stream_unary(requests: AsyncIterator[Any], context: Context) -> Any:
            return collecting(_checked_stream(requests), context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, request_deserializer=parse, response_serializer=serialize
        )
    if handler.stream_stream is not None:
        bidi: Callable[..., Any] = handler.stream_stream

        def stream_stream(requests: AsyncIterator[Any], context: Context) -> Any:
            return bidi(_checked_stream(requests), context)

        return grpc.stream_stream_rpc_method_handler(
            stream_stream, request_deserializer=parse, response_serializer=serialize
        )
    return handler


class DecodeInterceptor(grpc.aio.ServerInterceptor):
    """Turns request bytes that do not parse into INVALID_ARGUMENT (MALFORMED_REQUEST).

    gRPC answers a request its deserializer cannot parse with UNKNOWN, logged as an
    error with a traceback and without the call's request id. Installed innermost
    (after authentication), this interceptor parses tolerantly and raises
    :func:`malformed_request` inside the call instead, where the error interceptor
    maps it like any other refused input. On a stream, the message that does not parse
    ends the stream with that status.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        return None if handler is None else _decoding(handler)


NO_LEADER = "NO_LEADER"
"""ErrorInfo reason of a call a follower cannot forward: no leader is known."""

LEADER_CHANGED = "LEADER_CHANGED"
"""ErrorInfo reason of a forwarded call ended because the leader changed."""

LEADER_UNREACHABLE = "LEADER_UNREACHABLE"
"""ErrorInfo reason of a forwarded call the leader's address did not answer."""


def no_leader() -> ApiError:
    """The UNAVAILABLE of a call a follower gets while no leader is known."""
    return ApiError(
        grpc.StatusCode.UNAVAILABLE,
        NO_LEADER,
        "this replica knows no leader to forward the call to; retry",
    )


def leader_changed(previous: str | None, current: str | None) -> ApiError:
    """The UNAVAILABLE that ends a forwarded call when the leader changes."""
    return ApiError(
        grpc.StatusCode.UNAVAILABLE,
        LEADER_CHANGED,
        "the leader changed; retry (a stream: reconnect)",
        {"previous": previous or "", "leader": current or ""},
    )


def leader_unreachable(address: str | None, detail: str) -> ApiError:
    """The UNAVAILABLE of a forwarded call whose transport to the leader failed."""
    return ApiError(
        grpc.StatusCode.UNAVAILABLE,
        LEADER_UNREACHABLE,
        f"the leader at {address or '?'} did not answer: {detail[:300]}",
        {"leader": address or ""},
    )
