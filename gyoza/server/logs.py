"""Structured logging of the server: one JSON object a line, tagged with the request id.

Every record the server writes carries its time, level, logger, message and, inside an
RPC, the request id of that call (from the ``x-request-id`` metadata or generated), so
that one call's lines can be found together. Extra fields are given with
``extra={"fields": {...}}`` or through :func:`log_event`.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import os
from typing import Any

from gyoza.logformat import (
    CONTEXT_FIELDS,
    LOG_FORMATS,
    JsonFormatter,
    LogfmtFormatter,
    TextFormatter,
    configure_logging,
    record_fields,
)

__all__ = [
    "LOG_FORMATS",
    "MAX_REQUEST_ID_LENGTH",
    "REQUEST_ID_METADATA_KEY",
    "JsonFormatter",
    "LogfmtFormatter",
    "TextFormatter",
    "bind_request_id",
    "choose_request_id",
    "configure_logging",
    "current_request_id",
    "log_event",
    "new_request_id",
    "record_fields",
    "unbind_request_id",
]

REQUEST_ID_METADATA_KEY = "x-request-id"
"""Metadata key a client may set and the server returns in trailing metadata."""

MAX_REQUEST_ID_LENGTH = 128
"""A longer ``x-request-id`` from a client is replaced by a generated one."""

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "gyoza_request_id", default=None
)


def current_request_id() -> str | None:
    """The request id of the RPC the calling task serves, or ``None`` outside one."""
    return _request_id.get()


def bind_request_id(request_id: str | None) -> contextvars.Token[str | None]:
    """Make *request_id* the current one; reset with :func:`unbind_request_id`."""
    return _request_id.set(request_id)


def unbind_request_id(token: contextvars.Token[str | None]) -> None:
    """Restore the request id that was current before :func:`bind_request_id`."""
    _request_id.reset(token)


_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """A fresh request id (32 hex digits): random per process, then a call counter.

    Unique without asking the OS for randomness on every call.
    """
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def choose_request_id(given: str | None) -> str:
    """The client's request id when it is usable, a generated one otherwise."""
    if given and len(given) <= MAX_REQUEST_ID_LENGTH and given.isprintable():
        return given
    return new_request_id()


# The formats themselves are shared with the agent; the request id is this server's.
CONTEXT_FIELDS.append(lambda: {} if (rid := current_request_id()) is None else {"request_id": rid})


def log_event(
    logger: logging.Logger, level: int, event: str, /, *, exc_info: bool = False, **fields: Any
) -> None:
    """Write one structured event: *event* is the message, *fields* its attributes.

    With ``exc_info`` the traceback of the exception being handled is added.

    Cheap when the level is off (one check); when on, the record is made directly,
    without ``Logger.log`` looking up the caller's file and line on the stack (no
    formatter of ours writes them).
    """
    if not logger.isEnabledFor(level):
        return
    if exc_info:
        logger.log(level, event, exc_info=True, extra={"fields": fields})
        return
    record = logger.makeRecord(
        logger.name, level, "(unknown file)", 0, event, (), None, extra={"fields": fields}
    )
    logger.handle(record)
