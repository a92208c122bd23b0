"""Typed errors of the Python client.

Every failed call raises a :class:`GyozaClientError` (or a subclass chosen by its status
code) carrying the gRPC code, the ``google.rpc.ErrorInfo`` reason the server put in the
status details, and the server's message. ``INVALID_ARGUMENT`` errors also carry the
field violations of the ``google.rpc.BadRequest`` detail.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from gyoza.models.errors import FieldViolation

__all__ = [
    "AlreadyExistsError",
    "FailedPreconditionError",
    "GyozaClientError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_from_rpc",
]


class GyozaClientError(Exception):
    """A call to the gyoza server failed.

    Parameters
    ----------
    code : grpc.StatusCode
        The status code.
    message : str
        The server's explanation (or gRPC's, when the server was not reached).
    reason : str | None
        UPPER_SNAKE reason from the ``google.rpc.ErrorInfo`` detail, when there is one
        (``RUN_LOCKED``, ``INVALID_TRANSITION``...).
    metadata : dict[str, str] | None
        The ``ErrorInfo`` metadata.
    violations : list[FieldViolation] | None
        Field violations of a ``google.rpc.BadRequest`` detail.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        violations: list[FieldViolation] | None = None,
    ) -> None:
        self.code = code
        self.message = message
        self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})
        self.violations: list[FieldViolation] = list(violations or [])
        super().__init__(message)

    def __str__(self) -> str:
        return self.message or self.code.name

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code.name}, reason={self.reason!r}, "
            f"message={self.message!r})"
        )


class InvalidArgumentError(GyozaClientError):
    """``INVALID_ARGUMENT``: the request was malformed; :attr:`violations` lists why."""

    def __str__(self) -> str:
        if not self.violations:
            return super().__str__()
        listed = "; ".join(str(v) for v in self.violations)
        if self.message and listed not in self.message:
            return f"{self.message} ({listed})"
        return self.message or listed


class NotFoundError(GyozaClientError):
    """``NOT_FOUND``: no such run, definition, version or agent."""


class AlreadyExistsError(GyozaClientError):
    """``ALREADY_EXISTS``: e.g. a ``request_id`` reused with a different request."""


class FailedPreconditionError(GyozaClientError):
    """``FAILED_PRECONDITION``: the change is not allowed in the current state
    (reason ``RUN_LOCKED``, ``INVALID_TRANSITION``...)."""


class ResourceExhaustedError(GyozaClientError):
    """``RESOURCE_EXHAUSTED``: e.g. inputs over the server's size limit."""


class UnauthenticatedError(GyozaClientError):
    """``UNAUTHENTICATED``: no API key, or one the server does not know."""


class PermissionDeniedError(GyozaClientError):
    """``PERMISSION_DENIED``: the credentials may not do this."""


class UnavailableError(GyozaClientError):
    """``UNAVAILABLE``: the server could not be reached (or went away)."""


_BY_CODE: dict[grpc.StatusCode, type[GyozaClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
}


def error_from_rpc(error: grpc.RpcError) -> GyozaClientError:
    """Turn a failed call into the typed error for its status code.

    The ``ErrorInfo`` and ``BadRequest`` details are read from the call's trailing
    metadata (``grpc-status-details-bin``) when the server sent them.
    """
    code = grpc.StatusCode.UNKNOWN
    message = str(error)
    if isinstance(error, grpc.Call):
        code = error.code() or grpc.StatusCode.UNKNOWN
        message = error.details() or ""
    reason: str | None = None
    metadata: dict[str, str] = {}
    violations: list[FieldViolation] = []
    status = _rich_status(error)
    if status is not None:
        message = status.message or message
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason or None
                metadata = dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations.extend(
                    FieldViolation(v.field, v.description) for v in bad_request.field_violations
                )
    kind = _BY_CODE.get(code, GyozaClientError)
    return kind(code, message, reason=reason, metadata=metadata, violations=violations)


def _rich_status(error: grpc.RpcError) -> status_pb2.Status | None:
    """The ``google.rpc.Status`` of the call, ``None`` when there is none (or it is
    inconsistent with the call's own code and message)."""
    if not isinstance(error, grpc.Call):
        return None
    try:
        status: status_pb2.Status | None = rpc_status.from_call(error)
    except ValueError:
        return None
    return status
