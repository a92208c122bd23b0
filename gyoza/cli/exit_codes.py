"""Exit codes of the ``gyoza`` command, and how a failure maps to one.

====  ==================================================================================
0     Success; for ``runs watch`` and ``runs create --watch``: the run COMPLETED.
1     The run FAILED or was CANCELLED; or the server failed in a way that is neither the
      request's fault nor a connection problem (INTERNAL, UNKNOWN...).
2     Bad usage or input: a wrong flag, a bad op file or input, and what the server
      refuses as such (INVALID_ARGUMENT, NOT_FOUND, ALREADY_EXISTS, FAILED_PRECONDITION,
      OUT_OF_RANGE, RESOURCE_EXHAUSTED).
3     The server is unreachable or refused the credentials (UNAVAILABLE,
      DEADLINE_EXCEEDED, UNAUTHENTICATED, PERMISSION_DENIED).
141   Standard output was closed before the command was done (``gyoza ... | head -1``):
      it stops quietly, as a Unix tool killed by SIGPIPE does.
====  ==================================================================================
"""

from __future__ import annotations

from enum import IntEnum

import grpc

from gyoza.models.resources import OpRunState

__all__ = ["ExitCode", "exit_code_for_run", "exit_code_for_status"]


class ExitCode(IntEnum):
    """What the ``gyoza`` command exits with."""

    OK = 0
    RUN_FAILED = 1
    USAGE = 2
    UNREACHABLE = 3
    OUTPUT_CLOSED = 141


_USAGE_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
_UNREACHABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


def exit_code_for_status(code: grpc.StatusCode) -> ExitCode:
    """The exit code of a command whose call failed with *code*."""
    if code in _USAGE_CODES:
        return ExitCode.USAGE
    if code in _UNREACHABLE_CODES:
        return ExitCode.UNREACHABLE
    return ExitCode.RUN_FAILED


def exit_code_for_run(state: OpRunState) -> ExitCode:
    """The exit code of a command that waited for a run to end in *state*."""
    return ExitCode.OK if state is OpRunState.COMPLETED else ExitCode.RUN_FAILED
