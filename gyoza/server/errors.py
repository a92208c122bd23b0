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

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

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
from gyoza.server.handlers import Context, ScopedInterceptor
from gyoza.server.logs import REQUEST_ID_METADATA_KEY, current_request_id, log_event

log = logging.getLogger("gyoza.server.errors")

ERROR_DOMAIN = "gyoza"
"""The ``domain`` of every ErrorInfo the server returns."""

MAX_DETAILS_LENGTH = 2000
"""Longer status messages are cut (the full list of violations is in the BadRequest)."""


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
        """The status with its ErrorInfo (and BadRequest) packed in its details."""
        error_info = error_details_pb2.ErrorInfo(
            reason=self.reason, domain=ERROR_DOMAIN, metadata=dict(self.metadata)
        )
        details = [_pack(error_info)]
        if self.violations:
            bad_request = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=field, description=text)
                    for field, text in self.violations
                ]
            )
            details.append(_pack(bad_request))
        message = self.message
        if len(message) > MAX_DETAILS_LENGTH:
            message = message[: MAX_DETAILS_LENGTH - 3] + "..."
        status = status_pb2.Status(code=self.code.value[0], message=message, details=details)
        result: grpc.Status = rpc_status.to_status(status)
        return result


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
    reason = error.reason if isinstance(error, GyozaError) else code.name
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
