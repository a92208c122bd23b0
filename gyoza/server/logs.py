"""Structured logging of the server: one JSON object a line, tagged with the request id.

Every record the server writes carries its time, level, logger, message and, inside an
RPC, the request id of that call (from the ``x-request-id`` metadata or generated), so
that one call's lines can be found together. Extra fields are given with
``extra={"fields": {...}}`` or through :func:`log_event`.
"""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

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


# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "fields",
    "taskName",
}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields of a record: ``extra={"fields": {...}}`` and plain extras."""
    attributes = record.__dict__
    extras = attributes.keys() - _STANDARD_ATTRIBUTES
    found = {k: attributes[k] for k in extras} if extras else {}
    fields = attributes.get("fields")
    if isinstance(fields, Mapping):
        found.update(fields)
    return found


_last_second: tuple[int, str] = (-1, "")


def _format_time(created: float) -> str:
    """``created`` as ISO 8601 UTC with milliseconds (``2024-05-01T12:00:00.123+00:00``).

    The same text as ``datetime.isoformat(timespec="milliseconds")``; the part up to the
    second is computed once a second.
    """
    global _last_second
    second = int(created)
    micro = round((created - second) * 1e6)  # as datetime.fromtimestamp rounds
    if micro >= 1_000_000:
        second, micro = second + 1, micro - 1_000_000
    cached_second, text = _last_second
    if second != cached_second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _last_second = (second, text)
    return f"{text}.{micro // 1000:03d}+00:00"


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _format_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        request_id = current_request_id()
        if request_id is not None:
            entry["request_id"] = request_id
        entry.update(record_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class LogfmtFormatter(logging.Formatter):
    """Formats a record as ``key=value`` pairs on one line (logfmt)."""

    def format(self, record: logging.LogRecord) -> str:
        pairs: list[tuple[str, Any]] = [
            ("time", _format_time(record.created)),
            ("level", record.levelname.lower()),
            ("logger", record.name),
            ("msg", record.getMessage()),
        ]
        request_id = current_request_id()
        if request_id is not None:
            pairs.append(("request_id", request_id))
        pairs.extend(record_fields(record).items())
        if record.exc_info:
            pairs.append(("exception", self.formatException(record.exc_info)))
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in pairs)


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(c in text for c in ' ="\n\\'):
        return text
    return json.dumps(text)


LOG_FORMATS = ("json", "logfmt")


def configure_logging(
    level: str = "info", log_format: str = "json", stream: TextIO | None = None
) -> None:
    """Send every log record of the process to *stream* (stderr), one event a line.

    Parameters
    ----------
    level : str
        Lowest level written: ``debug``, ``info``, ``warning`` or ``error``.
    log_format : str
        ``json`` or ``logfmt``.
    stream : TextIO | None
        Where to write; stderr by default.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else LogfmtFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # grpc's own logger is chatty at INFO about internals; keep its warnings.
    logging.getLogger("grpc").setLevel(logging.WARNING)


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
