"""How gyoza's processes write their logs: one event a line, as JSON, logfmt or text.

Shared by the server and the agent (stdlib only). Every record carries its time, level,
logger and message, then its structured fields: ``extra={"fields": {...}}`` or plain
extras, and whatever the registered context hooks add (the server adds the request id
of the call a record is written in).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

#: Called for every record; each returns fields to add (e.g. the current request id).
CONTEXT_FIELDS: list[Callable[[], Mapping[str, Any]]] = []


def _context() -> dict[str, Any]:
    found: dict[str, Any] = {}
    for hook in CONTEXT_FIELDS:
        found.update(hook())
    return found


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
        entry.update(_context())
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
        pairs.extend(_context().items())
        pairs.extend(record_fields(record).items())
        if record.exc_info:
            pairs.append(("exception", self.formatException(record.exc_info)))
        return " ".join(f"{key}={_logfmt_value(value)}" for key, value in pairs)


def _logfmt_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text and not any(c in text for c in ' ="\n\\'):
        return text
    return json.dumps(text)


class TextFormatter(logging.Formatter):
    """Formats a record for a person at a terminal: time, level, logger, message, fields."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"{_format_time(record.created)} {record.levelname} {record.name}: "
            + record.getMessage()
        )
        fields = {**_context(), **record_fields(record)}
        if fields:
            line += " " + " ".join(f"{k}={_logfmt_value(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


LOG_FORMATS = ("json", "logfmt", "text")

_FORMATTERS: dict[str, type[logging.Formatter]] = {
    "json": JsonFormatter,
    "logfmt": LogfmtFormatter,
    "text": TextFormatter,
}


def configure_logging(
    level: str = "info", log_format: str = "json", stream: TextIO | None = None
) -> None:
    """Send every log record of the process to *stream* (stderr), one event a line.

    Parameters
    ----------
    level : str
        Lowest level written: ``debug``, ``info``, ``warning`` or ``error``.
    log_format : str
        ``json``, ``logfmt`` or ``text``.
    stream : TextIO | None
        Where to write; stderr by default.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {log_format!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_FORMATTERS[log_format]())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # grpc's own logger is chatty at INFO about internals; keep its warnings.
    logging.getLogger("grpc").setLevel(logging.WARNING)
