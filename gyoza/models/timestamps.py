"""Timestamps: the domain holds aware UTC datetimes and writes ISO 8601 strings."""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


def parse_timestamp(value: str | datetime) -> datetime:
    """Read an ISO 8601 timestamp (a ``Z`` suffix included) as an aware datetime.

    A timestamp without an offset is taken to be UTC.
    """
    if isinstance(value, datetime):
        parsed = value
    else:
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed


def parse_optional_timestamp(value: str | datetime | None) -> datetime | None:
    """Like :func:`parse_timestamp`, passing ``None`` (and ``""``) through as ``None``."""
    if value is None or value == "":
        return None
    return parse_timestamp(value)


def format_timestamp(value: datetime) -> str:
    """Write an aware datetime as ISO 8601."""
    return value.isoformat()


def format_optional_timestamp(value: datetime | None) -> str | None:
    """Like :func:`format_timestamp`, passing ``None`` through."""
    return None if value is None else value.isoformat()


def elapsed_ms(start: datetime, end: datetime) -> int:
    """Whole milliseconds from *start* to *end*, never negative."""
    return max(0, int((end - start).total_seconds() * 1000))
