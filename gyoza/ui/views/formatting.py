"""How the dashboard writes durations, ages, sizes and JSON."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from gyoza.models.timestamps import utc_now

__all__ = ["format_age", "format_duration", "format_mb", "percent", "pretty_json"]


def format_duration(ms: float | None) -> str:
    """``850 ms``, ``12.3 s``, ``4 m 05 s``, ``2 h 10 m``; ``—`` for ``None``."""
    if ms is None:
        return "—"
    if ms < 1000:
        return f"{int(ms)} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} m {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} m"
    return f"{hours // 24} d {hours % 24} h"


def format_age(moment: datetime | None, now: datetime | None = None) -> str:
    """How long ago: ``just now``, ``42 s ago``, ``5 m ago``, ``3 h ago``, ``2 d ago``."""
    if moment is None:
        return "—"
    seconds = ((now or utc_now()) - moment).total_seconds()
    if seconds < 5:
        return "just now"
    if seconds < 60:
        return f"{int(seconds)} s ago"
    if seconds < 3600:
        return f"{int(seconds // 60)} m ago"
    if seconds < 172800:
        return f"{int(seconds // 3600)} h ago"
    return f"{int(seconds // 86400)} d ago"


def format_mb(mb: float) -> str:
    """A size given in MiB, as people read it: ``0``, ``512 MB``, ``24 GB``, ``1.5 TB``."""
    if mb == 0:
        return "0"
    if mb >= 1024 * 1024:
        return f"{mb / (1024 * 1024):.1f} TB"
    if mb >= 1024:
        gb = mb / 1024
        return f"{gb:.0f} GB" if gb >= 10 or gb.is_integer() else f"{gb:.1f} GB"
    return f"{int(mb)} MB"


def pretty_json(value: Any) -> str:
    """Indented JSON, keys in their order."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def percent(part: float, whole: float) -> int:
    """*part* of *whole* as a whole percentage, 0-100 (0 of nothing)."""
    if whole <= 0:
        return 0
    return max(0, min(100, round(100 * part / whole)))
