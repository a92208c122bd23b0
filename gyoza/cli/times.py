"""Times on the command line: ``--created-after 2026-12-01T09:00``, ``--created-after 2h``.

An ISO 8601 date or date and time (without an offset it is local time, as the tables
show times), or a duration ago: a number and a unit, ``s``, ``m``, ``h``, ``d`` or ``w``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import click

__all__ = ["TimeParam", "parse_time"]

_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_time(text: str, now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> datetime:
    """The aware UTC time *text* names.

    Raises
    ------
    ValueError
        Neither an ISO 8601 time nor a duration ago; the message says what is taken.
    """
    value = text.strip()
    ago = _AGO.match(value.lower())
    if ago:
        return now() - timedelta(seconds=float(ago.group(1)) * _UNITS[ago.group(2)])
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: give an ISO 8601 time (2026-12-01, "
            "2026-12-01T09:30, 2026-12-01T09:30:00Z) or a duration ago (90s, 15m, 2h, 7d)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # local time, as the tables show it
    return moment.astimezone(UTC)


class TimeParam(click.ParamType):  # type: ignore[type-arg]
    """A click parameter read with :func:`parse_time`."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, datetime):
            return value
        try:
            return parse_time(str(value))
        except ValueError as error:
            self.fail(str(error), param, ctx)
