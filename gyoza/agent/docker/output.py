"""An op's output: bytes from the container's two streams → lines → events or log text.

Pure code, no Docker: the executor feeds it what the log stream delivers.

Lines are counted in the order they complete. Docker keeps a container's output in one
log in arrival order, so reading it again from the start yields the same lines in the
same order; that is what lets the count serve as a resume cursor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from gyoza.models.reports import ReportedEvent
from gyoza.models.resources import EventType
from gyoza.op import EVENT_MARKER

#: A line longer than this is cut into pieces of this size (the op printed without
#: newlines; keep the agent's memory bounded).
MAX_LINE_BYTES = 256 * 1024

STDOUT = "stdout"
STDERR = "stderr"

_EVENT_TYPES = {
    "progress": EventType.PROGRESS,
    "info": EventType.INFO,
    "error": EventType.ERROR,
}


@dataclass
class LineSplitter:
    """Cuts each stream's bytes into lines (``\\n``, with a trailing ``\\r`` dropped).

    ``feed`` returns the lines completed by a chunk; ``finish`` returns what is left of an
    unterminated last line on each stream, once the container has exited.
    """

    max_line_bytes: int = MAX_LINE_BYTES
    _pending: dict[str, bytearray] = field(default_factory=dict)

    def feed(self, stream: str, data: bytes) -> list[tuple[str, str]]:
        buf = self._pending.setdefault(stream, bytearray())
        buf += data
        lines: list[tuple[str, str]] = []
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            lines.append((_decode(buf[start:end]), stream))
            start = end + 1
        del buf[:start]
        while len(buf) >= self.max_line_bytes:
            lines.append((_decode(buf[: self.max_line_bytes]), stream))
            del buf[: self.max_line_bytes]
        return lines

    def finish(self) -> list[tuple[str, str]]:
        lines = [(_decode(buf), stream) for stream, buf in self._pending.items() if buf]
        self._pending.clear()
        return lines


def _decode(raw: bytes | bytearray) -> str:
    text = raw.decode("utf-8", errors="replace")
    return text[:-1] if text.endswith("\r") else text


def parse_event_line(text: str) -> ReportedEvent | None:
    """The event a stdout line carries, or ``None`` when it is plain log text.

    Raises
    ------
    ValueError
        The line has the marker but not a valid event after it.
    """
    if not text.startswith(EVENT_MARKER):
        return None
    body = text[len(EVENT_MARKER) :].strip()
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON after {EVENT_MARKER}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object after {EVENT_MARKER}")
    kind = data.get("type")
    event_type = _EVENT_TYPES.get(kind.lower()) if isinstance(kind, str) else None
    if event_type is None:
        raise ValueError(f"unknown event type {kind!r} (expected one of {sorted(_EVENT_TYPES)})")
    message = data.get("message", "")
    if message is None:
        message = ""
    if not isinstance(message, str):
        message = json.dumps(message)
    payload = data.get("payload")
    if payload is not None and not isinstance(payload, dict):
        raise ValueError("payload must be a JSON object")
    progress = 0
    if event_type is EventType.PROGRESS:
        value = data.get("progress")
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise ValueError(f"progress must be a number from 0 to 100, not {value!r}")
        progress = max(0, min(100, round(value)))
    return ReportedEvent(event_type, message, progress=progress, payload=payload or {})
